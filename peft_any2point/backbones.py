"""Find, at run time, the parts of a Hugging Face transformer that Any2Point needs.

Module paths drift between transformers releases (ViT moved its blocks from `encoder.layer` to `layers`), so
nothing here is keyed on a release: the block stack is the `ModuleList` with one entry per hidden layer, and the
position table, input norm and final norm are looked up by the names the architectures use, wherever they sit.

How each kind of position encoding is handled:

- a learned or sinusoidal table (BERT, CLIP, ViT/DINOv2, the Whisper encoder's 1500 sinusoids, AST's
  frequency x time grid): layout "1d" or "2d", the virtual projection interpolates the frozen table;
- a rotary embedding module (Llama/Qwen2/Mistral decoders, ModernBERT): layout "rotary", the virtual projection
  becomes fractional position ids fed to that module (see `rotary_position_embeddings`);
- no table at all (wav2vec2/HuBERT's convolutional encoding): layout "none". The convolution runs over the token
  sequence, whose order means nothing for point tokens, so it is deliberately skipped; the tuner falls back to the
  1D projection onto a sinusoidal stand-in table. The encoder's own `layer_norm` still runs where the pre-trained
  blocks expect it: before them for post-norm encoders (`do_stable_layer_norm=False`), after them otherwise.
- encoder-decoder models (e.g. a full `WhisperModel`): only the encoder is used.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


Layout = Literal["1d", "2d", "rotary", "none"]

# Suffixes of module/parameter names, most specific first.
_POSITION_TABLE_NAMES = (
    "embeddings.position_embeddings",
    "embeddings.position_embedding",
    "embed_positions",
    "position_embeddings",
    "position_embedding",
    "wpe",
)
_INPUT_NORM_NAMES = (
    "embeddings.LayerNorm",
    "embeddings.layer_norm",
    "embeddings.norm",
    "pre_layrnorm",
    "pre_layernorm",
)
_FINAL_NORM_NAMES = ("final_layer_norm", "final_norm", "encoder.layer_norm", "layernorm", "layer_norm", "norm", "ln_f")
_ROTARY_NAMES = ("rotary_emb", "rotary_embedding", "rotary_embeddings")


@dataclass
class BackboneSpec:
    """The parts of a backbone that the Any2Point forward runs, and how its position table is laid out.

    `position_table` is a frozen view of the backbone's own table parameter `position_weight` (never a copy, and
    taken at each use, so that it follows the backbone to another device): rows `[0, num_special_positions)`
    are special slots (class/distillation tokens), the rest is a 1D sequence or a row-major `grid_shape` grid.
    Rotary backbones have no table: `max_positions` is the sequence length they were trained for, and
    `rotary_layer_types` names, per block, the rotary variant to ask for (ModernBERT's global/local layers), or is
    None where the rotary module has a single variant.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    blocks: nn.ModuleList
    layout: Layout
    position_weight: nn.Parameter | None
    num_special_positions: int
    grid_shape: tuple[int, int] | None
    input_norm: nn.Module | None
    final_norm: nn.Module | None
    rotary_embedding: nn.Module | None
    causal_attention: bool
    max_positions: int | None = None
    rotary_layer_types: tuple[str, ...] | None = None

    @property
    def position_table(self) -> Tensor | None:
        """The position table as (positions, width), detached from autograd."""
        if self.position_weight is None:
            return None
        return self.position_weight.detach().reshape(-1, self.position_weight.shape[-1])

    @property
    def grid_table(self) -> Tensor | None:
        """The table rows that virtual positions are interpolated in (special slots excluded)."""
        if self.position_table is None:
            return None
        return self.position_table[self.num_special_positions :]

    @property
    def cls_position(self) -> Tensor | None:
        """Position encoding of the class token: the backbone's slot 0 where it has one."""
        if self.position_table is None or self.layout == "rotary":
            return None
        return self.position_table[0]


def _config_value(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _find_by_suffix(
    model: nn.Module, suffixes: tuple[str, ...], exclude: nn.Module | None = None, width: int | None = None
) -> tuple[str, nn.Module] | None:
    """First module whose dotted name ends with one of `suffixes` (in their order), outside `exclude`.

    With `width`, only modules whose weight is a (width,) vector count: wav2vec2's `feature_projection.layer_norm`
    normalises the convolutional features, not the hidden states, and must not be taken for the encoder's norm.
    """
    excluded = {id(m) for m in exclude.modules()} if exclude is not None else set()
    modules = [(n, m) for n, m in model.named_modules() if id(m) not in excluded]
    if width is not None:
        modules = [(n, m) for n, m in modules if _vector_weight_width(m) == width]
    for suffix in suffixes:
        for name, module in modules:
            if name == suffix or name.endswith("." + suffix):
                return name, module
    return None


def _vector_weight_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 1 else None


def _find_position_table(model: nn.Module, blocks: nn.ModuleList) -> nn.Parameter | None:
    excluded = {id(p) for p in blocks.parameters()}
    params = {n: p for n, p in model.named_parameters() if id(p) not in excluded}
    for suffix in _POSITION_TABLE_NAMES:
        for name, param in params.items():
            stem = name.removesuffix(".weight")
            if stem == suffix or stem.endswith("." + suffix):
                return param
    return None


def _find_blocks(model: nn.Module, num_layers: int | None) -> nn.ModuleList:
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    if num_layers is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == num_layers] or candidates
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} is not supported by Any2Point: no stack of transformer blocks (a ModuleList of "
            "identical layers with linear projections) was found"
        )
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))[1]


