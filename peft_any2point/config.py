"""Configuration of the Any2Point tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType


ProjectionKind = Literal["auto", "1d", "2d", "rotary", "learned", "none"]


@dataclass
class Any2PointConfig(PeftConfig):
    """Configuration of an Any2Point adapter (arXiv 2404.07989).

    The frozen backbone receives point tokens from a small trainable 3D embedder; their position encodings come
    from the backbone's own frozen position table through a virtual projection of the token centres, and a guided
    adapter after every block adds local 3D context. Everything trainable lives in the adapter file.

    Fields whose name starts with `backbone_` are filled in when the adapter is attached and are used to refuse
    loading an adapter onto a model it was not trained for.
    """

    num_labels: int = field(default=40, metadata={"help": "Number of classes of the classification head."})
    num_tokens: int = field(
        default=128, metadata={"help": "Point tokens T fed to the backbone (centres kept by the last embedder stage)."}
    )
    num_stages: int = field(
        default=3,
        metadata={
            "help": "Embedder stages; each samples half as many centres as the one before, the last keeps num_tokens, "
            "so the input needs at least num_tokens * 2**(num_stages - 1) points."
        },
    )
    num_neighbors: int = field(default=24, metadata={"help": "Neighbours k grouped around every centre, per stage."})
    stage_widths: list[int] = field(
        default_factory=lambda: [48, 96, 192],
        metadata={
            "help": "Feature width of each embedder stage (len == num_stages); the last is mapped to the backbone width."
        },
    )
    point_encoding_dim: int = field(
        default=48, metadata={"help": "Width of the trigonometric encoding of raw xyz (a multiple of 6)."}
    )
    trig_alpha: float = field(default=1000.0, metadata={"help": "Frequency base of the trigonometric point encoding."})
    trig_beta: float = field(default=100.0, metadata={"help": "Scale applied to coordinates before the sin/cos."})
    outlier_neighbors: int = field(
        default=0,
        metadata={
            "help": "Statistical outlier filter before the embedder, off at 0: a point whose mean distance to this "
            "many nearest points is unusually large moves onto its nearest inlier, so that farthest point sampling "
            "does not make tokens of stray points. Costs an N x N kNN per cloud."
        },
    )
    outlier_std_ratio: float = field(
        default=4.0,
        metadata={"help": "Outlier threshold: robust standard deviations above the cloud's median isolation."},
    )
    projection: ProjectionKind = field(
        default="auto",
        metadata={
            "help": "How token centres get position encodings: '1d' line or '2d' image-plane virtual projection onto "
            "the frozen backbone table, 'rotary' fractional position ids, 'learned' an MLP of xyz (ablation), 'none' "
            "(ablation), or 'auto' to choose from the backbone."
        },
    )
    num_views: int = field(default=6, metadata={"help": "Virtual views V whose interpolated encodings are averaged."})
    camera_distance: float = field(
        default=1.6,
        metadata={"help": "Distance of the virtual camera from the origin for the 2D perspective projection."},
    )
    num_virtual_positions: int | None = field(
        default=None,
        metadata={"help": "Length of the 1D range points are spread over; None uses the backbone's whole table."},
    )
    use_adapter: bool = field(default=True, metadata={"help": "Insert a bottleneck adapter after every block."})
    adapter_dim: int = field(default=16, metadata={"help": "Bottleneck width r of the adapters."})
    adapter_scale: float = field(default=0.5, metadata={"help": "Scale of the adapter's residual update."})
    adapter_dropout: float = field(default=0.1, metadata={"help": "Dropout inside the adapter bottleneck."})
    use_local_guidance: bool = field(
        default=True,
        metadata={"help": "Per-view local attention among tokens that share a projected cell (the 'guided' part)."},
    )
    use_view_ensemble: bool = field(
        default=True,
        metadata={
            "help": "Weight the views by cosine similarity to a 3D voxel reference; False averages the views uniformly."
        },
    )
    local_cells_1d: int = field(default=16, metadata={"help": "Cells the 1D position range is cut into for guidance."})
    local_cells_2d: int = field(default=8, metadata={"help": "Cells per image axis for 2D guidance."})
    voxel_size: float = field(
        default=0.12, metadata={"help": "Edge of the 3D voxels of the reference, in input units."}
    )
    local_scale: float = field(default=0.5, metadata={"help": "Mixing coefficient of the local-guidance branch."})
    head_hidden_size: int = field(default=256, metadata={"help": "Hidden width of the classification head."})
    head_dropout: float = field(default=0.5, metadata={"help": "Dropout in the classification head."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy loss."})
    backbone_dropout: bool = field(
        default=False,
        metadata={
            "help": "Keep the frozen backbone's own dropout active in training. Off by default: the frozen blocks "
            "then run as at inference, and on CPU attention keeps its fused kernel (about 1.7x faster blocks)."
        },
    )
    backbone_architecture: str | None = field(
        default=None, metadata={"help": "Filled on attach: class name of the backbone the adapter was made for."}
    )
    backbone_hidden_size: int | None = field(default=None, metadata={"help": "Filled on attach: backbone width."})
    backbone_num_layers: int | None = field(default=None, metadata={"help": "Filled on attach: backbone depth."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ANY2POINT
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.num_stages < 1 or len(self.stage_widths) != self.num_stages:
            raise ValueError(
                f"stage_widths needs one width per stage: num_stages={self.num_stages}, stage_widths={self.stage_widths}"
            )
        if self.num_tokens < 1 or self.num_neighbors < 1:
            raise ValueError(f"num_tokens and num_neighbors must be >= 1, got {self.num_tokens}, {self.num_neighbors}")
        if self.outlier_neighbors < 0 or self.outlier_std_ratio <= 0:
            raise ValueError(
                f"outlier_neighbors must be >= 0 and outlier_std_ratio > 0, got {self.outlier_neighbors}, "
                f"{self.outlier_std_ratio}"
            )
        if self.point_encoding_dim % 6:
            raise ValueError(
                f"point_encoding_dim must be a multiple of 6 (sin and cos per axis), got {self.point_encoding_dim}"
            )
        if self.projection not in ("auto", "1d", "2d", "rotary", "learned", "none"):
            raise ValueError(f"unknown projection {self.projection!r}")
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if self.camera_distance <= 1.0:
            raise ValueError(
                f"camera_distance must exceed 1 (points lie in the unit sphere), got {self.camera_distance}"
            )

    @property
    def min_points(self) -> int:
        """Fewest input points the first embedder stage can sample its centres from."""
        return self.num_tokens * 2 ** (self.num_stages - 1)
