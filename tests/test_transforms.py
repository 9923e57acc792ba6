"""Augmentations and corruptions: checked against the geometry they promise, on single clouds and batches."""

import math

import pytest
import torch

from peft_any2point.transforms import (
    CORRUPTIONS,
    OUTLIER_RATIO,
    SEVERITIES,
    Compose,
    RandomJitter,
    RandomPointDropout,
    RandomRotation,
    RandomScaleTranslate,
    RandomSubsample,
    corrupt,
    corrupt_add_outliers,
    corrupt_dropout_global,
    corrupt_dropout_local,
    corrupt_jitter,
    corrupt_occlusion,
    corrupt_rotate,
    corrupt_scale,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_sphere_clouds(batch: int = 3, num_points: int = 256) -> torch.Tensor:
    """Distinct points on the unit sphere: every point can be told apart, so copies are detectable."""
    points = torch.randn(batch, num_points, 3, generator=seeded(123))
    return points / points.norm(dim=2, keepdim=True)


def rows_of(cloud: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row) for row in cloud.tolist()}


AUGMENTATIONS = [
    RandomScaleTranslate(),
    RandomRotation(),
    RandomJitter(),
    RandomPointDropout(),
    Compose([RandomScaleTranslate(), RandomJitter()]),
]


@pytest.mark.parametrize("transform", AUGMENTATIONS, ids=lambda t: type(t).__name__)
def test_augmentations_are_reproducible_and_accept_single_and_batched_clouds(transform):
    clouds = unit_sphere_clouds()
    out = transform(clouds, generator=seeded(1))
    assert out.shape == clouds.shape and out.dtype == clouds.dtype
    assert torch.equal(out, transform(clouds, generator=seeded(1)))
    assert not torch.equal(out, transform(clouds, generator=seeded(2)))
    assert transform(clouds[0], generator=seeded(1)).shape == clouds[0].shape


def test_scale_translate_is_a_per_axis_affine_map_within_the_paper_ranges():
    clouds = unit_sphere_clouds()
    out = RandomScaleTranslate()(clouds, generator=seeded(0))
    scale = (out[:, 1] - out[:, 0]) / (clouds[:, 1] - clouds[:, 0])  # (batch, 3)
    shift = out[:, 0] - clouds[:, 0] * scale
    torch.testing.assert_close(out, clouds * scale[:, None] + shift[:, None])
    assert ((scale >= 2 / 3 - 1e-5) & (scale <= 3 / 2 + 1e-5)).all()
    assert (shift.abs() <= 0.2 + 1e-5).all()
    assert len({tuple(s) for s in scale.tolist()}) == len(clouds)  # one draw per cloud


@pytest.mark.parametrize(("axis", "index"), [("x", 0), ("y", 1), ("z", 2)])
def test_rotation_keeps_norms_and_the_rotation_axis_coordinate(axis, index):
    clouds = unit_sphere_clouds()
    out = RandomRotation(axis=axis)(clouds, generator=seeded(0))
    torch.testing.assert_close(out.norm(dim=2), clouds.norm(dim=2))
    torch.testing.assert_close(out[..., index], clouds[..., index])
    assert not torch.allclose(out, clouds)


def test_rotation_corruption_turns_by_the_severity_angle_right_handed():
    x_axis = torch.tensor([[1.0, 0.0, 0.0]])
    out = corrupt_rotate(x_axis, severity=5, axis="z", generator=seeded(0))  # 30 degrees, random sign
    angle = math.radians(30)
    assert torch.allclose(out, torch.tensor([[math.cos(angle), math.sin(angle), 0.0]]), atol=1e-6) or torch.allclose(
        out, torch.tensor([[math.cos(angle), -math.sin(angle), 0.0]]), atol=1e-6
    )
    y_axis = torch.tensor([[0.0, 1.0, 0.0]])
    z_about_x = corrupt_rotate(y_axis, severity=5, axis="x", generator=seeded(0))
    assert z_about_x[0, 0] == 0 and torch.isclose(z_about_x[0, 1], torch.tensor(math.cos(angle)))


def test_jitter_is_clipped():
    clouds = unit_sphere_clouds()
    out = RandomJitter(sigma=0.05, clip=0.02)(clouds, generator=seeded(0))
    assert (out - clouds).abs().max() <= 0.02 + 1e-6
    assert (out - clouds).abs().max() > 0.019  # σ ≫ clip: the clip is reached


def test_point_dropout_refills_with_copies_of_surviving_points():
    clouds = unit_sphere_clouds()
    out = RandomPointDropout(max_ratio=0.8)(clouds, generator=seeded(0))
    for cloud, dropped in zip(clouds, out, strict=True):
        survivors = rows_of(dropped)
        assert survivors <= rows_of(cloud)
        assert len(survivors) >= round(0.2 * len(cloud))


def test_subsample_keeps_distinct_input_points():
    clouds = unit_sphere_clouds(num_points=64)
    out = RandomSubsample(16)(clouds, generator=seeded(0))
    assert out.shape == (3, 16, 3)
    for cloud, subset in zip(clouds, out, strict=True):
        assert len(rows_of(subset)) == 16 and rows_of(subset) <= rows_of(cloud)
    with pytest.raises(ValueError, match=r"Cannot subsample 128 points from clouds of 64"):
        RandomSubsample(128)(clouds)


