"""`evaluate` metric for point-cloud classification: overall, mean-class and per-class accuracy, confusion matrix.

Shipped inside `peft_any2point` so that it loads with the network off (`evaluate.load("accuracy")` needs the hub):

    from peft_any2point.metrics import load_point_cloud_metric
    metric = load_point_cloud_metric()
    metric.add_batch(predictions=logits.argmax(-1), references=labels)
    metric.compute(num_classes=40)
"""

import datasets
import evaluate

from peft_any2point.metrics import compute_point_cloud_accuracy


_DESCRIPTION = """
Overall accuracy (OA, `accuracy`) is the fraction of clouds classified correctly. Mean class accuracy (mAcc,
`mean_class_accuracy`) averages the per-class recall over the classes present in the references, so that rare
classes weigh as much as common ones. `per_class_accuracy[c]` is NaN for a class absent from the references.
`confusion_matrix[i][j]` counts clouds of reference class i predicted as class j.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    num_classes (`int`, optional): number of classes; defaults to 1 + the largest index seen.
Returns:
    accuracy (`float`), mean_class_accuracy (`float`), per_class_accuracy (`list` of `float`),
    confusion_matrix (`list` of `list` of `int`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PointCloudAccuracy(evaluate.Metric):
    """Thin `evaluate` wrapper; the arithmetic lives in `peft_any2point.metrics` (one implementation, tested)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        return compute_point_cloud_accuracy(predictions, references, num_classes=num_classes)
