"""Any-to-3D guided adapter: a bottleneck adapter after every frozen block, guided by local 3D structure.

In the bottleneck space the point tokens attend only to tokens that share a projected cell in a view (one
attention per view, with weights shared across views), are mean-pooled per cell, and the V views are combined with
weights from their cosine similarity to a 3D voxel reference (max + mean of the tokens in each voxel). Everything
is computed per sample, so a sample's output never depends on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LocalGeometry:
    """Per-forward grouping of the T point tokens, shared by all adapters.

    `cell_mask` (B, V, T, T) is True where two tokens share a projected cell in a view and `cell_mean` is the same
    relation as a row-normalised averaging operator; `voxel_mean` (B, T, T) averages over tokens in the same 3D
    voxel and `voxel_groups` (B, T) gives each token the index of the first token of its voxel (a per-sample group
    id for the scatter max).
    """

    cell_mask: Tensor
    cell_mean: Tensor
    voxel_mean: Tensor
    voxel_groups: Tensor

    @classmethod
    def from_projection(cls, cell_ids: Tensor, centres: Tensor, voxel_size: float) -> LocalGeometry:
        cell_mask = cell_ids.unsqueeze(-1) == cell_ids.unsqueeze(-2)  # (B, V, T, T)
        voxels = torch.floor(centres.float() / voxel_size).long()  # (B, T, 3)
        voxel_mask = (voxels.unsqueeze(2) == voxels.unsqueeze(1)).all(-1)  # (B, T, T)
        # argmax of a boolean row returns its first True: the lowest token index of the voxel.
        return cls(
            cell_mask=cell_mask,
            cell_mean=_averaging_operator(cell_mask),
            voxel_mean=_averaging_operator(voxel_mask),
            voxel_groups=voxel_mask.byte().argmax(-1),
        )


def _averaging_operator(same_group: Tensor) -> Tensor:
    """Row-normalised adjacency: multiplying by it replaces each token by the mean of its group."""
    adjacency = same_group.float()
    return adjacency / adjacency.sum(-1, keepdim=True)


def group_max(values: Tensor, groups: Tensor) -> Tensor:
    """Max of `values` (B, T, C) over tokens with the same group id (B, T), broadcast back to every token."""
    index = groups.unsqueeze(-1).expand_as(values)
    maxima = torch.full_like(values, torch.finfo(values.dtype).min).scatter_reduce(
        -2, index, values, reduce="amax", include_self=True
    )
    return maxima.gather(-2, index)


class GuidedAdapter(nn.Module):
    """Residual bottleneck adapter with an optional local-3D-guidance branch.

    `up` starts at zero, so a fresh adapter leaves the frozen block's output unchanged.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        scale: float,
        dropout: float,
        use_local_guidance: bool,
        use_view_ensemble: bool,
        local_scale: float,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.local_scale = local_scale
        self.use_local_guidance = use_local_guidance
        self.use_view_ensemble = use_view_ensemble
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if use_local_guidance:
            self.local_qkv = nn.Linear(bottleneck, 3 * bottleneck)
            self.local_norm = nn.LayerNorm(bottleneck)

    def local_guidance(self, tokens: Tensor, geometry: LocalGeometry) -> Tensor:
        """Cell-restricted attention per view, cell pooling, and the voxel-guided view ensemble: (B, T, r)."""
        query, key, value = self.local_qkv(tokens).chunk(3, dim=-1)  # each (B, T, r)
        # Projections are shared by the views, so the scores are too; only the cell masks differ per view.
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5  # (B, T, T)
        scores = scores.unsqueeze(1).float().masked_fill(~geometry.cell_mask, float("-inf"))  # (B, V, T, T)
        attended = scores.softmax(dim=-1) @ value.unsqueeze(1).float()  # (B, V, T, r)
        per_view = self.act(self.local_norm(geometry.cell_mean @ attended))
        if not self.use_view_ensemble:
            return per_view.mean(dim=1)
        tokens = tokens.float()
        reference = group_max(tokens, geometry.voxel_groups) + geometry.voxel_mean @ tokens  # (B, T, r)
        similarity = F.cosine_similarity(per_view, reference.unsqueeze(1), dim=-1)  # (B, V, T)
        weights = similarity.softmax(dim=1).unsqueeze(-1)
        return (weights * per_view).sum(dim=1)

    def forward(self, hidden_states: Tensor, geometry: LocalGeometry | None) -> Tensor:
        """`hidden_states` (B, 1 + T, D): the class token first, then the T point tokens."""
        bottleneck = self.act(self.down(hidden_states))  # (B, 1 + T, r)
        if self.use_local_guidance and geometry is not None:
            local = self.local_guidance(bottleneck[:, 1:], geometry)
            bottleneck = torch.cat([bottleneck[:, :1], bottleneck[:, 1:] + self.local_scale * local], dim=1)
        return hidden_states + self.scale * self.up(self.dropout(bottleneck))
