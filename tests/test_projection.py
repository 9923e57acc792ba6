"""Virtual projection and table interpolation, checked against independent NumPy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_any2point.projection import (
    interpolate_table_1d,
    interpolate_table_2d,
    line_directions,
    project_1d,
    project_2d,
    sinusoidal_table,
    stretch_to_unit,
    view_rotations,
)


HAND_MADE = torch.tensor(
    [[[0.0, 0.0, 0.0], [0.5, -0.25, 0.1], [-0.3, 0.8, -0.6], [0.9, 0.2, 0.4], [-0.7, -0.5, 0.3]]]
)  # (1, 5, 3)


def numpy_lerp_rows(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = np.empty((len(positions), table.shape[1]))
    for i, p in enumerate(positions):
        lo = min(math.floor(p), len(table) - 2)
        w = p - lo
        out[i] = (1 - w) * table[lo] + w * table[lo + 1]
    return out


def numpy_bilinear(grid: np.ndarray, row: float, col: float) -> np.ndarray:
    """grid (H, W, D) sampled at fractional (row, col) with edge clamping."""
    height, width = grid.shape[:2]
    r0 = min(math.floor(row), max(height - 2, 0))
    c0 = min(math.floor(col), max(width - 2, 0))
    r1, c1 = min(r0 + 1, height - 1), min(c0 + 1, width - 1)
    wr, wc = row - r0, col - c0
    return (
        (1 - wr) * (1 - wc) * grid[r0, c0]
        + (1 - wr) * wc * grid[r0, c1]
        + wr * (1 - wc) * grid[r1, c0]
        + wr * wc * grid[r1, c1]
    )


def test_view_rotations_are_six_distinct_proper_rotations():
    rotations = view_rotations(6).double()
    identity = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), identity)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(6, dtype=torch.float64))
    forward_axes = rotations[:, 2, :]  # where each camera's depth axis points in world coordinates
    assert len({tuple(a.round(decimals=6).tolist()) for a in forward_axes}) == 6
    with pytest.raises(ValueError, match="between 1 and 6"):
        view_rotations(0)


def test_line_directions_are_equiangular():
    directions = line_directions(6).double()
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(6, dtype=torch.float64))
    cosines = (directions @ directions.T).abs()
    off_diagonal = cosines[~torch.eye(6, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, 1 / math.sqrt(5)))


def test_1d_positions_and_encodings_match_independent_computation():
    length, width = 11, 4
    table = torch.randn(length, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    views = project_1d(HAND_MADE, num_views=3, num_cells=4)

    centres = HAND_MADE[0].double().numpy()
    for v, direction in enumerate(line_directions(3).double().numpy()):
        along = centres @ direction
        unit = (along - along.min()) / (along.max() - along.min())
        np.testing.assert_allclose(views.unit_coords[0, v, :, 0].numpy(), unit, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(views.cell_ids[0, v].numpy(), np.minimum((unit * 4).astype(int), 3))
        # The interpolation is checked at the projected (float32) positions, so that their rounding, checked above,
        # is not multiplied by the table's slopes here.
        projected = views.unit_coords[0, v, :, 0].double().numpy()
        expected = numpy_lerp_rows(table.numpy(), projected * (length - 1))
        got = interpolate_table_1d(table, views.unit_coords[:, v].double())[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_1d_extremes_land_exactly_on_the_first_and_last_rows():
    table = torch.randn(7, 3)
    views = project_1d(HAND_MADE, num_views=1, num_cells=2)
    encodings = interpolate_table_1d(table, views.unit_coords)[0, 0]  # (T, D)
    along = HAND_MADE[0] @ line_directions(1)[0]
    assert torch.equal(encodings[along.argmin()], table[0])
    assert torch.equal(encodings[along.argmax()], table[-1])
    assert int(views.cell_ids.max()) == 1  # the end of the range belongs to the last cell, not one past it


def test_all_centres_at_one_spot_map_to_the_middle_without_nan():
    same_spot = torch.full((2, 6, 3), 0.3)
    for views in (project_1d(same_spot, 6, 8), project_2d(same_spot, 6, 1.6, 4)):
        assert torch.isfinite(views.unit_coords).all()
        assert torch.equal(views.unit_coords, torch.full_like(views.unit_coords, 0.5))
    table = torch.arange(10.0).unsqueeze(1)
    assert torch.equal(interpolate_table_1d(table, torch.full((1, 1), 0.5)), torch.tensor([[4.5]]))


def test_stretch_to_unit_is_per_row_min_max():
    values = torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0]])
    assert torch.equal(stretch_to_unit(values), torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.5, 0.5]]))


def test_2d_perspective_projection_matches_independent_pinhole_camera():
    distance = 1.6
    views = project_2d(HAND_MADE, num_views=2, camera_distance=distance, num_cells=3)
    centres = HAND_MADE[0].double().numpy()
    right = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # 90 degrees about y
    for v, rotation in enumerate([np.eye(3), right]):
        camera = centres @ rotation.T
        x = camera[:, 0] / (camera[:, 2] + distance)
        y = camera[:, 1] / (camera[:, 2] + distance)
        rows = (-y - (-y).min()) / np.ptp(-y)
        cols = (x - x.min()) / np.ptp(x)
        np.testing.assert_allclose(views.unit_coords[0, v, :, 0].numpy(), rows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(views.unit_coords[0, v, :, 1].numpy(), cols, rtol=1e-5, atol=1e-6)
        cells = np.minimum((rows * 3).astype(int), 2) * 3 + np.minimum((cols * 3).astype(int), 2)
        np.testing.assert_array_equal(views.cell_ids[0, v].numpy(), cells)


@pytest.mark.parametrize("grid_shape", [(3, 5), (5, 3), (1, 4), (4, 1), (2, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_2d_bilinear_interpolation_on_non_square_grids(grid_shape):
    rows, cols = grid_shape
    table = torch.randn(rows * cols, 6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(2, 7, 2, generator=generator, dtype=torch.float64)
    unit[0, 0] = torch.tensor([0.0, 0.0])
    unit[0, 1] = torch.tensor([1.0, 1.0])
    unit[0, 2] = torch.tensor([0.0, 1.0])
    got = interpolate_table_2d(table, grid_shape, unit)
    grid = table.numpy().reshape(rows, cols, 6)  # row-major: row index * cols + column index
    for b in range(2):
        for t in range(7):
            r, c = unit[b, t].tolist()
            expected = numpy_bilinear(grid, r * (rows - 1), c * (cols - 1))
            np.testing.assert_allclose(got[b, t].numpy(), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[0, 0], table[0])  # top-left patch
    assert torch.equal(got[0, 1], table[-1])  # bottom-right patch
    assert torch.equal(got[0, 2], table[cols - 1])  # top-right patch: end of the first row


def test_interpolation_rejects_mismatched_tables():
    with pytest.raises(ValueError, match="does not match grid shape"):
        interpolate_table_2d(torch.randn(14, 2), (3, 5), torch.rand(1, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        interpolate_table_1d(torch.randn(1, 2), torch.rand(3, 1))


def test_sinusoidal_table_matches_formula():
    table = sinusoidal_table(50, 8)
    increment = math.log(10000.0) / 3
    for position in (0, 7, 49):
        for i in range(4):
            angle = position * math.exp(-increment * i)
            assert table[position, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[position, 4 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)
