"""The speed benchmark in its quick mode on a tiny random BERT: the report it writes, and its FLOP and parameter counts
checked against closed-form counts. No wall-clock thresholds: the cores are shared."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

from benchmarks import bench_speed
from peft_any2point import Any2PointConfig
from peft_any2point.ops import available_backends


BERT_BASE_PARAMETERS = 109_482_240  # BertModel(BertConfig()): bert-base-uncased with its pooler


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    try:
        bench_speed.main(
            [
                "--quick",
                "--backbone",
                "tiny",
                "--output_dir",
                str(out),
                "--min_run_time",
                "0.05",
                "--matmul_size",
                "256",
                "--threads",
                "1",
                "--compile_embedder",
                "no",  # compiling takes longer than the quick run; the slow embedder test checks it
            ]
        )
    finally:
        torch.set_num_threads(threads)  # main sets the process-wide thread count
    return out


@pytest.fixture(scope="module")
def result(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "speed_quick.json").read_text())


def bert_flops(batch: int, seq: int, train: bool) -> int:
    """Matmul FLOPs of the tiny BERT on (batch, seq) input embeddings, from its shapes.

    Per layer: Q, K, V and output projections, two FFN matmuls, and QK^T + AV (4·B·S²·D over all heads); the
    pooler maps the class token. A frozen training step adds the input gradients only: each projection once more,
    attention twice more (four matmuls); the pooler gets no gradient, as the loss reads the last hidden states.
    """
    hidden, layers, inner = (
        bench_speed.TINY_BERT[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")
    )
    linear = 2 * batch * seq * (4 * hidden * hidden + 2 * hidden * inner)
    attention = 4 * batch * seq * seq * hidden
    forward = layers * (linear + attention) + 2 * batch * hidden * hidden
    return forward + layers * (linear + 2 * attention) if train else forward


def test_linear_flops_are_2mnk() -> None:
    m, k, n = 7, 5, 3
    layer = nn.Linear(k, n)
    assert bench_speed.count_flops(lambda: layer(torch.randn(m, k))) == 2 * m * n * k


def test_cpu_attention_flops_are_counted() -> None:
    batch, heads, seq, dim = 2, 3, 8, 4
    q = torch.randn(batch, heads, seq, dim, requires_grad=True)
    forward = 4 * batch * heads * seq * seq * dim  # QK^T and AV
    with torch.no_grad():
        assert bench_speed.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q)) == forward
    # backward, flash-style: recompute QK^T, then the gradients of the scores, V, Q and K (five matmuls of that size)
    assert bench_speed.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()) == (
        forward + 5 * forward // 2
    )


def test_bare_backbone_flops_match_closed_form(result: dict[str, Any]) -> None:
    meta = result["meta"]
    seq = 1 + meta["num_tokens"]
    for row in result["steps"]:
        if row["model"] == "bare":
            assert row["flops"] == bert_flops(meta["batch_size"], seq, row["mode"] == "train"), row


def test_report_has_every_step_with_consistent_numbers(result: dict[str, Any], output_dir: Path) -> None:
    steps = {(r["model"], r["mode"], r["precision"]): r for r in result["steps"]}
    assert set(steps) == {
        (m, mode, p) for m in ("bare", "any2point") for mode in ("inference", "train") for p in ("fp32", "bf16")
    }
    batch = result["meta"]["batch_size"]
    for (model, mode, precision), row in steps.items():
        assert row["median_ms"] > 0 and row["runs"] >= 1
        assert math.isclose(row["samples_per_s"], batch / row["median_ms"] * 1e3)
        peak = result["peak"][precision]["gflops"]
        assert math.isclose(row["fraction_of_peak"], row["flops"] / row["median_ms"] / 1e6 / peak)
        if model == "any2point":
            bare = steps["bare", mode, precision]
            assert math.isclose(row["throughput_vs_bare"], row["samples_per_s"] / bare["samples_per_s"])
            # Any2Point runs the same blocks (no pooler) plus embedder, adapters and head.
            assert row["flops"] > bare["flops"] - 2 * batch * bench_speed.TINY_BERT["hidden_size"] ** 2
    assert steps["any2point", "train", "fp32"]["flops"] > steps["any2point", "inference", "fp32"]["flops"]
    assert all(p["gflops"] > 0 for p in result["peak"].values())
    assert "| any2point | train | bf16 |" in (output_dir / "speed_quick.md").read_text()


def test_breakdown_covers_the_whole_step(result: dict[str, Any]) -> None:
    assert set(result["breakdown"]) == {"inference fp32", "inference bf16", "train fp32", "train bf16"}
    for kind, breakdown in result["breakdown"].items():
        parts = breakdown["parts"]
        assert math.isclose(sum(p["share"] for p in parts.values()), 1.0), kind
        assert math.isclose(sum(p["ms"] for p in parts.values()), breakdown["step_ms"]), kind
        for name in ("embedder: layers", "embedder: FPS", "embedder: kNN", "backbone blocks", "adapters", "head"):
            assert parts[name]["forward_ms"] > 0, (kind, name)
        if kind.startswith("train"):
            for name in ("embedder: layers", "backbone blocks", "adapters", "head"):
                assert parts[name]["backward_ms"] > 0, (kind, name)
            assert parts["optimizer"]["ms"] > 0
        else:
            assert parts["optimizer"]["ms"] == 0 and parts["backbone blocks"]["backward_ms"] == 0


def test_parameter_counts(result: dict[str, Any]) -> None:
    tiny_total = sum(p.numel() for p in BertModel(BertConfig(**bench_speed.TINY_BERT)).parameters())
    expected_backbone = {"tiny": tiny_total, "bert-base (random, 768×12)": BERT_BASE_PARAMETERS}
    for name, counts in result["parameters"].items():
        assert counts["total"] - counts["trainable"] == expected_backbone[name]
        assert counts["trainable"] == sum(counts["trainable_by_part"].values())
        assert counts["total_without_word_embeddings"] == counts["total"] - counts["word_embeddings"]
        # fp32 tensors plus a safetensors header of names and shapes
        assert 4 * counts["trainable"] < counts["adapter_file_bytes"] < 4 * counts["trainable"] + 2**16


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_bare_and_any2point_training_steps_run_the_blocks_in_the_same_dropout_mode(backbone_dropout: bool) -> None:
    backbone = bench_speed.build_backbone("tiny")
    config = Any2PointConfig(num_labels=40, num_tokens=16, backbone_dropout=backbone_dropout)
    peft_model = get_peft_model(backbone, config)
    args = bench_speed.parse_args(["--quick", "--backbone", "tiny", "--num_points", "64", "--batch_size", "2"])
    steps = bench_speed.make_steps(peft_model, backbone, config, args)
    dropout_modes: dict[str, set[bool]] = {"bare": set(), "any2point": set()}
    current = "bare"
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_pre_hook(lambda m, _: dropout_modes[current].add(m.training))
    peft_model.train()
    for current in dropout_modes:
        steps[current, "train", "fp32"]()
    assert dropout_modes == {"bare": {backbone_dropout}, "any2point": {backbone_dropout}}
    assert backbone.training  # the shared backbone is left in the peft model's mode


def test_report_names_the_geometry_backends_of_every_stage(result: dict[str, Any], output_dir: Path) -> None:
    meta = result["meta"]
    stages = meta["geometry_backends"]
    assert len(stages) == len(Any2PointConfig(num_labels=40).stage_widths)
    sizes = [int(entry.split(" -> ")[0]) for entry in stages]
    assert sizes[0] == meta["num_points"] and sizes == sorted(sizes, reverse=True)
    installed = available_backends("cpu")
    for entry in stages:
        fps, knn = entry.split(": ")[1].split(", ")
        assert fps.removeprefix("fps ") in installed["fps"] and knn.removeprefix("knn ") in installed["knn"]
    assert "; ".join(stages) in (output_dir / "speed_quick.md").read_text()


def test_report_names_the_embedder_shape_it_timed(result: dict[str, Any], output_dir: Path) -> None:
    defaults = Any2PointConfig(num_labels=40)
    assert (result["meta"]["num_neighbors"], result["meta"]["stage_widths"]) == (
        defaults.num_neighbors,
        defaults.stage_widths,
    )
    expected = f"k={defaults.num_neighbors} neighbours and stage widths {defaults.stage_widths}"
    assert expected in (output_dir / "speed_quick.md").read_text()


def test_embedder_flags_reach_the_timed_model() -> None:
    args = bench_speed.parse_args(
        ["--quick", "--backbone", "tiny", "--num_neighbors", "8", "--stage_widths", "8", "16", "24"]
    )
    model, _, config = bench_speed.cpu_training_model(args, compile_pooling=False, compile_blocks=False)
    assert (config.num_neighbors, config.stage_widths) == (8, [8, 16, 24])
    embedder = model.base_model.any2point["default"].embedder
    assert [stage.num_neighbors for stage in embedder.stages] == [8, 8, 8]
    default_model, _, _ = bench_speed.cpu_training_model(
        bench_speed.parse_args(["--quick", "--backbone", "tiny"]), compile_pooling=False, compile_blocks=False
    )
    default_embedder = default_model.base_model.any2point["default"].embedder
    assert sum(p.numel() for p in embedder.parameters()) < sum(p.numel() for p in default_embedder.parameters())
    points = torch.rand(2, 256, 3)
    with torch.no_grad():
        assert embedder(points)[0].shape[:2] == (2, args.num_tokens)
