"""The GPU step profiler, run on the CPU at tiny sizes: its timings, its capture by part and its report."""

from __future__ import annotations

import json

import torch

from benchmarks import profile_train_step
from peft_any2point.embedder import PointEmbedder
from peft_any2point.model import Any2PointModel


def test_profile_reports_each_part_once_per_call_and_writes_its_report(tmp_path):
    argv = ["--backbone", "tiny", "--batch_sizes", "2", "--num_points", "64", "--num_tokens", "16"]
    result = profile_train_step.main([*argv, "--steps", "2", "--profile_steps", "2", "--output_dir", str(tmp_path)])
    row = result["batches"][0]
    assert row["batch_size"] == 2
    assert 0 < row["host_issue_ms"] <= row["step_ms"]  # the host issues the step before the device has finished it
    assert row["clouds_per_s"] == 1e3 * 2 / row["step_ms"]
    assert row["bare"]["step_ms"] > 0
    parts = row["profile"]["parts_forward"]
    # Per step: one embedder and head, one block and one adapter per layer of the 2-layer backbone.
    assert {name: part["calls_per_step"] for name, part in parts.items()} == {
        "embedder": 1,
        "blocks": 2,
        "adapters": 2,
        "head": 1,
    }
    assert all(part["host_ms"] > 0 for part in parts.values())
    assert row["profile"]["kernels_per_step"] == 0  # no device kernels on the CPU
    saved = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
    assert saved["batches"][0]["step_ms"] == row["step_ms"]
    report = (tmp_path / "profile_cpu_tiny.md").read_text()
    assert "| 2 |" in report and "| embedder | 1 |" in report


def test_bare_step_runs_the_blocks_without_dropout_and_restores_train_mode():
    args = profile_train_step.parse_args(["--backbone", "tiny", "--num_tokens", "16"])
    model, backbone = profile_train_step.build(args, torch.device("cpu"))
    model.train()  # as the training step leaves it
    dropouts = [module for module in backbone.modules() if isinstance(module, torch.nn.Dropout)]
    seen = []
    hooks = [module.register_forward_hook(lambda m, i, o: seen.append(m.training)) for module in dropouts]
    profile_train_step.make_bare_step(backbone, 2, args, torch.device("cpu"))()
    for hook in hooks:
        hook.remove()
    assert seen and not any(seen)
    assert all(module.training for module in dropouts)


def test_compile_mode_reaches_every_compiled_region_and_names_the_report(tmp_path, monkeypatch):
    received = []
    monkeypatch.setattr(Any2PointModel, "compile_blocks", lambda self, **options: received.append(("blocks", options)))
    monkeypatch.setattr(
        PointEmbedder, "compile_pooling", lambda self, **options: received.append(("pooling", options))
    )
    argv = ["--backbone", "tiny", "--batch_sizes", "2", "--num_points", "64", "--num_tokens", "16", "--steps", "1"]
    argv += ["--profile_steps", "1", "--compile", "regions", "--compile_mode", "reduce-overhead"]
    profile_train_step.main([*argv, "--output_dir", str(tmp_path)])
    assert received == [("blocks", {"mode": "reduce-overhead"}), ("pooling", {"mode": "reduce-overhead"})]
    saved = json.loads((tmp_path / "profile_cpu_tiny_compiled_regions_reduce_overhead.json").read_text())
    assert (saved["compiled"], saved["compile_mode"]) == ("regions", "reduce-overhead")
    assert (
        "compiled: regions, mode reduce-overhead"
        in (tmp_path / "profile_cpu_tiny_compiled_regions_reduce_overhead.md").read_text()
    )