def _grid_shape(model: nn.Module, config: object) -> tuple[int, int] | None:
    """Patch grid of a 2D backbone, or None for a sequence model."""
    for module in model.modules():  # AST: its embeddings know the frequency x time patch grid, wherever they sit
        if callable(getattr(module, "get_shape", None)):
            rows, cols = module.get_shape(config)
            return int(rows), int(cols)
    image_size = _config_value(config, "image_size")
    patch_size = _config_value(config, "patch_size")
    if image_size is None or patch_size is None:
        return None
    size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patch = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    return size[0] // patch[0], size[1] // patch[1]


def _has_causal_attention(block: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) is True for m in block.modules())


def _encoder_of(model: nn.Module, config: object) -> nn.Module:
    """The module to search: the encoder of an encoder-decoder model (points need no decoder), else the model."""
    get_encoder = getattr(model, "get_encoder", None)
    if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
        encoder = get_encoder()
        if isinstance(encoder, nn.Module) and encoder is not model:
            return encoder
    return model


def _rotary_layer_types(
    architecture: str, rotary: nn.Module, config: object, num_layers: int
) -> tuple[str, ...] | None:
    """Per-block rotary variant for rotary modules whose forward takes a `layer_type` (ModernBERT), else None."""
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or len(layer_types) != num_layers:
        raise ValueError(
            f"{architecture}: its rotary embedding needs a layer type per block, but the config's `layer_types` is "
            f"{layer_types!r} for {num_layers} blocks"
        )
    return tuple(layer_types)


def resolve_backbone(model: nn.Module) -> BackboneSpec:
    """Locate blocks, position table and norms of `model`, raising a ValueError that names what is missing."""
    config = getattr(model, "config", None)
    architecture = type(model).__name__
    if config is None:
        raise ValueError(f"{architecture} is not a transformers model (it has no `config`)")
    hidden_size = _config_value(config, "hidden_size", "d_model", "n_embd")
    if hidden_size is None:
        raise ValueError(f"{architecture} is not supported by Any2Point: its config names no hidden size")
    hidden_size = int(hidden_size)
    num_layers = _config_value(config, "num_hidden_layers", "encoder_layers", "n_layer")
    model = _encoder_of(model, config)
    blocks = _find_blocks(model, num_layers)

    table = _find_position_table(model, blocks)
    rotary = _find_by_suffix(model, _ROTARY_NAMES, exclude=blocks)
    num_special, grid, max_positions, layer_types = 0, None, None, None
    if table is not None:
        if table.shape[-1] != hidden_size:
            raise ValueError(
                f"{type(model).__name__}: position table width {table.shape[-1]} differs from hidden size {hidden_size}"
            )
        grid = _grid_shape(model, config)
        if grid is not None:
            num_rows = table[..., 0].numel()
            num_special = num_rows - grid[0] * grid[1]
            if num_special < 0:
                raise ValueError(
                    f"{type(model).__name__}: position table has {num_rows} rows, fewer than its "
                    f"{grid[0]}x{grid[1]} patch grid"
                )
        layout: Layout = "2d" if grid is not None else "1d"
    elif rotary is not None:
        layout = "rotary"
        if not block_accepts(blocks[0], "position_embeddings"):
            raise ValueError(
                f"{architecture} is not supported by Any2Point: it has a rotary embedding, but its blocks take no "
                "`position_embeddings` (cos, sin) argument"
            )
        max_positions = _config_value(config, "max_position_embeddings")
        if max_positions is None:
            raise ValueError(f"{architecture}: rotary backbone whose config names no `max_position_embeddings`")
        layer_types = _rotary_layer_types(architecture, rotary[1], config, len(blocks))
    else:
        layout = "none"

    input_norm = _find_by_suffix(model, _INPUT_NORM_NAMES, exclude=blocks, width=hidden_size)
    final_norm = _find_by_suffix(model, _FINAL_NORM_NAMES, exclude=blocks, width=hidden_size)
    if input_norm is not None and final_norm is not None and input_norm[1] is final_norm[1]:
        final_norm = None
    if input_norm is None and getattr(config, "do_stable_layer_norm", None) is False:
        # wav2vec2-style post-norm encoders normalise the summed position encoding before their first block
        input_norm, final_norm = final_norm, None
    return BackboneSpec(
        architecture=architecture,
        hidden_size=hidden_size,
        num_layers=len(blocks),
        blocks=blocks,
        layout=layout,
        position_weight=table,
        num_special_positions=num_special,
        grid_shape=grid,
        input_norm=input_norm[1] if input_norm else None,
        final_norm=final_norm[1] if final_norm else None,
        rotary_embedding=rotary[1] if rotary else None,
        causal_attention=_has_causal_attention(blocks[0]),
        max_positions=int(max_positions) if max_positions is not None else None,
        rotary_layer_types=layer_types,
    )


