"""Ablations over seeds: each variant's accuracy per seed, its mean, and its gap to Any2Point on the same seeds.

One seed moves a configuration by more than most of the gaps between variants (800 test clouds alone give about
±1.3 points), so the comparison that means something is paired: a variant against Any2Point ("full") run with the
same seed and recipe, averaged over the seeds that have both. Reads the `ablations.json` of `bench_ablations.py`
runs that differ only by `--seed`:

    python -m benchmarks.ablation_seeds benchmarks/results/ablations_10_epochs \\
        benchmarks/results/ablations_10_epochs_seed43 --output_dir benchmarks/results/ablations_10_epochs_seeds

Writes `ablations_seeds.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.reporting import run_stamp, write_results
from peft_any2point.metrics import save_png


REFERENCE = "full"
# What has to match between the runs for their seeds to be comparable.
_SAME_SETUP = ("num_epochs", "recipe")


def load_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """The `ablations.json` of each folder; a ValueError when two runs share a seed or differ in more than it."""
    runs = [json.loads((folder / "ablations.json").read_text()) for folder in folders]
    seeds = [run["meta"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each run needs a seed of its own, got seeds {seeds}")
    for key in _SAME_SETUP:
        values = {json.dumps(run["meta"][key]) for run in runs}
        if len(values) > 1:
            raise ValueError(f"the runs differ in {key!r} ({sorted(values)}); only the seed may differ")
    return runs


def combine(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant, in the order variants first appear: per-seed and mean accuracies, paired gaps."""
    by_seed = {run["meta"]["seed"]: {row["variant"]: row for row in run["rows"]} for run in runs}
    variants = dict.fromkeys(row["variant"] for run in runs for row in run["rows"])
    return [_variant_row(by_seed, variant) for variant in variants]


def _trained(table: dict[str, dict[str, Any]], variant: str) -> bool:
    """Whether one seed's table holds `variant` run to the end (not stopped early by a collapse)."""
    return variant in table and "stopped" not in table[variant]


def _variant_row(by_seed: dict[int, dict[str, dict[str, Any]]], variant: str) -> dict[str, Any]:
    seeds = sorted(seed for seed, table in by_seed.items() if variant in table)
    trained = [seed for seed in seeds if _trained(by_seed[seed], variant)]
    paired = [seed for seed in trained if _trained(by_seed[seed], REFERENCE)]

    def per_seed(metric: str) -> dict[str, float]:
        # Seeds as strings, the keys these dicts have once written as JSON.
        return {str(seed): by_seed[seed][variant][metric] for seed in trained}

    def mean_or_none(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    def paired_gap(metric: str) -> float | None:
        return mean_or_none([by_seed[seed][variant][metric] - by_seed[seed][REFERENCE][metric] for seed in paired])

    overall, mean_class = per_seed("overall_accuracy"), per_seed("mean_class_accuracy")
    return {
        "variant": variant,
        "description": by_seed[seeds[0]][variant]["description"],
        "seeds": seeds,
        "stopped": {str(seed): by_seed[seed][variant]["stopped"] for seed in seeds if seed not in trained},
        "overall_accuracy": overall,
        "mean_class_accuracy": mean_class,
        "mean_overall_accuracy": mean_or_none(list(overall.values())),
        "mean_mean_class_accuracy": mean_or_none(list(mean_class.values())),
        "paired_seeds": paired,
        "overall_gap_to_reference": paired_gap("overall_accuracy"),
        "mean_class_gap_to_reference": paired_gap("mean_class_accuracy"),
        "trainable_params": by_seed[trained[0]][variant]["trainable_params"] if trained else None,
    }


def _points(value: float | None, sign: str = "+") -> str:
    return "—" if value is None else f"{100 * value:{sign}.1f}"


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Ablations over seeds {', '.join(map(str, meta['seeds']))}: {meta['num_epochs']} epochs of the recipe "
        f"`{' '.join(meta['recipe'])}`, last-epoch accuracy on the evaluation subset; combined {meta['date']} from "
        f"{', '.join(f'`{source}`' for source in meta['sources'])}. Gaps are to Any2Point ({REFERENCE}) with the same "
        "seed, averaged over the seeds that ran both; a run stopped early (a representation collapse) counts in neither. "
        "`ablations_seeds.png` plots every seed.",
        "",
        "| variant | what changes | OA % per seed | mean OA % | mean mAcc % | Δ OA vs Any2Point | Δ mAcc | trainable |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        per_seed = [f"{100 * value:.1f} ({seed})" for seed, value in row["overall_accuracy"].items()]
        per_seed += [
            f"stopped at step {stop['step']}: {stop['reason']} ({seed})" for seed, stop in row["stopped"].items()
        ]
        trainable = "—" if row["trainable_params"] is None else f"{row['trainable_params']:,}"
        lines.append(
            f"| {row['variant']} | {row['description']} | {', '.join(per_seed)} "
            f"| {_points(row['mean_overall_accuracy'], '')} | {_points(row['mean_mean_class_accuracy'], '')} "
            f"| {_points(row['overall_gap_to_reference'])} | {_points(row['mean_class_gap_to_reference'])} "
            f"| {trainable} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """Each seed's overall accuracy per variant as a dot, the mean as a line across them (the axis does not start
    at 0, so no bars)."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    means = [
        (i, 100 * row["mean_overall_accuracy"])
        for i, row in enumerate(rows)
        if row["mean_overall_accuracy"] is not None
    ]
    ax.hlines(
        [mean for _, mean in means],
        [i - 0.3 for i, _ in means],
        [i + 0.3 for i, _ in means],
        color="tab:blue",
        label="mean",
    )
    markers = "osD^v"
    for index, seed in enumerate(meta["seeds"]):
        seeded = [(i, row) for i, row in enumerate(rows) if str(seed) in row["overall_accuracy"]]
        ax.plot(
            [i for i, _ in seeded],
            [100 * row["overall_accuracy"][str(seed)] for _, row in seeded],
            linestyle="none",
            marker=markers[index % len(markers)],
            color="black",
            label=f"seed {seed}",
        )
    values = [100 * value for row in rows for value in row["overall_accuracy"].values()]
    ax.set(ylim=(min(values) - 3, max(values) + 2), ylabel="overall accuracy (%)")
    stopped = [i for i, row in enumerate(rows) if row["stopped"]]
    if stopped:  # a seed that never trained: a cross at the bottom instead of a dot at chance far below the axis
        y = min(values) - 2.5
        ax.plot(stopped, [y] * len(stopped), linestyle="none", marker="x", color="tab:red", label="stopped early")
    ax.set_xticks(range(len(rows)), [row["variant"] for row in rows], rotation=30, ha="right")
    ax.set_title(f"Ablations, {meta['num_epochs']} epochs: each seed and their mean", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="folders holding a bench_ablations ablations.json")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    rows = combine(runs)
    meta = {
        **run_stamp(),
        "seeds": sorted(run["meta"]["seed"] for run in runs),
        "sources": [str(folder) for folder in args.runs],
        **{key: runs[0]["meta"][key] for key in _SAME_SETUP},
    }
    write_results(args.output_dir, "ablations_seeds", meta, rows, to_markdown(rows, meta))
    plot(rows, meta, args.output_dir / "ablations_seeds.png")
    return rows


if __name__ == "__main__":
    main()
