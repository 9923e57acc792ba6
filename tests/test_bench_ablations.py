"""The ablation benchmark: each variant trains with its own switches, and the table reports what each run wrote."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from benchmarks import bench_ablations
from tests.conftest import TINY
from tests.test_examples import DATA_ARGS, MODEL_ARGS


def tiny_recipe(tmp_path) -> list[str]:
    """The ablation recipe cut down to a saved tiny BERT and a few synthetic clouds."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(tmp_path / "base")
    return ["--model_name_or_path", str(tmp_path / "base"), *DATA_ARGS, *MODEL_ARGS, "--batch_size", "8"]


def test_variants_train_with_their_switches_and_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_ablations, "RECIPE", tiny_recipe(tmp_path))
    variants = ["full", "no-adapter", "plain-adapter", "learned-pe"]
    rows = bench_ablations.main(
        ["--variants", *variants, "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path)]
    )

    assert [row["variant"] for row in rows] == variants
    configs = {name: json.loads((tmp_path / "runs" / name / "adapter_config.json").read_text()) for name in variants}
    assert configs["full"]["use_adapter"] and configs["full"]["use_local_guidance"]
    assert not configs["no-adapter"]["use_adapter"]
    assert not configs["plain-adapter"]["use_local_guidance"] and not configs["plain-adapter"]["use_view_ensemble"]
    assert configs["learned-pe"]["projection"] == "learned"
    params = {row["variant"]: row["trainable_params"] for row in rows}
    assert params["no-adapter"] < params["full"] < params["learned-pe"]
    for row in rows:
        results = json.loads((tmp_path / "runs" / row["variant"] / "results.json").read_text())
        assert row["overall_accuracy"] == results["test_metrics"]["accuracy"]
        assert (
            row["adapter_bytes"] == (tmp_path / "runs" / row["variant"] / "adapter_model.safetensors").stat().st_size
        )
        assert row["peak_rss_mib"] > 0 and row["train_samples_per_second"] > 0 and row["eval_samples_per_second"] > 0
        log = (tmp_path / "runs" / row["variant"] / "metrics.jsonl").read_text().splitlines()
        assert row["test_accuracy_per_epoch"] == [json.loads(line)["test_accuracy"] for line in log]
        assert row["test_accuracy_per_epoch"][-1] == row["overall_accuracy"] == results["final_epoch"]["test_accuracy"]
    assert json.loads((tmp_path / "ablations.json").read_text())["rows"] == rows
    table = (tmp_path / "ablations.md").read_text()
    assert all(f"| {name} |" in table for name in variants)
    assert (tmp_path / "ablations.png").read_bytes().startswith(b"\x89PNG")


def test_a_variant_the_training_script_stops_is_reported_as_stopped(tmp_path, monkeypatch):
    # The spread can never reach 2.5 (it is at most 2), so the guard stops the run at its second batch.
    guard = ["--collapse_threshold", "2.5", "--collapse_patience", "2"]
    monkeypatch.setattr(bench_ablations, "RECIPE", [*tiny_recipe(tmp_path), *guard])
    runs = tmp_path / "runs"
    (rows,) = bench_ablations.main(
        ["--variants", "no-adapter", "--runs_dir", str(runs), "--output_dir", str(tmp_path)]
    )

    stopped = json.loads((runs / "no-adapter" / "stopped.json").read_text())
    assert stopped["reason"] == "representation collapse" and stopped["step"] == 2 and stopped["epoch"] == 1
    assert rows == {
        "variant": "no-adapter",
        "description": bench_ablations.VARIANTS["no-adapter"][0],
        "flags": ["--no_adapter"],
        "stopped": stopped,
    }
    assert not (runs / "no-adapter" / "results.json").exists()
    table = (tmp_path / "ablations.md").read_text()
    assert "| stopped: representation collapse at step 2 (feature spread " in table
    assert (tmp_path / "ablations.png").read_bytes().startswith(b"\x89PNG")


def test_update_keeps_the_other_rows_and_refuses_another_budget(tmp_path):
    meta = {"date": "2026-01-01T00:00:00+00:00", "num_epochs": 1, "seed": 42}
    old_rows = [{"variant": "full", "overall_accuracy": 0.1}, {"variant": "lora", "overall_accuracy": 0.2}]
    (tmp_path / "ablations.json").write_text(json.dumps({"meta": meta, "rows": old_rows}))
    new = {"variant": "no-pe", "overall_accuracy": 0.3}
    merged = bench_ablations.merge_rows(tmp_path / "ablations.json", [new], {**meta, "date": "later"})
    assert [row["variant"] for row in merged] == ["full", "no-pe", "lora"]  # VARIANTS order
    assert merged[0] == {**old_rows[0], "measured": meta["date"]} and merged[1] == new
    assert "(measured 2026-01-01" in bench_ablations.when(merged[0]) and bench_ablations.when(new) == ""
    with pytest.raises(ValueError, match="measured with 1 epoch"):
        bench_ablations.merge_rows(tmp_path / "ablations.json", [new], {**meta, "num_epochs": 2})
