"""Accuracy records: `benchmarks/results/accuracy.json` and the report `accuracy.md`, next to the published numbers.

A record is one measured number: backbone, dataset, epochs actually trained out of the schedule's, device, overall
and mean-class accuracy of the LAST epoch on the test split (no model selection on the test set), with or without
voting, trainable parameters, adapter bytes and the command that reproduces it.

    python -m benchmarks.accuracy add --run outputs/demo --backbone all-MiniLM-L6-v2 --device "2-core CPU" \\
        --command "make demo" [--eval_results outputs/demo/eval_results.json] [--note "..."]
    python -m benchmarks.accuracy add --metrics_log run/metrics.jsonl ...   # a run stopped before its last epoch
    python -m benchmarks.accuracy report
    python -m benchmarks.accuracy curves --log "MiniLM=run/metrics.jsonl" --log "Whisper=..." [--output PNG]
    python -m benchmarks.accuracy curves --log "LoRA=seed42/metrics.jsonl" --log "LoRA=seed43/metrics.jsonl" ...

`add` reads what `examples/train_modelnet.py` writes (`results.json`, or only `metrics.jsonl` for a run that was
stopped and is to be resumed) and, with `--eval_results`, what `examples/evaluate_modelnet.py` writes (a voting
record when it used more than one vote). A record with the same backbone, dataset, device, command and voting
replaces the older one. A record made from a finished run also keeps its seed and its recipe (the arguments that
change what the run computes, seed and paths left out), and the report puts the records that differ only by seed
side by side with their mean and standard deviation: one seed of a short schedule moves accuracy by about a point,
as much as many of the differences people read into single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from peft_any2point.io import atomic_write_text
from peft_any2point.metrics import save_png
from peft_any2point.training import RESUMABLE_ARGUMENTS, read_metrics_log


RESULTS = Path(__file__).resolve().parent / "results"
RECORDS_FILE = "accuracy.json"
REPORT_FILE = "accuracy.md"
CURVES_FILE = "accuracy_curves.png"
KEY_FIELDS = ("backbone", "dataset", "device", "command", "voting")
# Arguments that two runs may differ in and still count as seeds of one recipe.
NOT_RECIPE = RESUMABLE_ARGUMENTS | {"seed"}

# DESIGN.md §6: overall accuracy (%), ScanObjectNN PB_T50_RS and ModelNet40 (1k points), as published.
PUBLISHED = [
    ("Any2Point", "CLIP-L text", "0.8M", 91.9, 94.3),
    ("Any2Point", "DINOv2-B", "0.8M", 87.7, 93.2),
    ("Any2Point", "ImageBind audio", "0.8M", 87.0, 92.7),
    ("Point-PEFT", "Point-BERT", "0.7M", 89.1, 94.2),
    ("PointGST", "PointGPT-L", "2.4M", 94.8, 94.8),
    ("GAPrompt", "Point-BERT", "0.6M", 90.7, 94.5),
    ("DAPT", "Point-BERT", "1.1M", 85.1, 93.5),
    ("Point-PN", "from scratch", "0.8M", 87.1, 93.8),
    ("PointNeXt", "from scratch", "1.4M", 87.7, 94.0),
]


def record_from_run(
    run: Path | None,
    metrics_log: Path | None,
    eval_results: Path | None,
    backbone: str,
    device: str,
    command: str,
    note: str,
    scheduled_epochs: int | None = None,
    trainable_params: int | None = None,
) -> dict[str, Any]:
    """One record from a finished run folder, or from the metrics log of a run stopped part-way."""
    if run is not None:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        final, recipe = results["final_epoch"], results["recipe"]
        record = {
            "dataset": results["data"]["dataset"],
            "epochs": final["epoch"],
            "scheduled_epochs": recipe["num_epochs"],
            "num_points": results["data"]["num_points"],
            "overall_accuracy": results["test_metrics"]["accuracy"],
            "mean_class_accuracy": results["test_metrics"]["mean_class_accuracy"],
            "test_samples": results["test_metrics"]["num_samples"],
            "trainable_params": results["trainable_params"],
            "adapter_bytes": results["adapter_bytes"],
            "train_samples": results["data"]["num_train"],
            "wall_time_s": final["wall_time_s"],
            "voting": False,
            "seed": recipe["seed"],
            "recipe": comparable_recipe(recipe),
        }
    else:
        last = read_metrics_log(metrics_log)[-1]
        record = {
            "dataset": "modelnet40",
            "epochs": last["epoch"],
            "scheduled_epochs": scheduled_epochs,
            "trainable_params": trainable_params,
            "overall_accuracy": last["test_accuracy"],
            "mean_class_accuracy": last["test_mean_class_accuracy"],
            "test_samples": last["test_samples"],
            "wall_time_s": last["wall_time_s"],
            "voting": False,
        }
    if eval_results is not None:
        evaluated = json.loads(eval_results.read_text(encoding="utf-8"))
        record.update(
            overall_accuracy=evaluated["accuracy"],
            mean_class_accuracy=evaluated["mean_class_accuracy"],
            test_samples=evaluated["num_samples"],
            voting=evaluated["voting"] > 1,
            votes=evaluated["voting"],
        )
    return {"backbone": backbone, **record, "device": device, "command": command, "note": note}


def comparable_recipe(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The training script's arguments that two runs must share for their seeds to be compared: every argument that
    changes what a run computes (`RESUMABLE_ARGUMENTS` left out: paths, compilation, checkpointing), less the seed."""
    return {name: value for name, value in arguments.items() if name not in NOT_RECIPE}


