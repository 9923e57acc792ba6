"""Any2Point's training step with its backbone blocks and adapters eager against compiled (`compile_blocks`), in turns.

Two models with the same weights, both with the embedder's pooling compiled as training does from 1024 points on the
CPU (`--compile_embedder`); one of them also gets `compile_blocks()`. Their bf16 training steps (forward, backward, AdamW) take turns,
`--rounds` times, so that the VM's drifting speed falls on both alike. The first two steps of each, which include
compiling, are timed apart. `python -m benchmarks.bench_compile` writes `results/compile_blocks.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_speed import (
    add_compile_embedder_argument,
    add_keep_memory_argument,
    add_step_arguments,
    cpu_training_model,
    train_step,
)
from benchmarks.reporting import cpu_name, write_report
from benchmarks.timing import interleaved_median
from peft_any2point.allocator import keep_freed_memory


RESULTS = Path(__file__).parent / "results"
VARIANTS = ("eager", "compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--min_run_time", type=float, default=16.0, help="seconds of timing per variant")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    add_compile_embedder_argument(parser)
    add_keep_memory_argument(parser)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="compile_blocks")
    return parser.parse_args(argv)


def make_step(variant: str, args: argparse.Namespace) -> Callable[[], object]:
    """bench_speed's bf16 training step of a fresh model, its blocks and adapters compiled in the "compiled" variant."""
    model, _, _ = cpu_training_model(args, args.compile_embedder == "yes", variant == "compiled")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(args.batch_size, args.num_points, 3, generator=generator) * 2 - 1
    labels = torch.randint(0, 40, (args.batch_size,), generator=generator)
    return lambda: train_step(lambda: model(points=points, labels=labels).loss, optimizer, "bf16")


def markdown(result: dict[str, Any]) -> str:
    eager = result["variants"]["eager"]["step_s"]
    lines = [
        f"Any2Point bf16 training step on {result['machine']} ({result['threads']} threads), {result['backbone']}, "
        f"B={result['batch_size']}, {result['num_points']} points, {result['num_tokens']} tokens, embedder pooling "
        f"compiled in both: {result['compile_embedder']}, freed memory kept: "
        f"{'yes' if result.get('keep_freed_memory') else 'no'}; median of {result['rounds']} interleaved rounds, "
        f"{result['date']}.",
        "",
        "| blocks and adapters | first two steps (compiling) | step | clouds/s | step vs eager |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {row['first_steps_s']:.1f} s | {row['step_s']:.3f} s | {row['clouds_per_s']:.1f} "
            f"| {row['step_s'] / eager:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory == "yes" and keep_freed_memory()
    steps, first = {}, {}
    for variant in VARIANTS:
        steps[variant] = make_step(variant, args)
        start = time.perf_counter()
        steps[variant]()
        steps[variant]()
        first[variant] = time.perf_counter() - start
    times = interleaved_median(steps, args.min_run_time, args.rounds, args.threads)
    result = {
        "machine": cpu_name(),
        "threads": args.threads,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "num_points": args.num_points,
        "num_tokens": args.num_tokens,
        "rounds": args.rounds,
        "compile_embedder": args.compile_embedder,
        "keep_freed_memory": kept,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "variants": {
            name: {
                "first_steps_s": first[name],
                "step_s": seconds,
                "timed_steps": count,
                "clouds_per_s": args.batch_size / seconds,
            }
            for name, (seconds, count) in times.items()
        },
    }
    write_report(args.output_dir, args.stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
