"""Evaluate a saved Any2Point adapter: overall, mean-class and per-class accuracy, optionally with voting.

The adapter is loaded onto its base model (`base_model_name_or_path` in its `adapter_config.json`, unless
`--model_name_or_path` overrides it). The output folder of a baseline run (`train_modelnet.py --tuning lora`, ...)
evaluates the same way, rebuilt from its `results.json`, so that the peers get voting numbers too. Voting averages the logits of the cloud and `--voting - 1` augmented copies
(the training augmentation of the dataset, seeded). Metrics come from the `evaluate` module shipped in the
package, so nothing is downloaded. Runs under `python`, `accelerate launch` and `torchrun`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader

import peft_any2point  # noqa: F401  (registers the Any2Point method with peft; import before loading)
from peft_any2point.data import DATASET_NAMES
from peft_any2point.training import (
    add_keep_freed_memory_argument,
    add_outlier_filter_arguments,
    check_num_labels,
    create_accelerator,
    load_split,
    load_trained_model,
    outlier_filter_overrides,
    point_cloud_metrics,
    predict,
    resolve_dataset,
    train_augmentation,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter_path",
        required=True,
        help="Folder written by `save_pretrained` or a baseline training run (or a Hub id).",
    )
    parser.add_argument("--model_name_or_path", default=None, help="Base model; default: the adapter's own.")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="modelnet40")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--num_points", type=int, default=1024)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on a seeded random subset.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--voting", type=int, default=1, help="Copies averaged per cloud (1 = no voting).")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=42)
    add_outlier_filter_arguments(parser)
    add_keep_freed_memory_argument(parser)
    parser.add_argument("--output_file", default=None, help="Default: <adapter_path>/eval_results.json.")
    args = parser.parse_args(argv)
    if args.voting < 1:
        parser.error(f"--voting must be >= 1, got {args.voting}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = create_accelerator(args.mixed_precision, keep_memory=args.keep_freed_memory)
    overrides = outlier_filter_overrides(args)
    model, base = load_trained_model(
        args.adapter_path, args.model_name_or_path, accelerator.device, config_overrides=overrides
    )

    dataset, source = resolve_dataset(args.dataset, args.data_dir)
    test = load_split(dataset, "test", args.data_dir, args.num_points, args.max_eval_samples, args.seed)
    class_names = test.features["labels"].names
    check_num_labels(model, dataset, class_names)
    accelerator.print(f"Evaluating {args.adapter_path} on {base}; data: {dataset} from {source}, {len(test)} clouds")
    model, loader = accelerator.prepare(model, DataLoader(test, batch_size=args.batch_size))
    logits, labels = predict(model, loader, accelerator, args.voting, train_augmentation(dataset), args.seed)
    metrics = point_cloud_metrics(logits, labels, class_names)
    results = {
        "adapter_path": args.adapter_path,
        "base_model": base,
        "dataset": dataset,
        "data_source": source,
        "voting": args.voting,
        "config_overrides": overrides,
        **metrics,
    }
    if accelerator.is_main_process:
        output_file = Path(args.output_file or Path(args.adapter_path) / "eval_results.json")
        write_json(output_file, results)
        summary = {key: metrics[key] for key in ("accuracy", "mean_class_accuracy", "num_samples")}
        accelerator.print(f"{json.dumps(summary)}\nPer-class accuracy and confusion matrix in {output_file}")
    return results


if __name__ == "__main__":
    main()
