"""The kernel benchmark's rows: every op and cloud shape per size, ratios to the row's fastest, the automatic pick."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_kernels
from peft_any2point.ops import available_backends


def test_bench_kernels_times_every_backend_per_op_and_size(tmp_path: Path) -> None:
    argv = ["--sizes", "64", "128", "--batch_size", "2", "--k", "8", "--channels", "4", "--min_run_time", "0.01"]
    bench_kernels.main([*argv, "--rounds", "1", "--output_dir", str(tmp_path)])
    result = json.loads((tmp_path / "kernels.json").read_text())
    rows = result["rows"]
    assert [(row["op"], row["num_points"]) for row in rows] == [
        (op, size) for size in (64, 128) for op in ("fps", "knn", "knn (sphere)", "group")
    ]
    installed = available_backends("cpu")
    for row in rows:
        op = row["op"].split()[0]
        expected = ["torch"] if op == "group" else installed[op]
        assert sorted(row["backends"]) == sorted(expected)
        ratios = [timing["ratio_to_fastest"] for timing in row["backends"].values()]
        assert min(ratios) == 1.0 and all(ratio >= 1.0 for ratio in ratios)
        assert row["auto"] in expected
    table = (tmp_path / "kernels.md").read_text()
    assert table.count("| knn (sphere) |") == 2 and "k=8" in table
