"""Ablations of Any2Point on one data set and one budget: which part earns its cost.

Every variant runs `examples/train_modelnet.py` in a process of its own (so that its peak memory is its own) with
the same recipe (by default the `make demo` recipe cut to `--num_epochs`) and differs by the flags listed in
VARIANTS: the virtual projection against a learned 3D position encoding and none; the guided adapter against a
plain bottleneck adapter and none; 1 view against 6. Three baselines (`--tuning`, see `peft_any2point.baselines`)
keep Any2Point's embedder, position encoding and head and change only the backbone: peft's LoRA in the frozen
blocks instead of the adapters, the blocks fully fine-tuned, and no blocks at all. Each result is the last epoch's
accuracy on the evaluation subset, with the trainable parameters, the size of the saved file (the adapter, or a
baseline's trainable weights), training and evaluation samples/s and peak resident memory that the script records
in its `results.json`, and the test accuracy after every epoch (from its `metrics.jsonl`), which
`ablations.png` plots: at a short budget the curves say more than the last point (which part learns faster, which
is still rising). A variant that the training script stops early (a representation collapse, see its
`stopped.json`) is reported as such instead of failing the whole benchmark.

    python -m benchmarks.bench_ablations                     # all variants, ~3.5 min each on 2 cores
    python -m benchmarks.bench_ablations --variants full no-adapter --num_epochs 2

Writes `results/ablations.{json,md,png}`; run folders go to `--runs_dir` (default `outputs/ablations`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.reporting import run_stamp, write_results
from peft_any2point.metrics import save_png
from peft_any2point.training import METRICS_LOG, STOPPED_FILE, read_metrics_log


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TRAIN = ROOT / "examples" / "train_modelnet.py"
EVAL_SAMPLES = 800  # test clouds every variant is scored on (the table and the plot say so)
# The demo recipe (Makefile), minus the epoch count, which --num_epochs sets.
RECIPE = [
    "--dataset", "modelnet40", "--num_points", "512", "--max_eval_samples", str(EVAL_SAMPLES), "--num_tokens", "64",
    "--num_stages", "2", "--num_neighbors", "16", "--warmup_epochs", "0.25", "--learning_rate", "2e-3",
    "--head_dropout", "0.1", "--batch_size", "32", "--mixed_precision", "bf16",
]  # fmt: skip
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("Any2Point as configured by default (virtual projection, guided adapters, 6 views)", []),
    "learned-pe": ("a learned MLP position encoding of the 3D centres instead of the virtual projection", ["--projection", "learned"]),
    "no-pe": ("no position encoding for the point tokens", ["--projection", "none"]),
    "plain-adapter": ("bottleneck adapters without local guidance or view ensemble", ["--no_local_guidance", "--no_view_ensemble"]),
    "no-adapter": ("no adapters: embedder, frozen backbone and head only", ["--no_adapter"]),
    "1-view": ("one virtual view instead of six", ["--num_views", "1"]),
    "lora": ("baseline: peft's LoRA (rank 2) on every linear layer of the frozen blocks, no adapters", ["--tuning", "lora", "--lora_rank", "2"]),
    "full-finetune": ("baseline: every block fine-tuned (lr 1e-4; the rest 2e-3), no adapters", ["--tuning", "full", "--backbone_learning_rate", "1e-4"]),
    "embedder-only": ("baseline: no transformer blocks, the embedder's tokens go straight to the norm and head", ["--tuning", "embedder-only"]),
}  # fmt: skip


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in a fresh process and summarise its results.json."""
    output_dir = args.runs_dir / name
    command = [sys.executable, str(TRAIN), *RECIPE, "--num_epochs", str(args.num_epochs), *VARIANTS[name][1]]
    command += ["--seed", str(args.seed), "--output_dir", str(output_dir)]
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    run = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    row = {"variant": name, "description": VARIANTS[name][0], "flags": VARIANTS[name][1]}
    if run.returncode and (output_dir / STOPPED_FILE).exists():  # a result too: this variant does not train
        return {**row, "stopped": json.loads((output_dir / STOPPED_FILE).read_text(encoding="utf-8"))}
    run.check_returncode()
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    history = read_metrics_log(output_dir / METRICS_LOG)
    final = results["final_epoch"]
    return {
        **row,
        "epochs": final["epoch"],
        "overall_accuracy": results["test_metrics"]["accuracy"],
        "mean_class_accuracy": results["test_metrics"]["mean_class_accuracy"],
        "test_samples": results["test_metrics"]["num_samples"],
        "trainable_params": results["trainable_params"],
        "adapter_bytes": results["adapter_bytes"],
        "train_samples_per_second": final["train_samples_per_second"],
        "eval_samples_per_second": final["eval_samples_per_second"],
        "peak_rss_mib": results["peak_rss_mib"],
        "wall_time_s": final["wall_time_s"],
        "test_accuracy_per_epoch": [record["test_accuracy"] for record in history if "test_accuracy" in record],
    }


