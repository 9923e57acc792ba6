"""3D-to-any virtual projection: token centres become positions in the backbone's own position grid.

Each of V virtual views maps the 3D token centres either onto a line (1D backbones: language, audio as a
sequence) or onto an image plane through a perspective camera (2D backbones: vision, spectrogram patches).
Positions are stretched per sample to the grid's full extent, and the frozen position table of the backbone is
interpolated there; the V encodings are then averaged. The same projected coordinates also define the local
cells that the guided adapter attends within.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


MAX_VIEWS = 6
# Degenerate spread below which all centres are treated as one spot (they land mid-grid).
_MIN_SPREAD = 1e-6


def _axis_rotation(axis: int, degrees: float) -> Tensor:
    """Right-handed rotation matrix about coordinate axis `axis` (0=x, 1=y, 2=z)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = (axis + 1) % 3, (axis + 2) % 3  # the rotated plane, in right-handed (cyclic) order
    rotation = torch.eye(3, dtype=torch.float64)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


def view_rotations(num_views: int) -> Tensor:
    """Rotations (V, 3, 3) of the cube of virtual cameras: front, right, back, left, top, bottom."""
    if not 1 <= num_views <= MAX_VIEWS:
        raise ValueError(f"num_views must be between 1 and {MAX_VIEWS}, got {num_views}")
    cube = [
        _axis_rotation(1, 0.0),
        _axis_rotation(1, 90.0),
        _axis_rotation(1, 180.0),
        _axis_rotation(1, 270.0),
        _axis_rotation(0, 90.0),
        _axis_rotation(0, -90.0),
    ]
    return torch.stack(cube[:num_views]).float()


def line_directions(num_views: int) -> Tensor:
    """Unit directions (V, 3) of the 1D views: the six diagonals of an icosahedron.

    Any two of them meet at the same angle, so no view is a mirror image of another (a reversed line would only
    repeat its partner's ordering).
    """
    if not 1 <= num_views <= MAX_VIEWS:
        raise ValueError(f"num_views must be between 1 and {MAX_VIEWS}, got {num_views}")
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    diagonals = torch.tensor(
        [[0.0, 1.0, phi], [0.0, -1.0, phi], [1.0, phi, 0.0], [-1.0, phi, 0.0], [phi, 0.0, 1.0], [phi, 0.0, -1.0]]
    )
    return F.normalize(diagonals[:num_views], dim=-1)


def stretch_to_unit(values: Tensor) -> Tensor:
    """Min-max normalise the last dimension of `values` to [0, 1], per sample and view.

    A sample whose values all coincide (spread below 1e-6) maps to 0.5 instead of dividing by zero, and the result
    is clamped so that rounding never reaches past either end of the grid.
    """
    low = values.amin(dim=-1, keepdim=True)
    spread = values.amax(dim=-1, keepdim=True) - low
    unit = (values - low) / spread.clamp_min(_MIN_SPREAD)
    return torch.where(spread > _MIN_SPREAD, unit, torch.full_like(unit, 0.5)).clamp(0.0, 1.0)


@dataclass
class ProjectedViews:
    """Where the V virtual views put the token centres.

    `unit_coords` are in [0, 1] per grid axis (1D: (B, V, T, 1); 2D: (B, V, T, 2) as (row, column)), so a grid of
    size n along an axis puts a token at `unit * (n - 1)`. `cell_ids` (B, V, T) number the local cells of the guided
    adapter: tokens of one sample and view with the same id are neighbours in that view.
    """

    unit_coords: Tensor
    cell_ids: Tensor


def project_1d(centres: Tensor, num_views: int, num_cells: int) -> ProjectedViews:
    """Project centres (B, T, 3) onto V lines through the origin."""
    directions = line_directions(num_views).to(centres)
    along_line = torch.einsum("btc,vc->bvt", centres.float(), directions.float())  # (B, V, T)
    unit = stretch_to_unit(along_line)
    cells = (unit * num_cells).long().clamp_max(num_cells - 1)
    return ProjectedViews(unit_coords=unit.unsqueeze(-1), cell_ids=cells)


def project_2d(centres: Tensor, num_views: int, camera_distance: float, num_cells: int) -> ProjectedViews:
    """Perspective-project centres (B, T, 3) into V virtual cameras placed `camera_distance` from the origin."""
    rotations = view_rotations(num_views).to(centres.device)
    in_view = torch.einsum("vij,btj->bvti", rotations, centres.float())  # (B, V, T, 3)
    depth = in_view[..., 2] + camera_distance  # > 0 for points inside the unit sphere
    depth = depth.clamp_min(1e-3)
    image_x = in_view[..., 0] / depth
    image_y = in_view[..., 1] / depth
    # Rows grow downwards in an image: the highest point goes to row 0.
    unit = torch.stack([stretch_to_unit(-image_y), stretch_to_unit(image_x)], dim=-1)  # (B, V, T, 2)
    cells = (unit * num_cells).long().clamp_max(num_cells - 1)
    return ProjectedViews(unit_coords=unit, cell_ids=cells[..., 0] * num_cells + cells[..., 1])


def interpolate_table_1d(table: Tensor, unit_coords: Tensor) -> Tensor:
    """Linearly interpolate a 1D position table (L, D) at unit coordinates (..., 1) -> (..., D)."""
    length = table.shape[0]
    if length < 2:
        raise ValueError(f"a 1D position table needs at least 2 rows, got {length}")
    position = unit_coords[..., 0] * (length - 1)
    lower = position.floor().long().clamp(0, length - 2)
    weight = (position - lower).unsqueeze(-1).to(table.dtype)
    return torch.lerp(table[lower], table[lower + 1], weight)


def interpolate_table_2d(table: Tensor, grid_shape: tuple[int, int], unit_coords: Tensor) -> Tensor:
    """Bilinearly interpolate a row-major 2D position grid (H*W, D) at (row, column) unit coordinates (..., 2).

    `align_corners=True` makes unit 0 and 1 the centres of the first and last patch, matching the stretch of the
    centres to `[0, n - 1]` patch indices; a grid axis of size 1 is sampled at its only row or column.
    """
    rows, cols = grid_shape
    if table.shape[0] != rows * cols:
        raise ValueError(f"position grid of {table.shape[0]} rows does not match grid shape {grid_shape}")
    image = table.t().reshape(1, table.shape[1], rows, cols)  # (1, D, H, W)
    sample_xy = unit_coords.flip(-1) * 2.0 - 1.0  # grid_sample wants (x=column, y=row) in [-1, 1]
    if cols == 1:
        sample_xy[..., 0] = 0.0
    if rows == 1:
        sample_xy[..., 1] = 0.0
    flat = sample_xy.reshape(1, -1, 1, 2).to(table.dtype)
    sampled = F.grid_sample(image, flat, mode="bilinear", padding_mode="border", align_corners=True)  # (1, D, P, 1)
    return sampled[0, :, :, 0].t().reshape(*unit_coords.shape[:-1], table.shape[1])


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """Sin/cos position table (length, dim), Whisper's layout: the first half sines, the second half cosines.

    Stands in for a learned table on backbones whose position encoding is not a table (e.g. wav2vec2's
    convolutional encoding), so that the 1D virtual projection still has positions to interpolate.
    """
    if dim % 2:
        raise ValueError(f"a sinusoidal table needs an even width, got {dim}")
    half = dim // 2
    increment = math.log(10000.0) / max(half - 1, 1)
    inverse_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)
