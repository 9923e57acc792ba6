"""bench_compile at tiny sizes: both variants timed, in turns, and reported."""

from __future__ import annotations

import json

from benchmarks import bench_compile


def test_both_variants_are_timed_and_reported_against_eager(tmp_path):
    argv = [
        "--backbone",
        "tiny",
        "--batch_size",
        "2",
        "--num_points",
        "64",
        "--num_tokens",
        "16",
        "--compile_embedder",
        "no",
    ]
    result = bench_compile.main([*argv, "--min_run_time", "0.2", "--rounds", "2", "--output_dir", str(tmp_path)])
    variants = result["variants"]
    assert list(variants) == ["eager", "compiled"]
    for row in variants.values():
        assert row["timed_steps"] >= 2  # at least one step per round
        assert row["clouds_per_s"] == 2 / row["step_s"]
        assert row["first_steps_s"] > 0
    saved = json.loads((tmp_path / "compile_blocks.json").read_text())
    assert saved["variants"]["compiled"]["step_s"] == variants["compiled"]["step_s"]
    report = (tmp_path / "compile_blocks.md").read_text()
    assert "| eager |" in report and "1.00×" in report
    ratio = variants["compiled"]["step_s"] / variants["eager"]["step_s"]
    assert f"{ratio:.2f}×" in report
