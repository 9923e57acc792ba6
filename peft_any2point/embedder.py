"""3D point embedder: point clouds become backbone-width tokens and their 3D centres (Point-PN style).

Every stage samples centres by farthest point sampling, groups their k nearest neighbours and pools a feature per
centre. Linear maps commute with gathering, so each stage applies its learned maps to the N point features once
and gathers afterwards; per neighbour only an element-wise subtraction, GELU and the max+mean pooling remain. That
divides the stage's FLOPs by k compared with running an MLP on every (centre, neighbour) pair.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peft_any2point.ops import farthest_point_sampling, gather_points, knn_indices


class TrigonometricEncoding(nn.Module):
    """Parameter-free sin/cos encoding of xyz at `dim // 6` geometric frequencies per axis."""

    def __init__(self, dim: int, alpha: float, beta: float) -> None:
        super().__init__()
        num_frequencies = dim // 6
        exponents = torch.arange(num_frequencies, dtype=torch.float32) / num_frequencies
        self.register_buffer("frequencies", beta / alpha**exponents, persistent=False)

    def forward(self, xyz: Tensor) -> Tensor:
        angles = xyz.float().unsqueeze(-1) * self.frequencies  # (..., 3, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 6F)


class GroupingStage(nn.Module):
    """One embedder stage: FPS centres, kNN groups, pooled relative features.

    For a centre c with neighbours j the pre-activation is `A f_j - B f_c + P (x_j - x_c)`: a learned function of
    the neighbour, the centre and their offset, computed as point-wise maps before grouping.
    """

    def __init__(self, in_dim: int, out_dim: int, num_neighbors: int) -> None:
        super().__init__()
        self.num_neighbors = num_neighbors
        self.neighbor_proj = nn.Linear(in_dim, out_dim)
        self.centre_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.offset_proj = nn.Linear(3, out_dim, bias=False)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(out_dim)
        self.mixer = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU())

    def forward(self, xyz: Tensor, features: Tensor, num_centres: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            centre_index = farthest_point_sampling(xyz, num_centres)  # (B, M)
            centres = gather_points(xyz, centre_index)  # (B, M, 3)
            neighbor_index = knn_indices(centres, xyz, min(self.num_neighbors, xyz.shape[1]))  # (B, M, k)
        offsets = self.offset_proj(xyz)  # (B, N, C)
        point_terms = self.neighbor_proj(features) + offsets  # (B, N, C)
        centre_terms = self.centre_proj(gather_points(features, centre_index)) + gather_points(offsets, centre_index)
        grouped = self.act(gather_points(point_terms, neighbor_index) - centre_terms.unsqueeze(2))  # (B, M, k, C)
        pooled = self.norm(grouped.amax(dim=2) + grouped.mean(dim=2))  # (B, M, C)
        return centres, pooled + self.mixer(pooled)


class PointEmbedder(nn.Module):
    """Points (B, N, 3) -> tokens (B, T, hidden) and token centres (B, T, 3)."""

    def __init__(
        self,
        hidden_size: int,
        num_tokens: int,
        stage_widths: list[int],
        num_neighbors: int,
        encoding_dim: int,
        trig_alpha: float,
        trig_beta: float,
    ) -> None:
        super().__init__()
        self.encoding = TrigonometricEncoding(encoding_dim, trig_alpha, trig_beta)
        widths = [encoding_dim, *stage_widths]
        self.stages = nn.ModuleList(
            GroupingStage(widths[i], widths[i + 1], num_neighbors) for i in range(len(stage_widths))
        )
        self.centres_per_stage = [num_tokens * 2 ** (len(stage_widths) - 1 - i) for i in range(len(stage_widths))]
        self.to_hidden = nn.Linear(stage_widths[-1], hidden_size)

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        xyz, features = points, self.encoding(points)  # (B, N, 3), (B, N, E)
        for stage, num_centres in zip(self.stages, self.centres_per_stage, strict=True):
            xyz, features = stage(xyz, features, num_centres)
        return self.to_hidden(features), xyz  # (B, T, hidden), (B, T, 3)
