"""Scaling: training throughput and peak memory of Any2Point against the number of points and the batch size.

Each configuration runs in a process of its own, so that its peak resident memory (`ru_maxrss`, or the CUDA
allocator's peak on a GPU) is its own: the default Any2PointConfig (128 tokens from 3 stages), bf16 autocast, the
embedder's pooling compiled and freed memory kept as training does on a CPU, a warm-up step and then `--steps` timed
training steps on random clouds. The configurations take turns, `--rounds` times, and each row reports the median
round with the range: a shared VM's speed drifts over minutes, and a single pass would credit that drift to whichever
configuration ran during it. `--knn_backend torch` hides torch-cluster from the children, to time the pure-torch
geometry that an installation without it runs; each row records the FPS and kNN backends of every embedder stage.

    python -m benchmarks.bench_scaling                            # MiniLM; N = 1k..8k at B=8, B = 8..32 at N=1k
    python -m benchmarks.bench_scaling --backbone tiny --points 64 128 --batch_sizes 2 4 --batch_size 2

Writes `results/scaling.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from benchmarks.bench_speed import add_compile_embedder_argument, add_keep_memory_argument
from benchmarks.reporting import run_stamp, write_results
from peft_any2point.allocator import keep_freed_memory
from peft_any2point.metrics import save_png


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def measure(args: argparse.Namespace, num_points: int, batch_size: int) -> dict[str, Any]:
    """Time training steps of one configuration in this process, and report its peak memory."""
    if args.knn_backend == "torch":
        sys.modules["torch_cluster"] = None  # an import of it now fails, as where it is not installed
    if args.keep_freed_memory == "yes" and args.device == "cpu":
        keep_freed_memory()
    import transformers
    from peft import get_peft_model

    from benchmarks.bench_speed import geometry_backends
    from benchmarks.real_backbones import minilm_dir
    from peft_any2point import Any2PointConfig
    from peft_any2point.training import load_backbone

    backbone, steps, device = args.backbone, args.steps, args.device

    torch.manual_seed(0)
    if backbone == "tiny":
        base = transformers.BertModel(transformers.BertConfig(**TINY_BERT))
        config = Any2PointConfig(num_labels=40, num_tokens=16, num_stages=2, stage_widths=[16, 24], num_neighbors=8)
    else:
        base = load_backbone(str(minilm_dir()), torch.device(device))  # the attention training picks
        config = Any2PointConfig(num_labels=40)
    model = get_peft_model(base, config).to(device).train()
    embedder = model.base_model.any2point["default"].embedder
    if args.compile_embedder == "yes":
        embedder.compile_pooling()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    points = torch.rand(batch_size, num_points, 3, device=device) * 2 - 1
    labels = torch.randint(0, 40, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(points=points, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    seconds = (time.perf_counter() - start) / steps
    return {
        "num_points": num_points,
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "samples_per_second": batch_size / seconds,
        "peak_memory_mib": peak_mib,
        "memory": "CUDA allocator peak" if device.startswith("cuda") else "peak resident set of the process",
        "attn_implementation": base.config._attn_implementation,
        "geometry_backends": geometry_backends(embedder, num_points, torch.device(device).type),
    }


def run_in_child(args: argparse.Namespace, num_points: int, batch_size: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_scaling", "--child", str(num_points), str(batch_size)]
    command += ["--backbone", args.backbone, "--steps", str(args.steps), "--device", args.device]
    command += ["--knn_backend", args.knn_backend, "--compile_embedder", args.compile_embedder]
    command += ["--keep_freed_memory", args.keep_freed_memory]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row from its rounds: the median time per step, its range, and the largest peak memory."""
    times = [r["seconds_per_step"] for r in rounds]
    seconds = statistics.median(times)
    return {
        **rounds[0],
        "seconds_per_step": seconds,
        "samples_per_second": rounds[0]["batch_size"] / seconds,
        "seconds_per_step_rounds": times,
        "peak_memory_mib": max(r["peak_memory_mib"] for r in rounds),
    }


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """Samples/s (median, bars spanning the rounds) and peak memory against points, then against batch size."""
    points_sweep = [r for r in rows if r["batch_size"] == meta["batch_size"]]
    batch_sweep = [r for r in rows if r["num_points"] == rows[0]["num_points"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, sweep, key, label in (
        (fig.add_subplot(1, 2, 1), points_sweep, "num_points", f"points per cloud (batch {meta['batch_size']})"),
        (fig.add_subplot(1, 2, 2), batch_sweep, "batch_size", f"batch size ({rows[0]['num_points']} points)"),
    ):
        x = [r[key] for r in sweep]
        rates = [r["samples_per_second"] for r in sweep]
        lows = [r["samples_per_second"] - r["batch_size"] / max(r["seconds_per_step_rounds"]) for r in sweep]
        highs = [r["batch_size"] / min(r["seconds_per_step_rounds"]) - r["samples_per_second"] for r in sweep]
        ax.errorbar(x, rates, yerr=[lows, highs], marker="o", capsize=3, color="tab:blue")
        ax.set(xscale="log", xlabel=label, ylim=(0, None))
        ax.set_xticks(x, [str(v) for v in x], minor=False)
        ax.minorticks_off()
        ax.set_ylabel("training samples/s", color="tab:blue")
        memory = ax.twinx()
        memory.plot(x, [r["peak_memory_mib"] for r in sweep], marker="s", linestyle="--", color="tab:orange")
        memory.set_ylim(0, None)
        memory.set_ylabel("peak memory (MiB)", color="tab:orange")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Any2Point bf16 training, {meta['backbone']}, {meta['machine']}, "
        f"{'torch-cluster hidden' if meta['knn_backend'] == 'torch' else 'installed backends'}",
        fontsize=10,
    )
    return save_png(fig, path)


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Scaling of a bf16 training step on {meta['machine']} ({meta['device']}), {meta['date']}, backbone {meta['backbone']}, "
        f"default Any2PointConfig (128 tokens), {rows[0]['attn_implementation']} attention, "
        f"embedder pooling compiled: {meta['compile_embedder']}, "
        f"freed memory kept: {'yes' if meta.get('keep_freed_memory') else 'no'}, "
        f"{'torch-cluster hidden' if meta['knn_backend'] == 'torch' else 'every installed geometry backend'}, "
        f"{meta['steps']} timed steps after one warm-up in each of {meta['rounds']} rounds, the configurations taking "
        f"turns; s/step is the median round (range in brackets); memory: {rows[0]['memory']}. `scaling.png` plots it.",
        "",
        "| points | batch | s/step | samples/s | peak memory | kNN per stage |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['num_points']} | {r['batch_size']} | {r['seconds_per_step']:.2f} "
        f"({min(r['seconds_per_step_rounds']):.2f}–{max(r['seconds_per_step_rounds']):.2f}) | {r['samples_per_second']:.1f} "
        f"| {r['peak_memory_mib']:.0f} MiB | {', '.join(stage.split('knn ')[1] for stage in r['geometry_backends'])} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--points", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch_size", type=int, default=8, help="batch of the points sweep")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32], help="at the first --points")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times every configuration runs, taking turns")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--knn_backend", choices=("auto", "torch"), default="auto", help="torch: hide torch-cluster from the children"
    )
    add_compile_embedder_argument(parser)
    add_keep_memory_argument(parser)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--child", type=int, nargs=2, metavar=("POINTS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return []
    configs = [(n, args.batch_size) for n in args.points]
    configs += [(args.points[0], b) for b in args.batch_sizes if (args.points[0], b) not in configs]
    runs = [run_in_child(args, n, b) for n, b in tqdm(configs * args.rounds, desc="configurations x rounds")]
    rows = [summarise(runs[index :: len(configs)]) for index in range(len(configs))]
    meta = {**run_stamp(), "device": args.device, "backbone": args.backbone, "steps": args.steps}
    meta |= {"rounds": args.rounds, "batch_size": args.batch_size}
    meta |= {"knn_backend": args.knn_backend, "compile_embedder": args.compile_embedder}
    meta["keep_freed_memory"] = args.keep_freed_memory == "yes" and args.device == "cpu"
    meta["torch"] = torch.__version__
    write_results(args.output_dir, "scaling", meta, rows, to_markdown(rows, meta))
    plot(rows, meta, args.output_dir / "scaling.png")
    return rows


if __name__ == "__main__":
    main()