def when(row: dict[str, Any]) -> str:
    """` (measured <date>)` for a row kept from an earlier run by `--update`."""
    return f" (measured {row['measured']})" if "measured" in row else ""


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Ablations on {meta['machine']}, {meta['date']}: `make demo` recipe for {meta['num_epochs']} epoch(s) "
        f"(512 points, 64 tokens, bf16), seed {meta['seed']}, last-epoch accuracy on {EVAL_SAMPLES} ModelNet40 test "
        "clouds. Rows kept from an earlier run say when they were measured; `ablations.png` plots the test accuracy after "
        "every epoch.",
        "",
        "| variant | what changes | OA % | mAcc % | trainable | saved file | train samples/s | eval samples/s "
        "| peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "stopped" in r:
            stop = r["stopped"]
            lines.append(
                f"| {r['variant']} | {r['description']}{when(r)} | stopped: {stop['reason']} at step {stop['step']} "
                f"(feature spread {stop['feature_spread']:.2g}) | — | — | — | — | — | — |"
            )
            continue
        lines.append(
            f"| {r['variant']} | {r['description']}{when(r)} | {100 * r['overall_accuracy']:.1f} "
            f"| {100 * r['mean_class_accuracy']:.1f} | {r['trainable_params']:,} | {r['adapter_bytes'] / 2**20:.2f} MiB "
            f"| {r['train_samples_per_second']:.1f} | {r['eval_samples_per_second']:.1f} | {r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """Test accuracy after every epoch, one line per variant (rows without a recorded curve are left out)."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        curve = row.get("test_accuracy_per_epoch")
        if curve:
            style = {"linewidth": 2.5, "color": "black"} if row["variant"] == "full" else {"linewidth": 1.2}
            ax.plot(
                range(1, len(curve) + 1),
                [100 * a for a in curve],
                marker="o",
                markersize=3,
                label=row["variant"],
                **style,
            )
    ax.set(
        xlabel="epoch",
        ylabel="overall accuracy (%)",
        xticks=range(1, meta["num_epochs"] + 1),
        title=f"Ablations: demo recipe, {meta['num_epochs']} epoch(s), seed {meta['seed']}, "
        f"{EVAL_SAMPLES} test clouds",
    )
    ax.grid(alpha=0.3)
    if ax.lines:  # every variant stopped early: nothing to name
        ax.legend(loc="lower right", fontsize=8)
    return save_png(fig, path)


def merge_rows(previous_file: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` plus the rows of `previous_file` for the other variants, in VARIANTS order; refuses another budget."""
    previous = json.loads(previous_file.read_text(encoding="utf-8"))
    if (previous["meta"]["num_epochs"], previous["meta"]["seed"]) != (meta["num_epochs"], meta["seed"]):
        raise ValueError(
            f"{previous_file} was measured with {previous['meta']['num_epochs']} epoch(s), seed "
            f"{previous['meta']['seed']}; this run uses {meta['num_epochs']}, seed {meta['seed']}: rerun every variant"
        )
    by_name = {row["variant"]: {"measured": previous["meta"]["date"], **row} for row in previous["rows"]}
    by_name.update({row["variant"]: row for row in rows})
    return [by_name[name] for name in VARIANTS if name in by_name]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--num_epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs" / "ablations")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun only --variants and keep the other rows of the existing results (same epochs and seed)",
    )
    args = parser.parse_args(argv)

    rows = [run_variant(name, args) for name in args.variants]
    meta = {**run_stamp(), "num_epochs": args.num_epochs, "seed": args.seed, "recipe": RECIPE}
    if args.update:
        rows = merge_rows(args.output_dir / "ablations.json", rows, meta)
    write_results(args.output_dir, "ablations", meta, rows, to_markdown(rows, meta))
    plot(rows, meta, args.output_dir / "ablations.png")
    return rows


if __name__ == "__main__":
    main()
