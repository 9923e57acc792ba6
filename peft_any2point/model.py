"""The Any2Point tuner: a frozen transformer becomes a 3D point-cloud classifier.

Everything trainable lives in one `Any2PointModules` per adapter, held by the tuner in the `any2point` ModuleDict,
so adapter files never depend on the backbone's module names. The backbone's own forward is routed, per model
instance, to `Any2PointModel.forward_points` whenever it is called with `points=`, which is what makes a reloaded
`PeftModel` callable as `model(points=...)`; all other calls (e.g. `input_ids=`) still reach the original forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn
from transformers.utils import ModelOutput

from peft_any2point.adapter import GuidedAdapter, LocalGeometry
from peft_any2point.backbones import (
    BackboneSpec,
    full_attention_mask,
    resolve_backbone,
    rotary_position_embeddings,
    run_block,
)
from peft_any2point.config import Any2PointConfig
from peft_any2point.embedder import PointEmbedder
from peft_any2point.projection import (
    ProjectedViews,
    interpolate_table_1d,
    interpolate_table_2d,
    project_1d,
    project_2d,
    sinusoidal_table,
)


@dataclass
class PointCloudClassifierOutput(ModelOutput):
    """Output of an Any2Point forward: `logits` (B, num_labels), `loss` when labels are given."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: Tensor | None = None


@torch.compiler.disable  # its checks need concrete values: eager under torch.compile too
def validate_points(points: object, min_points: int) -> Tensor:
    """Refuse input the embedder cannot use, with a message that says what is wrong."""
    if not isinstance(points, Tensor):
        raise ValueError(f"points must be a torch.Tensor of shape (batch, num_points, 3), got {type(points).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (batch, num_points, 3), got {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ValueError("points is an empty batch (batch size 0)")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating-point tensor, got dtype {points.dtype}")
    if points.shape[1] < min_points:
        raise ValueError(
            f"each cloud needs at least {min_points} points (num_tokens * 2**(num_stages - 1)), got {points.shape[1]}"
        )
    finite = torch.isfinite(points).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"points contain NaN or infinite values in sample(s) {bad[:10]}")
    return points


def resolve_projection(config: Any2PointConfig, spec: BackboneSpec) -> str:
    """The projection actually used: 'auto' follows the backbone's layout.

    Backbones without any position table or rotary module (wav2vec2/HuBERT's convolutional encoding) fall back to
    the 1D projection onto a sinusoidal stand-in table (see `Any2PointModel._line_table`).
    """
    if config.projection != "auto":
        if config.projection == "2d" and spec.layout != "2d":
            raise ValueError(f"projection='2d' needs a backbone with a 2D patch grid; {spec.architecture} has none")
        if config.projection == "rotary" and spec.layout != "rotary":
            raise ValueError(f"projection='rotary' needs a rotary-position backbone; {spec.architecture} is not one")
        return config.projection
    return {"1d": "1d", "2d": "2d", "rotary": "rotary", "none": "1d"}[spec.layout]


@contextlib.contextmanager
def backbone_dropout_mode(blocks: nn.Module, backbone_dropout: bool) -> Iterator[None]:
    """Run frozen `blocks` without their dropout unless `backbone_dropout` (`Any2PointConfig`), then restore their
    train mode: without dropout they compute in training exactly what they compute at inference."""
    training = blocks.training
    blocks.train(training and backbone_dropout)
    try:
        yield
    finally:
        blocks.train(training)


class PointClassificationHead(nn.Module):
    """concat(class token, max over point tokens) -> hidden -> hidden -> labels, with LayerNorm/GELU/Dropout."""

    def __init__(self, hidden_size: int, head_hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2 * hidden_size, head_hidden_size),
            nn.LayerNorm(head_hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden_size, head_hidden_size),
            nn.LayerNorm(head_hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden_size, num_labels),
        )

    @staticmethod
    def pool(hidden_states: Tensor) -> Tensor:
        """The head's input (B, 2D): the class token next to the max over the point tokens."""
        return torch.cat([hidden_states[:, 0], hidden_states[:, 1:].amax(dim=1)], dim=-1)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.layers(self.pool(hidden_states))


