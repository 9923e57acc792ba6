"""Robustness of a trained adapter: test accuracy, clean and under every corruption of `transforms.CORRUPTIONS`.

Each corruption is applied at every severity (1..5) to the whole test split at once, on the CPU, with a generator
seeded from (`--seed`, corruption, severity): the corrupted clouds are the same whatever the batch size, device,
number of processes or the set of corruptions asked for, so two adapters (or two machines) see identical inputs.
The summary follows ModelNet40-C: the mean accuracy over all corruptions and severities, its error (1 - mean), and
how far it falls below the clean accuracy. ModelNet-C's mCE is further normalised by a reference model's errors
(DGCNN); that needs the reference's numbers and is left to the reader.

Run `python -m benchmarks.bench_robustness --adapter_path <folder written by examples/train_modelnet.py>` for
`robustness.{json,md,png}` (`--stem`) in `--output_dir` (default `benchmarks/results/`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import peft_any2point  # noqa: F401  (registers the Any2Point method with peft; import before loading)
from benchmarks.reporting import cpu_machine
from peft_any2point.data import DATASET_NAMES
from peft_any2point.io import atomic_write_text
from peft_any2point.metrics import compute_point_cloud_accuracy, save_png
from peft_any2point.training import (
    add_outlier_filter_arguments,
    check_num_labels,
    create_accelerator,
    load_split,
    load_trained_model,
    outlier_filter_overrides,
    predict,
    resolve_dataset,
)
from peft_any2point.transforms import CORRUPTIONS, SEVERITIES, corrupt


RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter_path", required=True, help="Folder written by examples/train_modelnet.py.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model; default: the adapter's own.")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="modelnet40")
    parser.add_argument(
        "--data_dir", default=None, help="Default for ModelNet40: $ANY2POINT_DATA, else ../shared/data/modelnet40."
    )
    parser.add_argument(
        "--num_points", type=int, default=None, help="Points per cloud; default: the adapter's, from results.json."
    )
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on a seeded random subset.")
    parser.add_argument("--corruptions", nargs="+", choices=tuple(CORRUPTIONS), default=list(CORRUPTIONS))
    parser.add_argument("--batch_size", type=int, default=32, help="Per process.")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=42)
    add_outlier_filter_arguments(parser)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="robustness", help="File names: <stem>.{json,md,png}.")
    return parser.parse_args(argv)


def trained_num_points(adapter_path: str) -> int | None:
    """Points per cloud the adapter was trained on, from the results.json that train_modelnet writes beside it."""
    results = Path(adapter_path) / "results.json"
    return json.loads(results.read_text(encoding="utf-8"))["data"]["num_points"] if results.is_file() else None


def corruption_seed(seed: int, corruption: str, severity: int) -> int:
    """A seed per evaluation that depends on its name, not its position, so adding corruptions changes no other."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}".encode())


class SwappableClouds(Dataset):
    """The test clouds, swapped for a corrupted copy before each evaluation.

    One loader then serves every evaluation: Accelerate keeps each loader it prepares alive, so a loader per
    corrupted copy would hold every copy of the test set in memory at once.
    """

    def __init__(self, points: torch.Tensor, labels: torch.Tensor) -> None:
        self.points, self.labels = points, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"points": self.points[index], "labels": self.labels[index]}

    def __len__(self) -> int:
        return len(self.labels)


