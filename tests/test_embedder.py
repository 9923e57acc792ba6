"""The 3D embedder against a naive per-(centre, neighbour) computation, and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peft_any2point.embedder import RELATIVE_ALPHA, RELATIVE_BETA, GroupingStage, PointEmbedder, robust_spread
from peft_any2point.ops import farthest_point_sampling, knn_indices, snap_outliers


def sincos(values: torch.Tensor, dim: int, alpha: float, beta: float) -> torch.Tensor:
    """sin/cos of each coordinate at `ceil(dim / 6)` geometric frequencies, element by element, first `dim` kept."""
    count = math.ceil(dim / 6)
    parts = []
    for value in values.tolist():
        angles = [beta / alpha ** (i / count) * value for i in range(count)]
        parts += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    return torch.tensor(parts[:dim])


def tiny_embedder(**options) -> PointEmbedder:
    """32-wide tokens, 8 of them, from 2 stages (16 then 8 centres) of 4 neighbours."""
    return PointEmbedder(
        hidden_size=32,
        num_tokens=8,
        stage_widths=[12, 24],
        num_neighbors=4,
        encoding_dim=12,
        trig_alpha=1000,
        trig_beta=100,
        **options,
    )


def test_stage_matches_a_naive_loop_over_centres_and_neighbours():
    torch.manual_seed(0)
    batch, num_points, in_dim, out_dim, k, num_centres = 2, 40, 12, 16, 5, 8  # 16: not a multiple of 6
    stage = GroupingStage(in_dim, out_dim, k).double()
    xyz = torch.randn(batch, num_points, 3, dtype=torch.float64)
    features = torch.randn(batch, num_points, in_dim, dtype=torch.float64)
    centres, pooled = stage(xyz, features, num_centres)

    A, b = stage.neighbor_proj.weight, stage.neighbor_proj.bias
    B, P = stage.centre_proj.weight, stage.offset_proj.weight
    for cloud in range(batch):
        centre_index = farthest_point_sampling(xyz[cloud : cloud + 1], num_centres)[0]
        neighbors = knn_indices(xyz[cloud : cloud + 1, centre_index], xyz[cloud : cloud + 1], k)[0]
        offsets = [[xyz[cloud, j] - xyz[cloud, c] for j in neighbors[m]] for m, c in enumerate(centre_index)]
        spread = torch.stack([d for row in offsets for d in row]).abs().flatten().median() * 1.4826 + 1e-5
        for m, c in enumerate(centre_index.tolist()):
            torch.testing.assert_close(centres[cloud, m], xyz[cloud, c])
            rows = []
            for j, d in zip(neighbors[m].tolist(), offsets[m], strict=True):
                g = F.gelu(A @ features[cloud, j] + b - B @ features[cloud, c] + P @ (d / spread))
                e = sincos(d / spread, out_dim, RELATIVE_ALPHA, RELATIVE_BETA).double()
                rows.append((g + e) * e)
            rows = torch.stack(rows)
            expected = stage.pooling.norm(rows.max(dim=0).values + rows.mean(dim=0))
            expected = expected + stage.mixer(expected)
            torch.testing.assert_close(pooled[cloud, m], expected, rtol=1e-5, atol=1e-6)  # encodings run in fp32


def test_embedder_tokens_and_centres_from_the_input_cloud():
    torch.manual_seed(1)
    embedder = tiny_embedder()
    assert embedder.centres_per_stage == [16, 8]
    points = torch.randn(3, 64, 3)
    tokens, centres = embedder(points)
    assert tokens.shape == (3, 8, 32) and centres.shape == (3, 8, 3)
    # every token centre is one of the input points
    assert (centres[:, :, None] == points[:, None]).all(dim=-1).any(dim=-1).all()


def test_embedder_stays_finite_when_all_points_coincide():
    embedder = tiny_embedder()
    tokens, centres = embedder(torch.full((2, 64, 3), 0.3))
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(centres, torch.full((2, 8, 3), 0.3))


def test_outlier_filter_keeps_stray_points_out_of_the_token_centres():
    torch.manual_seed(4)
    points = F.normalize(torch.randn(2, 64, 3), dim=-1)
    points[:, :2] *= 4  # two far-off points per cloud: FPS would pick them first
    filtering = tiny_embedder(outlier_neighbors=6, outlier_std_ratio=3.0)
    plain = tiny_embedder()
    plain.load_state_dict(filtering.state_dict())
    tokens, centres = filtering(points)
    assert centres.norm(dim=-1).sub(1).abs().max() < 1e-6
    assert plain(points)[1].norm(dim=-1).max() > 3.9
    expected, _ = plain(snap_outliers(points, 6, 3.0))
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def parameter_gradients(embedder: PointEmbedder, points: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """All parameter gradients of a fixed linear read-out of the tokens, flattened into one vector."""
    embedder.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        tokens, _ = embedder(points)
    (tokens.float() * torch.linspace(-1, 1, tokens.shape[-1])).sum().backward()
    return torch.cat([p.grad.flatten() for p in embedder.parameters()])


@pytest.mark.slow  # inductor compiles C++ for a few seconds
def test_compiled_pooling_matches_eager_and_keeps_the_state_dict_keys():
    torch.manual_seed(2)
    embedder = tiny_embedder()
    points = torch.randn(3, 64, 3)
    keys = list(embedder.state_dict())
    expected, _ = embedder(points)
    expected_gradients = parameter_gradients(embedder, points)
    embedder.compile_pooling()
    compiled, _ = embedder(points)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-5)
    assert list(embedder.state_dict()) == keys
    torch.testing.assert_close(parameter_gradients(embedder, points), expected_gradients, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # inductor compiles C++ for a few seconds
def test_compiled_pooling_gradients_under_bf16_autocast_stay_finite_and_close_to_fp32():
    # Regression: inductor's unrounded bf16 chain made amax's backward count no maximum, giving NaN gradients.
    torch.manual_seed(3)
    embedder = tiny_embedder()
    points = F.normalize(torch.randn(4, 64, 3), dim=-1)
    reference = parameter_gradients(embedder, points)
    embedder.compile_pooling()
    gradients = parameter_gradients(embedder, points, bf16=True)
    assert torch.isfinite(gradients).all()
    assert (gradients - reference).norm() / reference.norm() < 0.02  # bf16 matmuls: measured 0.3 % at full size


def test_robust_spread_estimates_the_standard_deviation_and_ignores_outliers():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(2, 256, 16, 3, generator=generator) * torch.tensor([0.05, 0.2])[:, None, None, None]
    spread = robust_spread(offsets)
    torch.testing.assert_close(spread, offsets.flatten(1).std(dim=1), rtol=0.03, atol=0)
    corrupted = offsets.clone()
    corrupted[:, :4] = 50.0  # 4 of 256 groups made of far-away points
    assert corrupted.flatten(1).std(dim=1).min() > 10 * spread.max()  # what the standard deviation would become
    torch.testing.assert_close(robust_spread(corrupted), spread, rtol=0.05, atol=0)
