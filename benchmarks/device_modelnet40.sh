#!/usr/bin/env bash
# The paper's full ModelNet40 recipe (DESIGN.md §5: 300 epochs, AdamW 5e-4, 10 warm-up epochs, batch 32, 1024
# points) with a real backbone (all-MiniLM-L6-v2 unless $BACKBONE names another) on a lent GPU machine, as many
# epochs as fit in one device command, resumable across commands and sessions.
#
# What travels (each device call is capped at 64 MiB, see benchmarks/README.md):
#   .carry/minilm  config.json + model_fp16.safetensors: MiniLM without its word-embedding table (point inputs never
#                  read it), stored in float16 to fit; widened back to float32 here (max relative error 2^-11).
#                  BACKBONE=.carry/whisper picks another folder of the same form
#                  (`python -m benchmarks.real_backbones --export whisper-base .carry/whisper`)
#   .carry/data    train_u8.npz + test.npz from the shared ModelNet40 (train split 8-bit quantised, max error 0.004)
#   .whl           wheels of datasets, evaluate, dill and multiprocess, which the device image lacks
#   .carry/run     (optional) the run folder brought back by an earlier command, to resume from its last checkpoint
#
# Usage on the device:  bash benchmarks/device_modelnet40.sh <seconds to train> [train_modelnet.py flags...]
# (results in $OUT/run). Extra flags change the recipe, e.g. `--num_epochs 20 --warmup_epochs 1` for a complete
# shortened schedule; a run that finishes is also evaluated with 10-vote voting (eval_results_voting.json).
set -euo pipefail
budget_s=${1:-240}
shift || true
OUT=${OUT:-outputs/device}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, pyarrow, transformers, peft; print('torch', torch.__version__, 'pyarrow', pyarrow.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"

BACKBONE=${BACKBONE:-.carry/minilm}
mkdir -p "$OUT"
python3 -m benchmarks.real_backbones --widen "$BACKBONE" /tmp/backbone

resume=()
if [ -d .carry/run ]; then
    cp -r .carry/run "$OUT/run"
    resume=(--resume_from_checkpoint latest)
fi
# SIGINT after the budget: the last checkpoint (every 100 steps and at each epoch end) is what carries on. Only the
# newest is kept: it is all that resuming needs, and what comes back from the device is capped.
timeout -s INT "$budget_s" python3 examples/train_modelnet.py --model_name_or_path /tmp/backbone \
    --data_dir .carry/data --dataset modelnet40 --num_points 1024 --mixed_precision bf16 \
    --checkpointing_steps 100 --checkpoints_total_limit 1 --output_dir "$OUT/run" "${resume[@]}" "$@" \
    || echo "stopped after ${budget_s}s (rc $?)"
if [ -f "$OUT/run/results.json" ]; then
    python3 examples/evaluate_modelnet.py --adapter_path "$OUT/run" --model_name_or_path /tmp/backbone \
        --data_dir .carry/data --dataset modelnet40 --num_points 1024 --voting 10 \
        --output_file "$OUT/run/eval_results_voting.json"
fi
ls -la "$OUT/run" "$OUT"/run/checkpoint-*
tail -n 5 "$OUT/run/metrics.jsonl" 2>/dev/null || true