def test_compose_threads_one_generator_through_the_transforms():
    clouds = unit_sphere_clouds()
    pipeline = Compose([RandomRotation(), RandomSubsample(100)])
    generator = seeded(5)
    expected = RandomSubsample(100)(RandomRotation()(clouds, generator=generator), generator=generator)
    assert torch.equal(pipeline(clouds, generator=seeded(5)), expected)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_keep_the_point_count_and_are_reproducible(name, severity):
    clouds = unit_sphere_clouds()
    out = corrupt(clouds, name, severity, generator=seeded(0))
    assert out.shape == clouds.shape and torch.isfinite(out).all()
    assert torch.equal(out, corrupt(clouds, name, severity, generator=seeded(0)))
    assert corrupt(clouds[0], name, severity, generator=seeded(0)).shape == clouds[0].shape


def test_corruption_strength_grows_with_severity():
    clouds = unit_sphere_clouds()
    for name in CORRUPTIONS:
        change = [(corrupt(clouds, name, s, generator=seeded(0)) - clouds).abs().mean() for s in SEVERITIES]
        assert change == sorted(change), name


def test_jitter_corruption_has_the_severity_standard_deviation():
    clouds = unit_sphere_clouds(batch=4, num_points=1024)
    noise = corrupt_jitter(clouds, severity=3, generator=seeded(0)) - clouds
    assert abs(noise.std().item() - 0.03) < 0.001


def test_global_dropout_removes_exactly_the_severity_share():
    clouds = unit_sphere_clouds()
    out = corrupt_dropout_global(clouds, severity=3, generator=seeded(0))  # 50%
    assert [len(rows_of(cloud)) for cloud in out] == [128, 128, 128]
    assert all(rows_of(o) <= rows_of(c) for o, c in zip(out, clouds, strict=True))


def test_local_dropout_removes_whole_neighbourhoods():
    clouds = unit_sphere_clouds(batch=1, num_points=400)
    out = corrupt_dropout_local(clouds, severity=5, generator=seeded(0))  # 4 balls of 50 points
    removed = rows_of(clouds[0]) - rows_of(out[0])
    assert 50 <= len(removed) <= 200
    # A removed point's nearest kept neighbour is farther than its nearest removed one: holes, not thinning.
    removed_points = torch.tensor(sorted(removed))
    kept_points = torch.tensor(sorted(rows_of(out[0])))
    to_kept = torch.cdist(removed_points, kept_points).min(dim=1).values
    to_removed = torch.cdist(removed_points, removed_points).fill_diagonal_(math.inf).min(dim=1).values
    assert (to_removed < to_kept).float().mean() > 0.8


def test_occlusion_removes_the_far_side_along_the_view():
    # Points on a line: any viewing direction's far side is one end of the line.
    line = torch.zeros(4, 50, 3)
    line[..., 0] = torch.linspace(-1, 1, 50)
    out = corrupt_occlusion(line, severity=2, generator=seeded(0))  # 20%: 10 points
    for occluded in out:
        kept = sorted(occluded[:, 0].unique().tolist())
        assert len(kept) == 40
        assert kept in (line[0, :40, 0].tolist(), line[0, 10:, 0].tolist())


def test_outliers_replace_the_severity_share_inside_the_bounding_sphere():
    clouds = unit_sphere_clouds(batch=2, num_points=1000)
    out = corrupt_add_outliers(clouds, severity=4, generator=seeded(0))
    changed = (out != clouds).any(dim=2).sum(dim=1)
    assert changed.tolist() == [round(OUTLIER_RATIO[3] * 1000)] * 2
    assert (out.norm(dim=2) <= clouds.norm(dim=2).amax(dim=1, keepdim=True) + 0.05).all()


def test_scale_corruption_distorts_the_aspect_but_keeps_the_radius():
    clouds = unit_sphere_clouds()
    out = corrupt_scale(clouds, severity=5, generator=seeded(0))
    radius = (clouds - clouds.mean(dim=1, keepdim=True)).norm(dim=2).amax(dim=1)
    torch.testing.assert_close((out - out.mean(dim=1, keepdim=True)).norm(dim=2).amax(dim=1), radius)
    extents = out.amax(dim=1) - out.amin(dim=1)
    assert (extents.amax(dim=1) / extents.amin(dim=1) > 1.2).all()


def test_invalid_arguments_are_rejected_with_a_reason():
    clouds = unit_sphere_clouds()
    with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3, 4, 5\), got 6"):
        corrupt(clouds, "jitter", 6)
    with pytest.raises(ValueError, match=r"Unknown corruption 'snow'"):
        corrupt(clouds, "snow", 1)
    with pytest.raises(ValueError, match=r"axis must be one of \('x', 'y', 'z'\), got 'w'"):
        RandomRotation(axis="w")
    with pytest.raises(ValueError, match=r"Expected points of shape \(N, 3\) or \(B, N, 3\), got \(3, 256, 4\)"):
        RandomJitter()(torch.zeros(3, 256, 4))
    with pytest.raises(ValueError, match=r"max_ratio must be in \[0, 1\), got 1.0"):
        RandomPointDropout(max_ratio=1.0)
