"""CPU steps under glibc's default handling of large allocations against `keep_freed_memory()`, in turns.

The setting is process-wide and cannot be undone, so each side runs in a process of its own: both build the same
model as CPU training builds it (eager attention, compiled embedder pooling and blocks unless `--compile no`) and bench_speed's bf16
steps (Any2Point training and inference, the bare backbone's training), then take turns at timed blocks of each
step, `--rounds` times, so that the VM's drifting speed falls on both alike. Every block also records its minor page
faults and kernel and user CPU time (`getrusage`), after the warm-up, so the default's figures are its steady state.
Needs glibc. `python -m benchmarks.bench_allocator` writes `results/allocator.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_speed import add_step_arguments, cpu_training_model, make_steps
from benchmarks.reporting import cpu_name, write_report
from peft_any2point.allocator import keep_freed_memory


RESULTS = Path(__file__).parent / "results"
SETTINGS = ("glibc default", "keep_freed_memory")
STEPS = (("any2point", "train"), ("any2point", "inference"), ("bare", "train"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--steps_per_block", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile", default="yes", choices=("yes", "no"), help="compile pooling and blocks, as CPU training does"
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="allocator")
    return parser.parse_args(argv)


def build_steps(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    torch.set_num_threads(args.threads)
    model, backbone, config = cpu_training_model(args, args.compile == "yes", args.compile == "yes")
    steps = make_steps(model, backbone, config, args)
    return {f"{name} {mode}": steps[name, mode, "bf16"] for name, mode in STEPS}


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def timed_block(step: Callable[[], object], steps: int) -> dict[str, float]:
    """Wall, kernel and user seconds and minor page faults per step over `steps` steps, and memory after them."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_s": seconds / steps,
        "system_s": (after.ru_stime - before.ru_stime) / steps,
        "user_s": (after.ru_utime - before.ru_utime) / steps,
        "page_faults": (after.ru_minflt - before.ru_minflt) / steps,
        "resident_mib": resident_mib(),
    }


def worker(connection: Connection, setting: str, args: argparse.Namespace) -> None:
    """Build the steps under `setting`, warm them up, then run the blocks the parent asks for until it sends None."""
    if setting == "keep_freed_memory" and not keep_freed_memory():
        raise RuntimeError("keep_freed_memory() needs glibc")
    steps = build_steps(args)
    for step in steps.values():  # compiling, and the default's mmap threshold adapting
        for _ in range(2):
            step()
    connection.send("ready")
    while (name := connection.recv()) is not None:
        connection.send(timed_block(steps[name], args.steps_per_block))


def measure(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Blocks of every (step, setting), the two worker processes taking turns."""
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads are running
    connections, processes = {}, []
    for setting in SETTINGS:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=worker, args=(child_end, setting, args))
        process.start()
        connections[setting], processes = parent_end, [*processes, process]
    for connection in connections.values():
        connection.recv()
    blocks: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, mode in STEPS:
            for setting, connection in connections.items():
                connection.send(f"{name} {mode}")
                blocks.setdefault((f"{name} {mode}", setting), []).append(connection.recv())
    for connection in connections.values():
        connection.send(None)
    for process in processes:
        process.join()
    return blocks


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU steps under glibc's default allocator settings and under `keep_freed_memory()`, each in a process of "
        f"its own, on {result['machine']} ({result['threads']} threads), torch {result['torch']}, {result['backbone']}, "
        f"B={result['batch_size']}, {result['num_points']} points, {result['num_tokens']} tokens, bf16, eager "
        f"attention, embedder pooling and blocks compiled: {result['compile']}; {result['rounds']} interleaved rounds of "
        f"{result['steps_per_block']} steps after 2 warm-up steps, {result['date']}. ms/step: median over the rounds; "
        f"page faults and kernel and user CPU time (getrusage): mean per step; resident memory after the last block.",
        "",
        "| step | allocator | ms/step | clouds/s | vs default | page faults/step | kernel s/step | user s/step | "
        "resident MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['step']} | {row['allocator']} | {row['step_ms']:.1f} | {row['clouds_per_s']:.1f} | "
            f"{row['time_vs_default']:.2f}× | {row['page_faults']:,.0f} | {row['system_s']:.3f} | "
            f"{row['user_s']:.3f} | {row['resident_mib']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    blocks = measure(args)
    rows = []
    for (step, setting), runs in blocks.items():
        median = statistics.median(run["step_s"] for run in runs)
        default = statistics.median(run["step_s"] for run in blocks[step, SETTINGS[0]])
        rows.append(
            {
                "step": step,
                "allocator": setting,
                "step_ms": median * 1e3,
                "clouds_per_s": args.batch_size / median,
                "time_vs_default": median / default,
                **{key: statistics.mean(run[key] for run in runs) for key in ("page_faults", "system_s", "user_s")},
                "resident_mib": runs[-1]["resident_mib"],
                "blocks": runs,
            }
        )
    result = {
        "machine": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "num_points": args.num_points,
        "num_tokens": args.num_tokens,
        "compile": args.compile,
        "rounds": args.rounds,
        "steps_per_block": args.steps_per_block,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    write_report(args.output_dir, args.stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
