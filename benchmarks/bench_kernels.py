"""Geometry kernel timings: every installed FPS / kNN backend, and gathering, on the same clouds in one run.

FPS keeps N/2 of N points; kNN finds k=32 neighbours of N/2 queries (the FPS centres) among the N points, in a
Gaussian blob and ("knn (sphere)") on the unit sphere, a surface like the scans models see;
"group" gathers (B, N, 64) point features into (B, N/2, 32, 64) neighbour groups, forward + backward.
Each time is the median of `torch.utils.benchmark.Timer` blocks, the backends of a row taking turns;
a ratio is to the fastest backend of its row.
The batch shrinks above `--points-per-run` points in all (default 32 × 4096) so that the 8k and 16k rows
finish on two shared cores: FPS and brute-force kNN cost grows as N², so B=32 at 16k points would take
minutes per backend.

Run `python -m benchmarks.bench_kernels` for `benchmarks/results/kernels.{json,md}` and the table;
`--device cuda` writes `kernels_cuda.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from peft_any2point.io import atomic_write_text
from peft_any2point.ops import (
    available_backends,
    default_backend,
    farthest_point_sampling,
    gather_points,
    knn_indices,
)


RESULTS = Path(__file__).parent / "results"
ALL_BACKENDS = ("torch", "fpsample", "torch_cluster", "triton")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--points_per_run", type=int, default=32 * 4096, help="cap on B × N; B shrinks above it")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64, help="feature width gathered by the group row")
    parser.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timing per backend and size")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns the backends of a row take; the median is over them"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def bench_size(num_points: int, batch: int, args: argparse.Namespace) -> list[dict]:
    """One row per op at this size: each backend's median time."""
    generator = torch.Generator().manual_seed(num_points)
    points = torch.randn(batch, num_points, 3, generator=generator).to(args.device)
    num_centres = num_points // 2
    centres = gather_points(points, farthest_point_sampling(points, num_centres, backend="torch"))  # (B, M, 3)
    neighbours = knn_indices(centres, points, args.k, backend="torch")  # (B, M, k)
    # A surface, like scanned objects, as well as the Gaussian blob: the pruned CPU kNN depends on the shape.
    sphere = torch.nn.functional.normalize(points, dim=-1)
    sphere_centres = gather_points(sphere, farthest_point_sampling(sphere, num_centres, backend="torch"))
    features = torch.randn(batch, num_points, args.channels, generator=generator).to(args.device).requires_grad_()
    backends = available_backends(args.device)

    def group() -> None:
        gather_points(features, neighbours).sum().backward()  # (B, M, k, C) forward, scatter-add backward

    calls = {
        "fps": {
            name: lambda name=name: farthest_point_sampling(points, num_centres, backend=name)
            for name in backends["fps"]
        },
        "knn": {
            name: lambda name=name: knn_indices(centres, points, args.k, backend=name) for name in backends["knn"]
        },
        "knn (sphere)": {
            name: lambda name=name: knn_indices(sphere_centres, sphere, args.k, backend=name)
            for name in backends["knn"]
        },
        "group": {"torch": group},
    }
    rows = []
    for op, by_backend in calls.items():
        seconds = interleaved_median(by_backend, args.min_run_time, args.rounds, torch.get_num_threads())
        times = {name: (median * 1e3, runs) for name, (median, runs) in seconds.items()}
        fastest = min(ms for ms, _ in times.values())
        rows.append(
            {
                "op": op,
                "num_points": num_points,
                "batch": batch,
                "auto": default_backend(op.split()[0], args.device, args.k, num_points) if op != "group" else "torch",
                "backends": {
                    name: {"median_ms": ms, "runs": runs, "ratio_to_fastest": ms / fastest}
                    for name, (ms, runs) in times.items()
                },
            }
        )
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = [
        f"{row['backends'][name]['median_ms']:.1f} ms ({row['backends'][name]['ratio_to_fastest']:.2f}×)"
        if name in row["backends"]
        else "—"
        for name in ALL_BACKENDS
    ]
    return "| " + " | ".join([row["op"], str(row["num_points"]), str(row["batch"]), *cells, row["auto"]]) + " |"


def markdown(rows: list[dict], meta: dict) -> str:
    header = [
        f"Geometry kernels on {meta['device_name']} ({meta['threads']} torch threads, load average {meta['load_average_before']} before the run), "
        f"{meta['date']}. FPS: N → N/2 in a Gaussian blob; kNN: N/2 queries, k={meta['k']}, in the blob and on the unit sphere; group: gather of (B, N/2, k, {meta['channels']}) "
        f"features, forward + backward. Median wall time of {meta['rounds']} interleaved blocks (ratio to the row's fastest); `auto` = what `backend=None` runs.",
        "",
        "| op | N | B | torch | fpsample | torch_cluster | triton | auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + [format_row(row) for row in rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "available_backends": available_backends(),
        "k": args.k,
        "channels": args.channels,
        "min_run_time_s": args.min_run_time,
        "rounds": args.rounds,
    }
    print(markdown([], meta), end="", flush=True)
    rows = []
    for num_points in args.sizes:
        batch = max(1, min(args.batch_size, args.points_per_run // num_points))
        rows += bench_size(num_points, batch, args)
    meta["load_average_after"] = round(os.getloadavg()[0], 2)
    stem = "kernels" if args.device == "cpu" else f"kernels_{torch.device(args.device).type}"
    atomic_write_text(args.output_dir / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.output_dir / f"{stem}.md", markdown(rows, meta))


if __name__ == "__main__":
    main()
