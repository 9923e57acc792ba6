# Two entry points that do all set-up themselves on a fresh machine:
#   make demo   train an Any2Point adapter on ModelNet40 (else synthetic shapes) with the bundled MiniLM, evaluate it
#   make test   lint and run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV ?= .venv
# The CPU wheel where there is no GPU; override for another build, e.g.
#   make demo TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# ----- demo recipe: short enough for a 2-core CPU; the script's own defaults are the paper's full recipe -----
DEMO_OUTPUT ?= outputs/demo
DEMO_SEED ?= 42
DEMO_DATA ?= --dataset modelnet40 --num_points 512
DEMO_TRAIN ?= --max_eval_samples 800 --num_tokens 64 --num_stages 2 --num_neighbors 16 --num_epochs 2 \
	--warmup_epochs 0.25 --learning_rate 2e-3 --head_dropout 0.1 --batch_size 32 --mixed_precision bf16 --seed $(DEMO_SEED)
DEMO_EVAL ?= --mixed_precision bf16 --voting 1
# ------------------------------------------------------------------------------------------------------------------

BIN := $(VENV)/bin
STAMP := $(VENV)/.any2point-installed

.PHONY: demo test test-fast install clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/train_modelnet.py $(DEMO_DATA) $(DEMO_TRAIN) --output_dir $(DEMO_OUTPUT)
	$(BIN)/python examples/evaluate_modelnet.py --adapter_path $(DEMO_OUTPUT) $(DEMO_DATA) $(DEMO_EVAL) \
		--output_file $(DEMO_OUTPUT)/eval_results.json
	@echo "Adapter: $(DEMO_OUTPUT)/adapter_model.safetensors"
	@echo "Plots:   $(DEMO_OUTPUT)/confusion_matrix.png $(DEMO_OUTPUT)/training_curves.png"
	@echo "Metrics: $(DEMO_OUTPUT)/metrics.jsonl $(DEMO_OUTPUT)/results.json $(DEMO_OUTPUT)/eval_results.json"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# Skips the tests marked slow (training on real data and real backbones, where present).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean-demo:
	rm -rf $(DEMO_OUTPUT)