def merge(records: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    """`records` with `new` replacing any record of the same key."""
    key = tuple(new[field] for field in KEY_FIELDS)
    return [r for r in records if tuple(r.get(field) for field in KEY_FIELDS) != key] + [new]


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def seed_groups(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same backbone, dataset, recipe and voting that ran with two or more seeds, in the order each
    group first appears: every run's accuracy by seed, and their mean and sample standard deviation. Records without
    a recorded recipe (a run stopped part-way) are left out."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        if "recipe" in record:
            votes = record.get("votes") if record["voting"] else None
            recipe = json.dumps(record["recipe"], sort_keys=True)
            groups.setdefault((record["backbone"], record["dataset"], votes, recipe), []).append(record)
    summaries = []
    for runs in groups.values():
        if len({run["seed"] for run in runs}) < 2:
            continue
        first = runs[0]
        summary = {
            name: first.get(name) for name in ("backbone", "dataset", "num_points", "epochs", "voting", "votes")
        }
        summary.update(
            recipe=first["recipe"],
            seeds=[run["seed"] for run in runs],
            devices=sorted({run["device"] for run in runs}),
        )
        for metric in ("overall_accuracy", "mean_class_accuracy"):
            values = [run[metric] for run in runs]
            summary[metric] = values
            summary[f"{metric}_mean"] = statistics.fmean(values)
            summary[f"{metric}_stdev"] = statistics.stdev(values)
        summaries.append(summary)
    return summaries


def distinguishing_settings(groups: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> list[str]:
    """For each group, the recipe settings whose values differ among the recorded runs of its backbone, dataset,
    points and epochs, as training-script flags: without them Any2Point and a baseline on one backbone read alike.
    A peer run with a single seed counts too, or a baseline's seeds would read as the method's."""

    def peer_key(item: Mapping[str, Any]) -> tuple:
        return item["backbone"], item["dataset"], item.get("num_points"), item["epochs"]

    peers: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        if "recipe" in record:
            peers.setdefault(peer_key(record), []).append(record["recipe"])
    settings = []
    for g in groups:
        recipes = peers[peer_key(g)]
        names = sorted({name for recipe in recipes for name in recipe})
        differing = [name for name in names if len({json.dumps(recipe.get(name)) for recipe in recipes}) > 1]
        settings.append(", ".join(f"--{name} {flag_value(g['recipe'].get(name))}" for name in differing))
    return settings


def flag_value(value: Any) -> str:
    """A recipe value as it is passed on the command line; None is the script's default."""
    if value is None:
        return "(default)"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def seed_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """The report's section on `seed_groups`, none when no record has a second seed."""
    groups = seed_groups(records)
    if not groups:
        return []
    lines = [
        "",
        "## Across seeds (records above that differ only by seed)",
        "",
        "Mean ± sample standard deviation over the runs; the devices may differ. Where the records of one backbone,",
        "points and epochs differ in recipe (single-seed runs included), the settings column names the training-script",
        "flags that tell them apart.",
        "",
        "| backbone | dataset | points | epochs | settings | voting | OA % by seed | OA % | mAcc % | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, settings in zip(groups, distinguishing_settings(groups, records), strict=True):
        runs = zip(g["seeds"], g["overall_accuracy"], strict=True)
        by_seed = ", ".join(f"{percent(value)} ({seed})" for seed, value in runs)
        voting = f"{g['votes']} votes" if g["voting"] else "no"
        spread = {
            metric: f"{percent(g[f'{metric}_mean'])} ± {percent(g[f'{metric}_stdev'])}"
            for metric in ("overall_accuracy", "mean_class_accuracy")
        }
        lines.append(
            f"| {g['backbone']} | {g['dataset']} | {g['num_points']} | {g['epochs']} | {settings} | {voting} | {by_seed} "
            f"| {spread['overall_accuracy']} | {spread['mean_class_accuracy']} | {'; '.join(g['devices'])} |"
        )
    return lines


def to_markdown(records: Sequence[dict[str, Any]]) -> str:
    """Our measured records, then the published table; the epochs column says how far each run got."""
    lines = [
        "## Measured here (last epoch, test split)",
        "",
        "| backbone | dataset | points | epochs (of schedule) | voting | OA % | mAcc % | trainable | adapter | device "
        "| command | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        epochs = f"{r['epochs']}" + (f" of {r['scheduled_epochs']}" if r.get("scheduled_epochs") else "")
        trainable = f"{r['trainable_params'] / 1e6:.2f}M" if r.get("trainable_params") else ""
        size = f"{r['adapter_bytes'] / 1e6:.1f} MB" if r.get("adapter_bytes") else ""
        voting = f"{r['votes']} votes" if r.get("voting") else "no"
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r.get('num_points', '')} | {epochs} | {voting} "
            f"| {percent(r['overall_accuracy'])} | {percent(r['mean_class_accuracy'])} | {trainable} | {size} "
            f"| {r['device']} | `{r['command']}` | {r.get('note', '')} |"
        )
    lines += seed_table(records)
    lines += [
        "",
        "## Published (DESIGN.md §6; 300 epochs, the reference picks the best epoch on the test set)",
        "",
        "| method | source model | trainable | ScanObjectNN PB_T50_RS OA % | ModelNet40 OA % |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {m} | {s} | {t} | {sonn} | {mn40} |" for m, s, t, sonn, mn40 in PUBLISHED]
    return "\n".join(lines) + "\n"


CURVE_METRICS = {"overall_accuracy": "overall accuracy", "mean_class_accuracy": "mean-class accuracy"}


def learning_curves(logs: Sequence[tuple[str, Path]]) -> dict[str, list[dict[str, list[float]]]]:
    """Per label, the runs logged under it (`metrics.jsonl`, one per seed): epochs and test OA / mAcc in %.

    A label given more than once names the seeds of one recipe, so their logs must cover the same epochs."""
    curves: dict[str, list[dict[str, list[float]]]] = {}
    for label, log in logs:
        records = read_metrics_log(log)
        curve = {
            "epoch": [record["epoch"] for record in records],
            "overall_accuracy": [100 * record["test_accuracy"] for record in records],
            "mean_class_accuracy": [100 * record["test_mean_class_accuracy"] for record in records],
        }
        runs = curves.setdefault(label, [])
        if runs and curve["epoch"] != runs[0]["epoch"]:
            raise ValueError(
                f"the logs labelled {label!r} cover different epochs ({runs[0]['epoch']} and {curve['epoch']}, "
                f"the latter in {log}): a label given more than once must name seeds of one schedule"
            )
        runs.append(curve)
    return curves


def seed_band(runs: Sequence[Mapping[str, list[float]]]) -> dict[str, Any]:
    """Epoch by epoch, the mean of several seeds' curves and their lowest and highest value: one line with its
    spread reads better than a tangle of seeds, and shows whether two methods' spreads overlap."""
    band: dict[str, Any] = {"epoch": runs[0]["epoch"]}
    for metric in CURVE_METRICS:
        per_epoch = list(zip(*(run[metric] for run in runs), strict=True))
        band[metric] = {
            "mean": [statistics.fmean(values) for values in per_epoch],
            "low": [min(values) for values in per_epoch],
            "high": [max(values) for values in per_epoch],
        }
    return band


def plot_learning_curves(curves: Mapping[str, Sequence[Mapping[str, list[float]]]], path: Path) -> Path:
    """Test accuracy after every epoch of each run, next to the published Any2Point ModelNet40 numbers (300 epochs,
    best test epoch), so that how far a shortened schedule gets is seen at a glance. A label with several seeds is
    drawn as their mean inside a band from their lowest to their highest value."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    bands = {label: seed_band(runs) for label, runs in curves.items()}
    for ax, (metric, title) in zip(fig.subplots(1, 2), CURVE_METRICS.items(), strict=True):
        for label, band in bands.items():
            seeds = len(curves[label])
            name = label if seeds == 1 else f"{label}: mean and range of {seeds} seeds"
            (line,) = ax.plot(band["epoch"], band[metric]["mean"], marker="o", markersize=3, label=name)
            if seeds > 1:
                ax.fill_between(
                    band["epoch"], band[metric]["low"], band[metric]["high"], color=line.get_color(), alpha=0.2
                )
        ax.set(xlabel="epoch", ylabel="%", title=f"ModelNet40 test {title}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    overall = fig.axes[0]
    published = [(source, modelnet40) for method, source, _, _, modelnet40 in PUBLISHED if method == "Any2Point"]
    for _, modelnet40 in published:
        overall.axhline(modelnet40, linestyle=":", color="grey", linewidth=1)
    label = "published Any2Point, 300 epochs:\n" + ", ".join(f"{value} {source}" for source, value in published)
    # Above the highest line, with head room for the two lines of text, so that curves near 90 % never run into it.
    highest = max(value for _, value in published)
    overall.set_ylim(top=highest + 8)
    overall.annotate(
        label, (0.01, highest + 0.5), xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom"
    )
    overall.legend(loc="lower right")
    return save_png(fig, path)


def parse_log_argument(value: str) -> tuple[str, Path]:
    label, separator, path = value.partition("=")
    if not separator or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH/metrics.jsonl, got {value!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--results_dir", type=Path, default=RESULTS)
    commands = parser.add_subparsers(dest="action", required=True)
    add = commands.add_parser("add", parents=[shared], help="add or replace a record, then rewrite the report")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a finished run folder (results.json)")
    source.add_argument("--metrics_log", type=Path, help="metrics.jsonl of a run stopped before its end")
    add.add_argument("--eval_results", type=Path, default=None)
    add.add_argument("--backbone", required=True)
    add.add_argument("--device", required=True, help="the machine, in words")
    add.add_argument("--command", required=True, help="how to reproduce the number")
    add.add_argument("--note", default="")
    add.add_argument("--scheduled_epochs", type=int, default=None, help="with --metrics_log: the schedule's length")
    add.add_argument("--trainable_params", type=int, default=None, help="with --metrics_log")
    commands.add_parser("report", parents=[shared], help="rewrite accuracy.md from accuracy.json")
    curves = commands.add_parser("curves", parents=[shared], help="plot test accuracy per epoch of training logs")
    curves.add_argument(
        "--log",
        type=parse_log_argument,
        action="append",
        required=True,
        help="LABEL=metrics.jsonl; repeat a label for the seeds of one recipe, drawn as their mean and range",
    )
    curves.add_argument("--output", type=Path, default=None, help=f"default: RESULTS_DIR/{CURVES_FILE}")
    args = parser.parse_args(argv)
    if args.action == "curves":
        print(plot_learning_curves(learning_curves(args.log), args.output or args.results_dir / CURVES_FILE))
        return

    path = args.results_dir / RECORDS_FILE
    records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if args.action == "add":
        new = record_from_run(
            args.run,
            args.metrics_log,
            args.eval_results,
            args.backbone,
            args.device,
            args.command,
            args.note,
            args.scheduled_epochs,
            args.trainable_params,
        )
        records = merge(records, new)
        atomic_write_text(path, json.dumps(records, indent=2) + "\n")
    report = to_markdown(records)
    atomic_write_text(args.results_dir / REPORT_FILE, report)
    print(report)


if __name__ == "__main__":
    main()