def summarise(clean: dict[str, float], corruptions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy over every corruption and severity, its error, how it compares with the clean accuracy, and
    the mean over corruptions at each severity (the table's last row)."""
    mean = float(
        np.mean([cell["accuracy"] for entry in corruptions.values() for cell in entry["severities"].values()])
    )
    severities = next(iter(corruptions.values()))["severities"]
    return {
        "clean_accuracy": clean["accuracy"],
        "mean_accuracy": mean,
        "mean_error": 1 - mean,
        "accuracy_drop": clean["accuracy"] - mean,
        "relative_accuracy": mean / clean["accuracy"] if clean["accuracy"] > 0 else None,  # None: JSON has no NaN
        "mean_accuracy_by_severity": {
            severity: float(np.mean([entry["severities"][severity]["accuracy"] for entry in corruptions.values()]))
            for severity in severities
        },
    }


def markdown(results: dict[str, Any]) -> str:
    """Header line, summary line, then OA (%) with corruptions as rows and severities + mean as columns."""
    meta, summary, corruptions = results["meta"], results["summary"], results["corruptions"]
    severities = [str(severity) for severity in meta["severities"]]
    relative = "" if summary["relative_accuracy"] is None else f" ({summary['relative_accuracy']:.1%} of it)"
    outliers = meta.get("outlier_filter")
    filtered = f", outlier filter ({outliers['neighbors']} neighbours, {outliers['std_ratio']}σ)" if outliers else ""
    lines = [
        f"Robustness of `{meta['adapter_path']}` (base `{meta['base_model']}`) on the {meta['dataset']} test split "
        f"({meta['data_source']}): {meta['num_samples']} clouds of {meta['num_points']} points, seed {meta['seed']}, "
        f"{'bf16 autocast' if meta['mixed_precision'] == 'bf16' else 'fp32'}{filtered}; {meta['date']}, "
        f"{meta['machine']}.",
        "",
        f"Clean OA {summary['clean_accuracy']:.2%}; mean OA over {len(corruptions)} corruptions × {len(severities)} "
        f"severities {summary['mean_accuracy']:.2%} (error {summary['mean_error']:.2%}), "
        f"a drop of {summary['accuracy_drop']:.2%} from clean{relative}. Overall accuracy (%):",
        "",
        "| corruption | " + " | ".join(severities) + " | mean |",
        "|---" * (len(severities) + 2) + "|",
    ]
    for name, entry in corruptions.items():
        cells = [entry["severities"][s]["accuracy"] for s in severities] + [entry["mean_accuracy"]]
        lines.append(f"| {name} | " + " | ".join(f"{100 * value:.1f}" for value in cells) + " |")
    cells = [*summary["mean_accuracy_by_severity"].values(), summary["mean_accuracy"]]
    lines.append("| **mean** | " + " | ".join(f"**{100 * value:.1f}**" for value in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Accuracy against severity, one line per corruption, the clean accuracy as a dashed line."""
    meta = results["meta"]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^v<>px*h"
    for index, (name, entry) in enumerate(results["corruptions"].items()):
        accuracies = [100 * entry["severities"][str(s)]["accuracy"] for s in meta["severities"]]
        ax.plot(meta["severities"], accuracies, marker=markers[index % len(markers)], markersize=4, label=name)
    ax.axhline(100 * results["clean"]["accuracy"], color="black", linestyle="--", label="clean")
    ax.set(
        xlabel="severity",
        ylabel="overall accuracy (%)",
        xticks=meta["severities"],
        ylim=(0, 100),
        title=f"{Path(meta['adapter_path']).name} on {meta['dataset']} ({meta['num_samples']} test clouds)"
        + (", outlier filter" if meta.get("outlier_filter") else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return save_png(fig, path)


def outlier_filter(model: torch.nn.Module) -> dict[str, float] | None:
    """The outlier filter the evaluated adapter runs with (None when off)."""
    config = model.peft_config[model.active_adapter]
    if not config.outlier_neighbors:
        return None
    return {"neighbors": config.outlier_neighbors, "std_ratio": config.outlier_std_ratio}


def machine_name(accelerator: Accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_machine()
    return f"{name}, {accelerator.num_processes} process(es), {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = create_accelerator(args.mixed_precision)
    model, base = load_trained_model(
        args.adapter_path, args.model_name_or_path, accelerator.device, config_overrides=outlier_filter_overrides(args)
    )
    num_points = args.num_points or trained_num_points(args.adapter_path)
    if num_points is None:
        raise ValueError(
            f"{args.adapter_path} has no results.json saying how many points it was trained on; pass --num_points"
        )

    dataset, source = resolve_dataset(args.dataset, args.data_dir)
    test = load_split(dataset, "test", args.data_dir, num_points, args.max_eval_samples, args.seed)
    class_names = test.features["labels"].names
    check_num_labels(model, dataset, class_names)
    columns = test[:]  # whole columns as tensors (column access alone is lazy)
    clean_points = columns["points"]  # (num_samples, num_points, 3), on the CPU
    clouds = SwappableClouds(clean_points, columns["labels"])
    model, loader = accelerator.prepare(model, DataLoader(clouds, batch_size=args.batch_size))
    accelerator.print(
        f"Robustness of {args.adapter_path} on {base}; data: {dataset} from {source}, {len(clouds)} clouds"
    )

    def accuracy_on(points: torch.Tensor) -> dict[str, float]:
        clouds.points = points
        logits, labels = predict(model, loader, accelerator)
        metrics = compute_point_cloud_accuracy(logits.argmax(-1).tolist(), labels.tolist(), len(class_names))
        return {key: metrics[key] for key in ("accuracy", "mean_class_accuracy")}

    start = time.perf_counter()
    bar = tqdm(
        total=1 + len(args.corruptions) * len(SEVERITIES),
        desc="robustness",
        disable=not accelerator.is_local_main_process,
    )
    clean = accuracy_on(clean_points)
    bar.update(1)
    corruptions = {}
    for name in args.corruptions:
        severities = {}
        for severity in SEVERITIES:
            generator = torch.Generator().manual_seed(corruption_seed(args.seed, name, severity))
            severities[str(severity)] = accuracy_on(corrupt(clean_points, name, severity, generator=generator))
            bar.set_postfix(
                corruption=name, severity=severity, accuracy=f"{severities[str(severity)]['accuracy']:.3f}"
            )
            bar.update(1)
        mean = float(np.mean([cell["accuracy"] for cell in severities.values()]))
        corruptions[name] = {"severities": severities, "mean_accuracy": mean}
    bar.close()

    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "adapter_path": str(args.adapter_path),
            "base_model": base,
            "dataset": dataset,
            "data_source": source,
            "num_samples": len(clouds),
            "num_points": num_points,
            "severities": list(SEVERITIES),
            "seed": args.seed,
            "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision,
            "outlier_filter": outlier_filter(accelerator.unwrap_model(model)),
            "machine": machine_name(accelerator),
            "torch": torch.__version__,
            "elapsed_s": round(time.perf_counter() - start, 1),
        },
        "clean": clean,
        "corruptions": corruptions,
    }
    results["summary"] = summarise(clean, corruptions)
    if accelerator.is_main_process:
        atomic_write_text(args.output_dir / f"{args.stem}.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(args.output_dir / f"{args.stem}.md", markdown(results))
        plot(results, args.output_dir / f"{args.stem}.png")
        accelerator.print(
            f"{json.dumps(results['summary'])}\nTable and plot in {args.output_dir}/{args.stem}.{{md,png}}"
        )
    return results


if __name__ == "__main__":
    main()
