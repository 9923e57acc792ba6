"""The comparison baselines (LoRA, full fine-tuning, embedder alone): what trains, what changes, what is saved."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from benchmarks.bench_ablations import VARIANTS
from peft_any2point import Any2PointConfig
from peft_any2point.baselines import BASELINES, WEIGHTS_FILE, make_baseline
from peft_any2point.training import (
    TRAINABLE_FILE,
    TrainingProgress,
    load_checkpoint,
    load_split,
    load_trainable_state,
    load_trained_model,
    save_checkpoint,
    save_trainable_state,
)
from tests.conftest import make_backbone, tiny_config
from tests.test_examples import DATA_ARGS, EVALUATE, MODEL_ARGS, TRAIN, load_script


# An architecture of each kind the baselines must cope with: learned 1D table, 2D grid, rotary (causal, and with
# per-layer rotary types), and a convolutional position encoding whose norm runs before the blocks.
ARCHITECTURES = ["bert", "vit", "llama", "modernbert", "wav2vec2"]
# The adapter config the training script builds from DATA_ARGS and MODEL_ARGS (8 synthetic classes).
SCRIPT_CONFIG = {"num_labels": 8, "num_tokens": 16, "num_stages": 2, "stage_widths": [16, 24], "num_neighbors": 8}


def baseline(kind: str, backbone: nn.Module | str = "bert", seed: int = 0, **overrides: object) -> PeftModel:
    if isinstance(backbone, str):
        backbone = make_backbone(backbone, seed)
    model = get_peft_model(backbone, tiny_config(use_adapter=False, **overrides))
    make_baseline(model, kind)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def expected_trainable(kind: str, name: str) -> set[str]:
    """The parameter names `kind` must train, read off an untouched model built the same way."""
    model = get_peft_model(make_backbone(name), tiny_config(use_adapter=False))
    spec = model.base_model.backbone_spec
    prefix = {id(module): path for path, module in model.named_modules()}
    blocks = prefix[id(spec.blocks)]
    expected = {n for n in trainable(model) if ".any2point.default." in n}
    if kind == "lora":
        linears = [f"{blocks}.{n}" for n, m in spec.blocks.named_modules() if isinstance(m, nn.Linear)]
        expected |= {f"{linear}.lora_{ab}.default.weight" for linear in linears for ab in "AB"}
    elif kind == "full":
        expected |= {f"{blocks}.{n}" for n, _ in spec.blocks.named_parameters()}
        if spec.input_norm is not None:
            expected |= {f"{prefix[id(spec.input_norm)]}.{n}" for n, _ in spec.input_norm.named_parameters()}
    return expected


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("kind", BASELINES)
def test_each_baseline_trains_exactly_its_parameters_and_nothing_else_moves(kind, name, points):
    model = baseline(kind, name)
    assert set(trainable(model)) == expected_trainable(kind, name)
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable(model).values())
    if kind == "embedder-only":
        assert len(model.base_model.backbone_spec.blocks) == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):  # LoRA's A gets its first gradient once B is no longer zero
        model(points=points, labels=torch.tensor([0, 1, 2])).loss.backward()
        assert all(p.grad is not None for p in trainable(model).values())
        optimizer.step()
        optimizer.zero_grad()

    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    if kind == "lora":
        assert all(not torch.equal(after[n], before[n]) for n in after if ".lora_" in n)
    if kind == "full":
        weights = [n for n in after if after[n].requires_grad and ".any2point." not in n and n.endswith("weight")]
        assert weights and all(not torch.equal(after[n], before[n]) for n in weights)


def test_embedder_only_runs_the_tokens_straight_to_the_norm_and_head(points):
    model = baseline("embedder-only").eval()
    tuner = model.base_model
    modules, spec, config = tuner.any2point["default"], tuner.backbone_spec, tuner.peft_config["default"]
    with torch.no_grad():
        tokens, centres = modules.embedder(points)
        position, _ = tuner._position_encoding(modules, config, centres)
        cls_token = (modules.cls_token + spec.cls_position).expand(len(points), -1, -1)
        hidden = spec.input_norm(torch.cat([cls_token, tokens + position], dim=1))
        expected = modules.head(modules.norm(hidden))
        torch.testing.assert_close(model(points=points).logits, expected, rtol=0, atol=1e-6)


def test_a_baseline_refuses_a_model_with_adapters():
    with pytest.raises(ValueError, match=r"build it from Any2PointConfig\(use_adapter=False\)"):
        make_baseline(get_peft_model(make_backbone("bert"), tiny_config()), "lora")


@pytest.mark.parametrize("kind", BASELINES)
def test_a_baseline_checkpoint_restores_everything_that_trains(kind, points, tmp_path):
    accelerator = Accelerator(cpu=True)

    def setup(seed: int) -> tuple[PeftModel, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        model = baseline(kind, seed=seed)
        optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
        return model, optimizer, get_cosine_schedule_with_warmup(optimizer, 1, 10)

    model, optimizer, scheduler = setup(seed=0)
    model(points=points, labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    generator = torch.Generator()
    path = save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=1), [])

    fresh, fresh_optimizer, fresh_scheduler = setup(seed=1)
    load_checkpoint(path, accelerator, fresh, fresh_optimizer, fresh_scheduler, generator)
    restored = trainable(fresh)
    assert restored.keys() == trainable(model).keys()
    assert all(torch.equal(restored[n], p) for n, p in trainable(model).items())
    with pytest.raises(ValueError, match="trainable state does not fit the model"):  # nor into another tuning
        load_trainable_state(get_peft_model(make_backbone("bert"), tiny_config()), path / TRAINABLE_FILE)


@pytest.mark.parametrize("kind", BASELINES)
def test_a_training_run_saves_what_trained_and_counts_it(kind, backbone_dir, tmp_path):
    eval_file = tmp_path / "evaluated" / "eval_results.json"
    results = load_script(TRAIN).main(
        [
            "--model_name_or_path", str(backbone_dir), *DATA_ARGS, "--max_train_samples", "16", *MODEL_ARGS,
            "--num_epochs", "1", "--batch_size", "8", "--tuning", kind, "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert not (tmp_path / "adapter_model.safetensors").exists()
    saved = load_file(tmp_path / WEIGHTS_FILE)
    assert json.loads((tmp_path / "results.json").read_text())["recipe"]["tuning"] == kind
    assert results["adapter_bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size

    # The same model built by hand, with the saved weights loaded: exactly its trainable parameters, and the run's
    # last evaluation reproduced from them.
    model = get_peft_model(
        transformers.AutoModel.from_pretrained(backbone_dir, attn_implementation="eager"),
        Any2PointConfig(**SCRIPT_CONFIG, use_adapter=False),
    )
    make_baseline(model, kind)
    assert results["trainable_params"] == sum(p.numel() for p in trainable(model).values())
    assert results["trainable_params"] == sum(t.numel() for t in saved.values())
    load_trainable_state(model, tmp_path / WEIGHTS_FILE)
    assert saved.keys() == trainable(model).keys()
    assert all(torch.equal(saved[n], p) for n, p in trainable(model).items())
    test = load_split("synthetic", "test", num_points=64, max_samples=16, seed=42)[:]
    with torch.no_grad():
        loss = model.eval()(points=test["points"], labels=test["labels"]).loss
    assert loss.item() == pytest.approx(results["test_metrics"]["loss"], rel=1e-5)

    # The evaluation script rebuilds the run from its folder alone and scores the same clouds the same way.
    evaluated = load_script(EVALUATE).main(
        ["--adapter_path", str(tmp_path), *DATA_ARGS[:4], "--max_eval_samples", "16", "--output_file", str(eval_file)]
    )
    assert evaluated["base_model"] == str(backbone_dir)
    assert evaluated["accuracy"] == results["test_metrics"]["accuracy"]
    assert evaluated["loss"] == pytest.approx(results["test_metrics"]["loss"], rel=1e-5)


def test_evaluating_a_baseline_run_without_its_results_file_names_what_is_missing(tmp_path):
    model = baseline("lora")
    save_trainable_state(model, tmp_path / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=f"baseline's {WEIGHTS_FILE} but no results.json"):
        load_trained_model(str(tmp_path))


def test_the_ablation_variants_are_valid_training_flags():
    train = load_script(TRAIN)
    tunings = {train.parse_args(flags).tuning for _, flags in VARIANTS.values()}
    assert tunings == {"any2point", *BASELINES}


def test_a_baseline_cannot_be_pushed_as_an_adapter(capsys):
    with pytest.raises(SystemExit):
        load_script(TRAIN).parse_args(["--tuning", "lora", "--push_to_hub"])
    assert "--tuning lora is a baseline" in capsys.readouterr().err


def test_the_backbone_learning_rate_applies_to_the_blocks_only(backbone_dir, tmp_path):
    load_script(TRAIN).main(
        [
            "--model_name_or_path", str(backbone_dir), *DATA_ARGS, "--max_train_samples", "16", *MODEL_ARGS,
            "--num_epochs", "1", "--batch_size", "8", "--tuning", "full", "--backbone_learning_rate", "0",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    saved = load_file(tmp_path / WEIGHTS_FILE)
    original = dict(transformers.AutoModel.from_pretrained(backbone_dir).named_parameters())
    blocks = {name: tensor for name, tensor in saved.items() if name.startswith("base_model.model.")}
    assert blocks and all(torch.equal(t, original[n.removeprefix("base_model.model.")]) for n, t in blocks.items())
    embedder = saved["base_model.any2point.default.embedder.to_hidden.weight"]
    torch.manual_seed(42)  # the training script's seed: the same initial embedder
    fresh = get_peft_model(transformers.AutoModel.from_pretrained(backbone_dir), Any2PointConfig(**SCRIPT_CONFIG))
    assert not torch.equal(embedder, fresh.base_model.any2point["default"].embedder.to_hidden.weight)
