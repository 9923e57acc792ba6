"""Classification metrics for point clouds (OA, mAcc, per-class accuracy, confusion matrix) and their plots.

The arithmetic lives here, in numpy; `peft_any2point/metric/point_cloud_accuracy.py` exposes it as an `evaluate`
module (load it with `load_point_cloud_metric()`, which works offline). Plots use matplotlib's Agg canvas
directly (no pyplot state, no display) and are written atomically, so a crashed run never leaves a broken PNG.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peft_any2point.io import atomic_path


METRIC_PATH = str(Path(__file__).with_name("metric") / "point_cloud_accuracy.py")
CURVE_X_KEYS = ("epoch", "step")
SPLIT_PREFIXES = ("train_", "eval_", "val_", "test_")


def confusion_matrix(
    predictions: Sequence[int], references: Sequence[int], num_classes: int | None = None
) -> np.ndarray:
    """(num_classes, num_classes) counts: row = reference class, column = predicted class."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.ndim != 1 or len(predictions) == 0:
        raise ValueError(
            f"predictions and references must be non-empty 1-D and of equal length, got shapes "
            f"{predictions.shape} and {references.shape}"
        )
    if num_classes is None:
        num_classes = int(max(predictions.max(), references.max())) + 1
    for name, labels in (("predictions", predictions), ("references", references)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    counts = np.bincount(references * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def compute_point_cloud_accuracy(
    predictions: Sequence[int], references: Sequence[int], num_classes: int | None = None
) -> dict[str, Any]:
    """OA, mAcc (over the classes present in `references`), per-class accuracy (NaN if absent) and confusion matrix.

    Plain Python types, so that the result goes straight into JSON logs and model cards.
    """
    matrix = confusion_matrix(predictions, references, num_classes)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(matrix) / support, np.nan)
    return {
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "mean_class_accuracy": float(np.nanmean(per_class)),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": matrix.tolist(),
    }


def load_point_cloud_metric(**kwargs) -> evaluate.EvaluationModule:
    """The shipped `evaluate` metric (`kwargs` go to `evaluate.load`, e.g. `num_process`, `process_id`)."""
    return evaluate.load(METRIC_PATH, **kwargs)


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix (rows: true class, normalised)",
) -> Path:
    """Save the row-normalised confusion matrix as a PNG (rows sum to 1: each row shows where a class goes)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(class_names):
        raise ValueError(f"Confusion matrix of shape {matrix.shape} does not match {len(class_names)} class names")
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
    num_classes = len(class_names)
    side = max(5.0, 0.28 * num_classes + 2.5)  # 40 ModelNet classes stay legible
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(
        xticks=range(num_classes),
        yticks=range(num_classes),
        xlabel="predicted class",
        ylabel="true class",
        title=title,
    )
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    if num_classes <= 20:  # counts stay readable only on small matrices
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if normalised[row, col] > 0.5 else "black"
                ax.text(col, row, f"{count:g}", ha="center", va="center", fontsize=8, color=colour)
    return save_png(fig, path)


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Save loss / accuracy / learning-rate curves from a training log as a PNG, one panel per quantity.

    `records` is a list of log dicts such as `{"epoch": 3, "train_loss": 0.9, "eval_accuracy": 0.81}` (the shape of
    `Trainer.state.log_history`). The x axis is `epoch` (else `step`, else the record index). Keys are grouped by
    quantity with the split prefix removed (`train_loss` and `eval_loss` share the `loss` panel); the quantities
    plotted are those ending in `loss` or `accuracy`, and `learning_rate`/`lr`. Records may omit keys (an
    evaluation every epoch, a loss every step): each curve uses the records that have it.
    """
    x_key = next((key for key in CURVE_X_KEYS if any(key in record for record in records)), None)
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for index, record in enumerate(records):
        x = record.get(x_key, index) if x_key else index
        for key, value in record.items():
            quantity = _quantity(key)
            if key in CURVE_X_KEYS or quantity is None or not isinstance(value, numbers.Real):
                continue
            xs, ys = panels.setdefault(quantity, {}).setdefault(key, ([], []))
            xs.append(float(x))
            ys.append(float(value))
    if not panels:
        raise ValueError("No loss, accuracy or learning-rate values to plot in the records")
    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (quantity, curves) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        for key, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set(xlabel=x_key or "record", title=quantity)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, path)


def _quantity(key: str) -> str | None:
    """The panel a log key belongs to (`eval_accuracy` -> `accuracy`), or None if it is not plotted."""
    quantity = next((key.removeprefix(prefix) for prefix in SPLIT_PREFIXES if key.startswith(prefix)), key)
    if quantity.endswith(("loss", "accuracy")):
        return quantity
    return "learning_rate" if quantity in ("learning_rate", "lr") else None


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)
