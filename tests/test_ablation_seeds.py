"""Ablations over seeds: per-seed values, means and gaps paired by seed, and runs that cannot be combined."""

from __future__ import annotations

import json

import pytest

from benchmarks import ablation_seeds


RECIPE = ["--num_points", "512"]


STOPPED = {"reason": "representation collapse", "step": 71, "feature_spread": 0.0007}


def write_run(folder, seed, accuracies, num_epochs=10, recipe=RECIPE):
    """An ablations.json as bench_ablations writes it: {variant: (OA, mAcc)}, or {variant: None} for a stopped run."""
    rows = [
        {"variant": variant, "description": f"{variant} flags", "stopped": STOPPED}
        if values is None
        else {
            "variant": variant,
            "description": f"{variant} flags",
            "overall_accuracy": values[0],
            "mean_class_accuracy": values[1],
            "trainable_params": 1000 + index,
        }
        for index, (variant, values) in enumerate(accuracies.items())
    ]
    meta = {"seed": seed, "num_epochs": num_epochs, "recipe": recipe}
    folder.mkdir()
    (folder / "ablations.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    return folder


def test_means_and_gaps_are_paired_by_seed(tmp_path):
    first = write_run(tmp_path / "a", 42, {"full": (0.85, 0.78), "lora": (0.86, 0.80), "no-pe": (0.84, 0.77)})
    second = write_run(tmp_path / "b", 43, {"full": (0.87, 0.80), "lora": (0.87, 0.82)})
    rows = ablation_seeds.main([str(first), str(second), "--output_dir", str(tmp_path / "out")])
    by_variant = {row["variant"]: row for row in rows}
    assert list(by_variant) == ["full", "lora", "no-pe"]
    lora = by_variant["lora"]
    assert lora["overall_accuracy"] == {"42": 0.86, "43": 0.87}
    assert lora["mean_overall_accuracy"] == pytest.approx(0.865)
    assert lora["overall_gap_to_reference"] == pytest.approx(((0.86 - 0.85) + (0.87 - 0.87)) / 2)
    assert lora["mean_class_gap_to_reference"] == pytest.approx(((0.80 - 0.78) + (0.82 - 0.80)) / 2)
    no_pe = by_variant["no-pe"]  # only seed 42 ran it: its gap uses seed 42's Any2Point alone
    assert no_pe["seeds"] == [42] and no_pe["overall_gap_to_reference"] == pytest.approx(0.84 - 0.85)
    assert by_variant["full"]["overall_gap_to_reference"] == 0.0

    written = json.loads((tmp_path / "out" / "ablations_seeds.json").read_text())
    assert written["rows"] == rows and written["meta"]["seeds"] == [42, 43]
    table = (tmp_path / "out" / "ablations_seeds.md").read_text()
    assert "| lora | lora flags | 86.0 (42), 87.0 (43) | 86.5 | 81.0 | +0.5 | +2.0 | 1,001 |" in table
    assert (tmp_path / "out" / "ablations_seeds.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_stopped_early_is_listed_but_left_out_of_means_and_gaps(tmp_path):
    first = write_run(tmp_path / "a", 42, {"full": (0.85, 0.78), "no-adapter": (0.84, 0.79)})
    second = write_run(tmp_path / "b", 43, {"full": (0.87, 0.80), "no-adapter": None, "no-pe": None})
    rows = ablation_seeds.main([str(first), str(second), "--output_dir", str(tmp_path / "out")])
    by_variant = {row["variant"]: row for row in rows}
    no_adapter = by_variant["no-adapter"]
    assert no_adapter["seeds"] == [42, 43] and no_adapter["stopped"] == {"43": STOPPED}
    assert no_adapter["overall_accuracy"] == {"42": 0.84} and no_adapter["mean_overall_accuracy"] == 0.84
    assert no_adapter["paired_seeds"] == [42]
    assert no_adapter["overall_gap_to_reference"] == pytest.approx(0.84 - 0.85)
    no_pe = by_variant["no-pe"]  # stopped with the only seed that ran it
    assert no_pe["overall_accuracy"] == {} and no_pe["mean_overall_accuracy"] is None
    assert no_pe["overall_gap_to_reference"] is None and no_pe["trainable_params"] is None
    table = (tmp_path / "out" / "ablations_seeds.md").read_text()
    assert (
        "| 84.0 (42), stopped at step 71: representation collapse (43) | 84.0 | 79.0 | -1.0 | +1.0 | 1,001 |" in table
    )
    assert "| no-pe | no-pe flags | stopped at step 71: representation collapse (43) | — | — | — | — | — |" in table
    assert (tmp_path / "out" / "ablations_seeds.png").read_bytes().startswith(b"\x89PNG")


def test_runs_must_differ_only_by_seed(tmp_path):
    first = write_run(tmp_path / "a", 42, {"full": (0.85, 0.78)})
    same_seed = write_run(tmp_path / "b", 42, {"full": (0.86, 0.79)})
    with pytest.raises(ValueError, match="seed of its own"):
        ablation_seeds.load_runs([first, same_seed])
    other_budget = write_run(tmp_path / "c", 43, {"full": (0.86, 0.79)}, num_epochs=3)
    with pytest.raises(ValueError, match="differ in 'num_epochs'"):
        ablation_seeds.load_runs([first, other_budget])