class Any2PointModules(nn.Module):
    """All trainable parts of one adapter: embedder, class token, adapters, final norm and head."""

    def __init__(self, config: Any2PointConfig, spec: BackboneSpec) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.embedder = PointEmbedder(
            hidden_size=hidden,
            num_tokens=config.num_tokens,
            stage_widths=list(config.stage_widths),
            num_neighbors=config.num_neighbors,
            encoding_dim=config.point_encoding_dim,
            trig_alpha=config.trig_alpha,
            trig_beta=config.trig_beta,
            outlier_neighbors=config.outlier_neighbors,
            outlier_std_ratio=config.outlier_std_ratio,
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        if config.projection == "learned":
            self.learned_position = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, hidden))
        self.adapters = nn.ModuleList(
            GuidedAdapter(
                hidden_size=hidden,
                bottleneck=config.adapter_dim,
                scale=config.adapter_scale,
                dropout=config.adapter_dropout,
                use_local_guidance=config.use_local_guidance,
                use_view_ensemble=config.use_view_ensemble,
                local_scale=config.local_scale,
            )
            for _ in range(spec.num_layers if config.use_adapter else 0)
        )
        self.norm = nn.LayerNorm(hidden)
        if isinstance(spec.final_norm, nn.LayerNorm) and spec.final_norm.weight is not None:
            with torch.no_grad():  # start from the backbone's own output statistics
                self.norm.weight.copy_(spec.final_norm.weight)
                if spec.final_norm.bias is not None:  # ModernBERT's norms have no bias
                    self.norm.bias.copy_(spec.final_norm.bias)
        self.head = PointClassificationHead(hidden, config.head_hidden_size, config.num_labels, config.head_dropout)


class RoutedForward:
    """The forward of a backbone with Any2Point attached: point clouds go to its tuner, anything else as before.

    A plain object in the backbone's `__dict__` (not a closure, not a submodule), so that `copy.deepcopy` and
    pickling carry the backbone and tuner over together: a copy's points reach the copy's own adapter.
    """

    def __init__(self, backbone: nn.Module, tuner: Any2PointModel) -> None:
        self.backbone, self.tuner = backbone, tuner

    def __call__(self, *args: Any, points: Tensor | None = None, **kwargs: Any) -> Any:
        if points is None:
            return type(self.backbone).forward(self.backbone, *args, **kwargs)
        return self.tuner.forward_points(points, *args, **kwargs)