def block_accepts(block: nn.Module, argument: str) -> bool:
    """Whether a block's forward takes `argument` by name."""
    return argument in inspect.signature(block.forward).parameters


def run_block(block: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: object) -> Tensor:
    """Run one backbone block on (B, S, D) states with full (bidirectional) attention among the point tokens."""
    output = block(hidden_states, attention_mask=attention_mask, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def full_attention_mask(spec: BackboneSpec, hidden_states: Tensor) -> Tensor | None:
    """An all-visible additive mask for blocks that would otherwise attend causally; None where not needed.

    Causal decoders (Llama, Qwen2, Mistral) attend causally under sdpa and eager attention only when they get no
    mask, so an explicit all-zero mask makes point tokens attend both ways. It also lifts sliding windows (Qwen2,
    Mistral, ModernBERT's local layers), which those implementations apply only through the mask: a window over
    sequence indices would cut an arbitrary set of neighbours, since the order of point tokens carries no meaning.
    """
    if not spec.causal_attention:
        return None
    batch, length = hidden_states.shape[:2]
    return torch.zeros(batch, 1, length, length, dtype=hidden_states.dtype, device=hidden_states.device)


def rotary_position_embeddings(
    spec: BackboneSpec, positions: Tensor, like: Tensor, layer_type: str | None = None
) -> tuple[Tensor, Tensor]:
    """(cos, sin) (B, S, head_dim) of the backbone's own rotary module at fractional `positions` (B, V, S).

    The V views are combined per frequency: the k-th fastest rotary frequency turns by the token's position in
    view `k mod V`. Every pair of dimensions still gets a true rotation, so query and key norms and the relative-
    position property of RoPE hold for each frequency (as in axial / multimodal RoPE, which give frequency bands to
    different axes). Averaging cos and sin over views would instead shrink the fast frequencies towards zero.
    `like` supplies dtype and device, as the rotary modules expect.
    """
    batch, num_views, length = positions.shape
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    cos, sin = spec.rotary_embedding(like, positions.reshape(batch * num_views, length), **kwargs)
    view = _frequency_views(spec, num_views, kwargs, like.device)  # (head_dim,)
    index = view.view(1, 1, 1, -1).expand(batch, 1, length, -1)
    cos = cos.reshape(batch, num_views, length, -1).gather(1, index)[:, 0]
    sin = sin.reshape(batch, num_views, length, -1).gather(1, index)[:, 0]
    return cos, sin


def _frequency_views(spec: BackboneSpec, num_views: int, kwargs: dict[str, str], device: torch.device) -> Tensor:
    """View index of every rotary dimension, read off the rotary module itself (whatever its dimension layout).

    At position 1 each dimension turns by its frequency; dimensions that share a frequency get the same view, and
    frequencies are dealt to the views round-robin from the fastest down (a head with fewer frequencies than views
    leaves the last views out).
    """
    probe = torch.zeros(1, device=device)  # float32, so that no two frequencies round to one value
    cos, sin = spec.rotary_embedding(probe, torch.ones(1, 1, device=device), **kwargs)
    angle = torch.atan2(sin, cos).flatten()
    _, rank = torch.unique(-angle, return_inverse=True)  # 0 = fastest frequency
    return rank % num_views
