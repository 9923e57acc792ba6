"""bench_train_script on a tiny random BERT and the synthetic shapes: runs in turns, medians from metrics.jsonl."""

from __future__ import annotations

import json
import shlex
import statistics

import pytest

from benchmarks import bench_train_script


def test_each_setting_runs_and_later_epochs_are_summarised(backbone_dir, tmp_path):
    common = (
        f"--model_name_or_path {backbone_dir} --dataset synthetic --num_points 64 --max_train_samples 16 "
        "--max_eval_samples 8 --num_epochs 2 --batch_size 8 --num_tokens 16 --num_stages 2 --stage_widths 16 24 "
        "--num_neighbors 8"
    )
    settings = ["--keep_freed_memory yes", "--keep_freed_memory no"]
    argv = ["--common", common, "--settings", *settings, "--rounds", "1", "--output_dir", str(tmp_path)]
    result = bench_train_script.main(argv)
    assert [row["setting"] for row in result["rows"]] == settings
    for row in result["rows"]:
        assert row["runs"] == 1 and row["epochs_per_run"] == 2
        later = [run[1]["train_samples_per_second"] for run in row["epochs"]]  # epoch 1 (compiling) left out
        assert row["train_clouds_per_s"] == pytest.approx(statistics.median(later))
        assert row["train_clouds_per_s_range"] == [min(later), max(later)]
        assert row["final_test_accuracy"] == [run[-1]["test_accuracy"] for run in row["epochs"]]
    # The allocator setting changes speed only: the same seed trains the same model.
    assert result["rows"][0]["final_test_accuracy"] == result["rows"][1]["final_test_accuracy"]
    assert shlex.split(result["common"]) == shlex.split(common)
    saved = json.loads((tmp_path / "train_script.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    report = (tmp_path / "train_script.md").read_text()
    assert "| `--keep_freed_memory no` |" in report
