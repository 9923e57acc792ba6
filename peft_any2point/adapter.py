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

    `cell_bias` (B, V, T, T) is 0 where two tokens share a projected cell in a view and -inf elsewhere, an additive
    attention mask; `cell_groups` (B, V, T) and `voxel_groups` (B, T) give each token the index of the first token
    of its cell or 3D voxel, a per-sample group id for the group mean and max.
    """

    cell_bias: Tensor
    cell_groups: Tensor
    voxel_groups: Tensor

    @classmethod
    def from_projection(cls, cell_ids: Tensor, centres: Tensor, voxel_size: float) -> LocalGeometry:
        same_cell = cell_ids.unsqueeze(-1) == cell_ids.unsqueeze(-2)  # (B, V, T, T)
        voxels = torch.floor(centres.float() / voxel_size).long()  # (B, T, 3)
        same_voxel = (voxels.unsqueeze(2) == voxels.unsqueeze(1)).all(-1)  # (B, T, T)
        # argmax of a boolean row returns its first True: the lowest token index of the group.
        return cls(
            cell_bias=torch.zeros(same_cell.shape, device=same_cell.device).masked_fill(~same_cell, float("-inf")),
            cell_groups=same_cell.byte().argmax(-1),
            voxel_groups=same_voxel.byte().argmax(-1),
        )


def group_max(values: Tensor, groups: Tensor) -> Tensor:
    """Max of `values` (..., T, C) over tokens with the same group id (..., T), broadcast back to every token."""
    index = groups.unsqueeze(-1).expand_as(values)
    maxima = torch.full_like(values, torch.finfo(values.dtype).min).scatter_reduce(
        -2, index, values, reduce="amax", include_self=True
    )
    return maxima.gather(-2, index)


def group_mean(values: Tensor, groups: Tensor) -> Tensor:
    """Mean of `values` (..., T, C) over tokens with the same group id (..., T), broadcast back to every token.

    A scatter-add and a gather, O(T C), where multiplying by a (T, T) averaging matrix would cost O(T² C).
    """
    index = groups.unsqueeze(-1).expand_as(values)
    sums = torch.zeros_like(values).scatter_add(-2, index, values).gather(-2, index)
    sizes = torch.zeros_like(groups).scatter_add(-1, groups, torch.ones_like(groups)).gather(-1, groups)
    return sums / sizes.unsqueeze(-1)


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
        scores = scores.unsqueeze(1).float() + geometry.cell_bias  # (B, V, T, T)
        attended = scores.softmax(dim=-1) @ value.unsqueeze(1).float()  # (B, V, T, r)
        per_view = self.act(self.local_norm(group_mean(attended.float(), geometry.cell_groups)))
        if not self.use_view_ensemble:
            return per_view.mean(dim=1)
        tokens = tokens.float()
        reference = group_max(tokens, geometry.voxel_groups) + group_mean(tokens, geometry.voxel_groups)  # (B, T, r)
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
