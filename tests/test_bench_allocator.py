"""bench_allocator at tiny sizes: both allocator settings in processes of their own, in turns, and reported."""

from __future__ import annotations

import json
import platform

import pytest

from benchmarks import bench_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only")
def test_each_step_is_timed_under_both_settings_and_reported(tmp_path):
    argv = ["--backbone", "tiny", "--batch_size", "2", "--num_points", "64", "--num_tokens", "16", "--compile", "no"]
    result = bench_allocator.main([*argv, "--rounds", "2", "--steps_per_block", "1", "--output_dir", str(tmp_path)])
    rows = {(row["step"], row["allocator"]): row for row in result["rows"]}
    steps = [f"{name} {mode}" for name, mode in bench_allocator.STEPS]
    assert sorted(rows) == sorted((step, setting) for step in steps for setting in bench_allocator.SETTINGS)
    for (step, _), row in rows.items():
        assert len(row["blocks"]) == 2
        assert row["clouds_per_s"] == pytest.approx(2 / row["step_ms"] * 1e3)
        default = rows[step, "glibc default"]
        assert row["time_vs_default"] == pytest.approx(row["step_ms"] / default["step_ms"])
        assert row["resident_mib"] > 0
    for step in steps:  # the kept side never maps fresh pages once warmed up
        assert rows[step, "keep_freed_memory"]["page_faults"] <= rows[step, "glibc default"]["page_faults"]
    saved = json.loads((tmp_path / "allocator.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    report = (tmp_path / "allocator.md").read_text()
    assert report.count("| keep_freed_memory |") == len(steps) and "1.00×" in report
