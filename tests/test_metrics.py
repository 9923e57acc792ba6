"""Metrics against a confusion worked out by hand; the shipped evaluate module offline; plots written atomically."""

import math
import socket

import evaluate.config
import huggingface_hub.constants
import matplotlib.image
import numpy as np
import pytest

from peft_any2point.metrics import (
    compute_point_cloud_accuracy,
    confusion_matrix,
    load_point_cloud_metric,
    plot_confusion_matrix,
    plot_training_curves,
)


# Five classes: class 3 is never predicted, class 4 never occurs in the references (but is predicted once).
REFERENCES = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
PREDICTIONS = [0, 0, 1, 1, 4, 2, 2, 0, 2, 2]
# Rows = reference, columns = prediction, counted by hand.
EXPECTED_MATRIX = [
    [2, 1, 0, 0, 0],
    [0, 1, 0, 0, 1],
    [1, 0, 3, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0],
]
EXPECTED_PER_CLASS = [2 / 3, 1 / 2, 3 / 4, 0.0, math.nan]  # class 4 absent from the references: NaN
EXPECTED_ACCURACY = 6 / 10
EXPECTED_MEAN_CLASS_ACCURACY = (2 / 3 + 1 / 2 + 3 / 4 + 0) / 4  # 23/48, over the 4 classes present


def assert_hand_computed(result: dict) -> None:
    assert result["confusion_matrix"] == EXPECTED_MATRIX
    assert result["accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert result["mean_class_accuracy"] == pytest.approx(23 / 48) == EXPECTED_MEAN_CLASS_ACCURACY
    np.testing.assert_allclose(result["per_class_accuracy"], EXPECTED_PER_CLASS)


def test_metrics_match_the_hand_computed_confusion():
    assert_hand_computed(compute_point_cloud_accuracy(PREDICTIONS, REFERENCES, num_classes=5))
    # Without num_classes the largest index seen (the predicted 4) sets the size.
    assert np.array_equal(confusion_matrix(PREDICTIONS, REFERENCES), EXPECTED_MATRIX)


def test_invalid_inputs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match=r"equal length, got shapes \(2,\) and \(3,\)"):
        confusion_matrix([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match=r"non-empty"):
        confusion_matrix([], [])
    with pytest.raises(ValueError, match=r"references must lie in \[0, 3\), got values in \[0, 3\]"):
        confusion_matrix([0, 1], [0, 3], num_classes=3)


def test_evaluate_module_loads_with_the_network_off(monkeypatch):
    """What `HF_HUB_OFFLINE=1` switches on (read at import time, so patched here), and no socket may connect."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = load_point_cloud_metric()
    metric.add_batch(predictions=PREDICTIONS[:4], references=REFERENCES[:4])
    metric.add_batch(predictions=PREDICTIONS[4:], references=REFERENCES[4:])
    assert_hand_computed(metric.compute(num_classes=5))


def test_confusion_matrix_plot_is_a_png_written_atomically(tmp_path):
    path = plot_confusion_matrix(EXPECTED_MATRIX, ["a", "b", "c", "d", "e"], tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 300 and width > 300
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"shape \(5, 5\) does not match 2 class names"):
        plot_confusion_matrix(EXPECTED_MATRIX, ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_training_curves_plot_one_panel_per_quantity(tmp_path):
    records = [
        {"epoch": 1, "step": 10, "train_loss": 2.1, "learning_rate": 5e-4},
        {"epoch": 1, "step": 10, "eval_loss": 1.9, "eval_accuracy": 0.41, "eval_runtime": 3.2},
        {"epoch": 2, "step": 20, "train_loss": 1.2, "learning_rate": 2.5e-4},
        {"epoch": 2, "step": 20, "eval_loss": 1.3, "eval_accuracy": 0.62, "eval_mean_class_accuracy": 0.55},
    ]
    wide = plot_training_curves(records, tmp_path / "curves.png")
    narrow = plot_training_curves(
        [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0}], tmp_path / "one.png"
    )
    # loss, learning_rate, accuracy and mean_class_accuracy panels vs one loss panel: four times as wide.
    assert matplotlib.image.imread(wide).shape[1] == 4 * matplotlib.image.imread(narrow).shape[1]
    with pytest.raises(ValueError, match=r"No loss, accuracy or learning-rate values"):
        plot_training_curves([{"epoch": 1, "eval_runtime": 3.0}], tmp_path / "empty.png")
