"""The scaling benchmark: one child process per configuration, the rows it reports and the files it writes."""

from __future__ import annotations

import json

from benchmarks import bench_scaling


def test_sweeps_points_then_batch_sizes_and_reports_each_child(tmp_path):
    sweep = ["--points", "64", "128", "--batch_size", "2", "--batch_sizes", "2", "4", "--compile_embedder", "no"]
    rows = bench_scaling.main(["--backbone", "tiny", *sweep, "--steps", "1", "--output_dir", str(tmp_path)])
    assert [(r["num_points"], r["batch_size"]) for r in rows] == [(64, 2), (128, 2), (64, 4)]
    for row in rows:
        assert row["samples_per_second"] == row["batch_size"] / row["seconds_per_step"]
        assert row["peak_memory_mib"] > 0
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"] == rows
    table = (tmp_path / "scaling.md").read_text()
    assert "| 128 | 2 |" in table and "| 64 | 4 |" in table


def test_pure_torch_children_do_not_see_torch_cluster(tmp_path):
    """`--knn_backend torch` times what an installation without torch-cluster runs, whether or not it is here."""
    sweep = ["--points", "1024", "--batch_size", "1", "--batch_sizes", "1", "--compile_embedder", "no"]
    argv = ["--backbone", "tiny", *sweep, "--steps", "1", "--knn_backend", "torch", "--output_dir", str(tmp_path)]
    (row,) = bench_scaling.main(argv)
    # The tiny config's two stages: 1024 -> 32 centres, then 32 -> 16; the first is the pruned torch search.
    assert [stage.split("knn ")[1] for stage in row["geometry_backends"]] == ["torch", "torch"]
    assert "torch-cluster hidden" in (tmp_path / "scaling.md").read_text()
