"""Throughput of `examples/train_modelnet.py` itself, end to end, under settings that take turns.

What a user sees: data loading, augmentation, the compiled step, gradient clipping, logging and evaluation, read
from the `metrics.jsonl` of real runs. Each setting is one set of extra flags (by default `--keep_freed_memory auto`
against `no`); every round runs each setting once, in turns, each in a fresh process and output folder. The first
epoch is left out of the medians, since it includes compiling. `python -m benchmarks.bench_train_script
--data_dir ../shared/data/modelnet40` writes `results/train_script.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.reporting import run_stamp, write_report
from peft_any2point.training import METRICS_LOG, read_metrics_log


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SETTINGS = ["--keep_freed_memory auto", "--keep_freed_memory no"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="extra flags of each setting")
    parser.add_argument(
        "--common",
        default="--dataset modelnet40 --max_train_samples 1280 --max_eval_samples 320 --num_epochs 3 "
        "--warmup_epochs 1 --mixed_precision bf16",
        help="flags every run gets (the data folder comes from --data_dir)",
    )
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="train_script")
    return parser.parse_args(argv)


def run_training(flags: list[str], output_dir: Path) -> list[dict[str, Any]]:
    """One training run in its own process; its per-epoch records."""
    command = [sys.executable, str(ROOT / "examples" / "train_modelnet.py"), *flags, "--output_dir", str(output_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-4000:]}")
    return read_metrics_log(output_dir / METRICS_LOG)


def summarise(setting: str, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    later = [epoch for run in runs for epoch in run[1:]]  # the first epoch compiles
    return {
        "setting": setting,
        "runs": len(runs),
        "epochs_per_run": len(runs[0]),
        "train_clouds_per_s": statistics.median(epoch["train_samples_per_second"] for epoch in later),
        "train_clouds_per_s_range": [
            min(e["train_samples_per_second"] for e in later),
            max(e["train_samples_per_second"] for e in later),
        ],
        "eval_clouds_per_s": statistics.median(epoch["eval_samples_per_second"] for epoch in later),
        "first_epoch_s": statistics.median(run[0]["wall_time_s"] for run in runs),
        "final_test_accuracy": [run[-1]["test_accuracy"] for run in runs],
        "epochs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`examples/train_modelnet.py` end to end on {result['machine']}, {result['date']}: common flags "
        f"`{result['common']}`; {result['rounds']} rounds, the settings taking turns, each run a fresh process. "
        "Train and eval clouds/s: median over the epochs after the first (range in brackets); first epoch: its "
        "wall time, compiling included.",
        "",
        "| setting | train clouds/s | eval clouds/s | first epoch | final test accuracy per run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        low, high = row["train_clouds_per_s_range"]
        accuracies = ", ".join(f"{100 * a:.1f} %" for a in row["final_test_accuracy"])
        lines.append(
            f"| `{row['setting']}` | {row['train_clouds_per_s']:.1f} ({low:.1f}–{high:.1f}) | "
            f"{row['eval_clouds_per_s']:.1f} | {row['first_epoch_s']:.0f} s | {accuracies} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = shlex.split(args.common) + (["--data_dir", args.data_dir] if args.data_dir else [])
    runs: dict[str, list[list[dict[str, Any]]]] = {setting: [] for setting in args.settings}
    with tempfile.TemporaryDirectory() as scratch:
        turns = [(r, setting) for r in range(args.rounds) for setting in args.settings]
        for index, (_, setting) in enumerate(tqdm(turns, desc="runs")):
            output_dir = Path(scratch) / f"run{index}"
            runs[setting].append(run_training([*common, *shlex.split(setting)], output_dir))
    result = {
        **run_stamp(),
        "common": shlex.join(common),
        "rounds": args.rounds,
        "rows": [summarise(setting, setting_runs) for setting, setting_runs in runs.items()],
    }
    write_report(args.output_dir, args.stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