class Any2PointModel(BaseTuner):
    """Any2Point (arXiv 2404.07989) as a peft tuner: any frozen transformer learns 3D point clouds.

    Example:

        ```py
        >>> import peft_any2point  # registers the method with peft
        >>> from peft import get_peft_model
        >>> from peft_any2point import Any2PointConfig
        >>> from transformers import BertConfig, BertModel
        >>> base = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))
        >>> model = get_peft_model(base, Any2PointConfig(num_labels=40, num_tokens=32))
        >>> model.print_trainable_parameters()  # doctest: +SKIP
        >>> logits = model(points=torch.rand(2, 128, 3)).logits  # (2, 40)
        ```
    """

    prefix: str = "any2point_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - peft's class attribute
    modules_attribute = "any2point"

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._route_backbone_forward()

    # ----- attaching -----------------------------------------------------------------------------------------

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone's blocks and position table, located once per tuner."""
        if "_backbone_spec" not in self.__dict__:
            self.__dict__["_backbone_spec"] = resolve_backbone(self.model)
        return self.__dict__["_backbone_spec"]

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Build the trainable modules of `adapter_name` for this backbone (the backbone itself is not modified)."""
        config: Any2PointConfig = self.peft_config[adapter_name]
        spec = self.backbone_spec
        self._check_backbone_matches(config, spec)
        config.backbone_architecture = spec.architecture
        config.backbone_hidden_size = spec.hidden_size
        config.backbone_num_layers = spec.num_layers
        projection = resolve_projection(config, spec)
        if self.modules_attribute not in self._modules:
            self.any2point = nn.ModuleDict()
        device = next(iter(model.parameters())).device
        modules = Any2PointModules(config, spec).to(device)
        modules.projection = projection
        self.any2point[adapter_name] = modules
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            modules.requires_grad_(False)

    @staticmethod
    def _check_backbone_matches(config: Any2PointConfig, spec: BackboneSpec) -> None:
        expected = (config.backbone_architecture, config.backbone_hidden_size, config.backbone_num_layers)
        actual = (spec.architecture, spec.hidden_size, spec.num_layers)
        if config.backbone_architecture is not None and expected != actual:
            raise ValueError(
                f"this Any2Point adapter was made for a {expected[0]} with hidden size {expected[1]} and {expected[2]} "
                f"layers, but the base model is a {actual[0]} with hidden size {actual[1]} and {actual[2]} layers"
            )

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("Any2Point does not replace backbone modules; see inject_adapter")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for name, modules in self.any2point.items():
            modules.requires_grad_(name in self.active_adapters)

    # ----- peft's adapter management -------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"Any2Point runs one adapter at a time, got {names}")
        if names[0] not in self.any2point:
            raise ValueError(f"adapter {names[0]!r} does not exist; available: {list(self.any2point)}")
        self.active_adapter = names[0]
        for name, modules in self.any2point.items():
            modules.requires_grad_(name == names[0] and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        del self.any2point[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.any2point)
            self.active_adapter = remaining[0] if remaining else []

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            raise ValueError("Any2Point adds new modules around the backbone; there is nothing to merge into it")
        self.model.__dict__.pop("forward", None)
        return self.model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"{cls.modules_attribute}.{adapter_name}.", f"{cls.modules_attribute}.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any2PointConfig, adapter_name: str, state_dict: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Map checkpoint keys to this adapter and refuse files whose tensors do not fit it."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            key: value
            for key, value in model.state_dict().items()
            if f".{cls.modules_attribute}.{adapter_name}." in key
        }
        missing = sorted(set(expected) - set(remapped))
        unexpected = sorted(set(remapped) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter file does not match this Any2Point model: {len(missing)} missing tensors "
                f"{[cls._remove_adapter_name_from_key(k, adapter_name) for k in missing[:3]]}, {len(unexpected)} "
                f"unexpected {unexpected[:3]}"
            )
        wrong = [k for k, v in remapped.items() if v.shape != expected[k].shape]
        if wrong:
            key = wrong[0]
            raise ValueError(
                f"adapter tensor {cls._remove_adapter_name_from_key(key, adapter_name)} has shape "
                f"{tuple(remapped[key].shape)} but this model expects {tuple(expected[key].shape)}"
            )
        return remapped

    # ----- forward -------------------------------------------------------------------------------------------

    def _route_backbone_forward(self) -> None:
        """Send `points=` calls of the backbone instance to `forward_points`, everything else to its own forward."""
        self.model.forward = RoutedForward(self.model, self)

    @property
    def _current_adapter(self) -> str:
        names = self.active_adapters
        if len(names) != 1:
            raise ValueError(f"Any2Point runs exactly one active adapter, got {names}")
        return names[0]

    def compile_blocks(self, **options: Any) -> None:
        """Compile every backbone block and every adapter of the active adapter in place (`torch.compile` options).

        On a GPU a training step is bound by the host issuing kernels, not by the chip (H200, MiniLM, B=32: the host
        takes 67 ms to issue a step whose ~2,000 kernels keep the GPU busy 13 ms); a compiled block or adapter is a
        few fused kernels (39 ms a step there). On a 2-core CPU the step gets 4-11 % faster. Compiling in place keeps
        weights and state-dict keys, so adapters save and load as before.
        """
        modules = [*self.backbone_spec.blocks, *self.any2point[self._current_adapter].adapters]
        # Blocks and adapters share their forwards; each (grad mode, train mode, dtype, batch size) may need a graph.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for module in modules:
            module.compile(**options)

    def _position_encoding(
        self, modules: Any2PointModules, config: Any2PointConfig, centres: Tensor
    ) -> tuple[Tensor | None, ProjectedViews]:
        """Position encodings (B, T, D) of the token centres, and the projected views the adapters group by."""
        spec = self.backbone_spec
        if spec.layout == "2d":
            views = project_2d(centres, config.num_views, config.camera_distance, config.local_cells_2d)
        else:
            views = project_1d(centres, config.num_views, config.local_cells_1d)
        if modules.projection in ("none", "rotary"):  # rotary positions enter the attention instead
            return None, views
        if modules.projection == "learned":
            return modules.learned_position(centres), views
        if modules.projection == "2d":
            encodings = interpolate_table_2d(spec.grid_table.float(), spec.grid_shape, views.unit_coords)
        else:
            table = self._line_table(config, centres.device)
            encodings = interpolate_table_1d(table, views.unit_coords)
        return encodings.mean(dim=1), views  # average over the V views

    def _rotary_embeddings(
        self, modules: Any2PointModules, config: Any2PointConfig, views: ProjectedViews, hidden: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Per-block (cos, sin) (B, 1 + T, head_dim) for the class token followed by the point tokens.

        The 1D virtual projection becomes fractional position ids in `[0, L - 1]` (L = `num_virtual_positions` or
        the backbone's `max_position_embeddings`), one row per view, which the backbone's own rotary module turns
        into (cos, sin); see `rotary_position_embeddings` for how the views are combined. The class token sits at
        position 0 in every view, the slot of the BOS/[CLS] token in pre-training (an identity rotation). Other
        projections on a rotary backbone (ablations) put every token at position 0, so the blocks see no rotary
        position at all.
        """
        spec = self.backbone_spec
        length = config.num_virtual_positions or spec.max_positions
        if length > spec.max_positions:
            raise ValueError(f"num_virtual_positions={length} exceeds the backbone's {spec.max_positions} positions")
        points = views.unit_coords[..., 0] * (length - 1)  # (B, V, T)
        if modules.projection != "rotary":
            points = torch.zeros_like(points)
        positions = F.pad(points, (1, 0))  # (B, V, 1 + T): the class token at 0
        layer_types = spec.rotary_layer_types or (None,) * spec.num_layers
        per_type = {kind: rotary_position_embeddings(spec, positions, hidden, kind) for kind in set(layer_types)}
        return [per_type[kind] for kind in layer_types]

    def _line_table(self, config: Any2PointConfig, device: torch.device) -> Tensor:
        """The 1D table points are spread over: the backbone's own rows, or a sinusoidal stand-in without one."""
        spec = self.backbone_spec
        table = spec.grid_table
        length = config.num_virtual_positions or (table.shape[0] if table is not None else 512)
        if table is None:
            return sinusoidal_table(length, spec.hidden_size).to(device)
        if length > table.shape[0]:
            raise ValueError(f"num_virtual_positions={length} exceeds the backbone's {table.shape[0]} positions")
        return table[:length].float()

    def forward_points(
        self,
        points: Tensor,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused: Any,
    ) -> PointCloudClassifierOutput | tuple:
        """Classify point clouds (B, N, 3) with the active adapter; `labels` (B,) adds the cross-entropy loss."""
        adapter_name = self._current_adapter
        config: Any2PointConfig = self.peft_config[adapter_name]
        modules: Any2PointModules = self.any2point[adapter_name]
        spec = self.backbone_spec
        points = validate_points(points, config.min_points)
        if unused:
            raise ValueError(f"unexpected arguments for a point-cloud forward: {sorted(unused)}")

        tokens, centres = modules.embedder(points)  # (B, T, D), (B, T, 3)
        position, views = self._position_encoding(modules, config, centres)
        if position is not None:
            tokens = tokens + position.to(tokens.dtype)
        cls_token = modules.cls_token.expand(tokens.shape[0], -1, -1)
        if spec.cls_position is not None and modules.projection in ("1d", "2d"):
            cls_token = cls_token + spec.cls_position.to(cls_token.dtype)
        hidden = torch.cat([cls_token, tokens], dim=1)  # (B, 1 + T, D)

        # no blocks at all (the embedder-only baseline): stay in the adapter's dtype
        backbone_dtype = next(spec.blocks.parameters(), modules.cls_token).dtype
        hidden = hidden.to(backbone_dtype)
        if spec.input_norm is not None:
            hidden = spec.input_norm(hidden)
        geometry = None
        if config.use_adapter and config.use_local_guidance:
            geometry = LocalGeometry.from_projection(views.cell_ids, centres, config.voxel_size)
        mask = full_attention_mask(spec, hidden)
        rotary = self._rotary_embeddings(modules, config, views, hidden) if spec.layout == "rotary" else None
        adapter_dtype = modules.cls_token.dtype
        with backbone_dropout_mode(spec.blocks, config.backbone_dropout):
            for index, block in enumerate(spec.blocks):
                extra = {"position_embeddings": rotary[index]} if rotary is not None else {}
                hidden = run_block(block, hidden, mask, **extra)
                if config.use_adapter:
                    hidden = modules.adapters[index](hidden.to(adapter_dtype), geometry).to(backbone_dtype)

        hidden = modules.norm(hidden.to(adapter_dtype))
        logits = modules.head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:1] or labels.min() < 0 or labels.max() >= config.num_labels:
                raise ValueError(
                    f"labels must be (batch,) class indices in [0, {config.num_labels}), got shape "
                    f"{tuple(labels.shape)} with range [{int(labels.min())}, {int(labels.max())}]"
                )
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        output = PointCloudClassifierOutput(
            loss=loss, logits=logits, hidden_states=hidden if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()
