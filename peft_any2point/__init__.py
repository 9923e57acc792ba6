"""Any2Point for Hugging Face peft: any pre-trained transformer learns 3D point clouds.

`import peft_any2point` registers the method with peft, so that `get_peft_model` and `PeftModel.from_pretrained`
know the `ANY2POINT` peft type.
"""

from peft_any2point.registry import register


register()

from peft_any2point.config import Any2PointConfig  # noqa: E402
from peft_any2point.model import Any2PointModel, PointCloudClassifierOutput  # noqa: E402


__all__ = ["Any2PointConfig", "Any2PointModel", "PointCloudClassifierOutput"]
__version__ = "0.1.0"
