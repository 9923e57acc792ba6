"""Point-cloud augmentations and corruptions, on torch tensors of xyz points.

Every callable accepts one cloud (N, 3) or a batch (B, N, 3), draws one set of random parameters per cloud, and
takes an optional `torch.Generator` so that a run (or a robustness benchmark) is reproducible. Augmentations are
small composable classes (`Compose([RandomScaleTranslate(), RandomJitter()])`); corruptions are functions of a
severity 1..5 in the spirit of ModelNet40-C / ModelNet-C, listed in `CORRUPTIONS` and applied with `corrupt`.

Point-removing operations keep the point count fixed (models need N points): removed points are replaced by
copies of randomly chosen surviving points of the same cloud, so the cloud's shape is that of the survivors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch


Transform = Callable[..., torch.Tensor]

AXES = ("x", "y", "z")


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for transform in self.transforms:
            points = transform(points, generator=generator)
        return points

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class RandomScaleTranslate:
    """Per-axis scale in `scale_range` then shift by up to ±`translate` per axis: the paper's ModelNet40 recipe."""

    def __init__(self, scale_range: tuple[float, float] = (2 / 3, 3 / 2), translate: float = 0.2) -> None:
        self.scale_range, self.translate = scale_range, translate

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _as_batch(points)
        low, high = self.scale_range
        scale = _uniform(batch, (len(batch), 1, 3), low, high, generator)
        shift = _uniform(batch, (len(batch), 1, 3), -self.translate, self.translate, generator)
        return _like_input(batch * scale + shift, single)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale_range={self.scale_range}, translate={self.translate})"


class RandomRotation:
    """Rotate about `axis` by an angle uniform in ±`max_angle` radians.

    The default (any angle about y) is the rotation that Point-BERT-style ScanObjectNN recipes apply.
    """

    def __init__(self, axis: str = "y", max_angle: float = math.pi) -> None:
        _check_axis(axis)
        self.axis, self.max_angle = axis, max_angle

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _as_batch(points)
        angles = _uniform(batch, (len(batch),), -self.max_angle, self.max_angle, generator)
        return _like_input(_rotate(batch, angles, self.axis), single)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis!r}, max_angle={self.max_angle})"


class RandomJitter:
    """Add Gaussian noise of std `sigma` to every coordinate, clipped to ±`clip` (PointNet's jitter)."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        self.sigma, self.clip = sigma, clip

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _as_batch(points)
        return _like_input(_jitter(batch, self.sigma, self.clip, generator), single)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, clip={self.clip})"


class RandomPointDropout:
    """Drop a fraction uniform in [0, `max_ratio`] of each cloud's points, refilled with copies of survivors."""

    def __init__(self, max_ratio: float = 0.875) -> None:
        if not 0 <= max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
        self.max_ratio = max_ratio

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _as_batch(points)
        ratios = _uniform(batch, (len(batch), 1), 0.0, self.max_ratio, generator)
        return _like_input(_drop_random(batch, ratios, generator), single)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio})"


class RandomSubsample:
    """Keep `num_points` points of each cloud, chosen uniformly without replacement (e.g. 1,024 of 2,048)."""

    def __init__(self, num_points: int) -> None:
        self.num_points = num_points

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _as_batch(points)
        if batch.shape[1] < self.num_points:
            raise ValueError(f"Cannot subsample {self.num_points} points from clouds of {batch.shape[1]}")
        keys = torch.rand(batch.shape[:2], generator=generator, device=batch.device)
        indices = keys.argsort(dim=1)[:, : self.num_points]  # a random permutation per cloud, truncated
        return _like_input(_gather_points(batch, indices), single)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_points={self.num_points})"


# Corruptions: severity s = 1..5 picks entry s-1 of each table. Magnitudes follow ModelNet-C where it has the
# corruption (jitter σ, global drop ratio, scaling), and are chosen to span mild..strong otherwise.
JITTER_SIGMA = (0.01, 0.02, 0.03, 0.04, 0.05)
DROPOUT_GLOBAL_RATIO = (0.25, 0.375, 0.5, 0.625, 0.75)
DROPOUT_LOCAL_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5)
DROPOUT_LOCAL_BALLS = 4
ROTATION_DEGREES = (6.0, 12.0, 18.0, 24.0, 30.0)
SCALE_FACTOR = (1.2, 1.4, 1.6, 1.8, 2.0)
OUTLIER_RATIO = (0.01, 0.02, 0.03, 0.04, 0.05)
OCCLUSION_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5)


def corrupt_jitter(points: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise of std `JITTER_SIGMA[s]` on every coordinate (unclipped: sensor noise)."""
    batch, single = _as_batch(points)
    return _like_input(_jitter(batch, _level(JITTER_SIGMA, severity), None, generator), single)


def corrupt_dropout_global(
    points: torch.Tensor, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Remove a random `DROPOUT_GLOBAL_RATIO[s]` of the points (uniformly thinner cloud), refilled from survivors."""
    batch, single = _as_batch(points)
    ratios = torch.full((len(batch), 1), _level(DROPOUT_GLOBAL_RATIO, severity), device=batch.device)
    return _like_input(_drop_random(batch, ratios, generator), single)


def corrupt_dropout_local(
    points: torch.Tensor, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Punch `DROPOUT_LOCAL_BALLS` holes: each removes the nearest `DROPOUT_LOCAL_RATIO[s] / balls` of the points
    around a random point of the cloud (holes may overlap); removed points are refilled from survivors."""
    batch, single = _as_batch(points)
    num_clouds, num_points, _ = batch.shape
    per_ball = max(1, round(_level(DROPOUT_LOCAL_RATIO, severity) * num_points / DROPOUT_LOCAL_BALLS))
    centre_indices = torch.randint(
        num_points, (num_clouds, DROPOUT_LOCAL_BALLS), generator=generator, device=batch.device
    )
    centres = _gather_points(batch, centre_indices)  # (batch, balls, 3)
    nearest = torch.cdist(centres, batch).topk(per_ball, dim=2, largest=False).indices  # (batch, balls, per_ball)
    keep = torch.ones(num_clouds, num_points, dtype=torch.bool, device=batch.device)
    keep.scatter_(1, nearest.flatten(1), False)
    return _like_input(_refill_from_survivors(batch, keep, generator), single)


def corrupt_rotate(
    points: torch.Tensor, severity: int, axis: str = "z", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rotate about `axis` by `ROTATION_DEGREES[s]` degrees with a random sign per cloud."""
    _check_axis(axis)
    batch, single = _as_batch(points)
    sign = torch.randint(2, (len(batch),), generator=generator, device=batch.device) * 2 - 1
    angles = sign.to(batch.dtype) * math.radians(_level(ROTATION_DEGREES, severity))
    return _like_input(_rotate(batch, angles, axis), single)


def corrupt_scale(points: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stretch each axis by a factor log-uniform in [1/S, S] (S = `SCALE_FACTOR[s]`), then rescale the cloud to
    its original radius, so that the corruption is the anisotropic distortion alone, not a change of size."""
    batch, single = _as_batch(points)
    log_factor = math.log(_level(SCALE_FACTOR, severity))
    factors = _uniform(batch, (len(batch), 1, 3), -log_factor, log_factor, generator).exp()
    centre = batch.mean(dim=1, keepdim=True)
    stretched = (batch - centre) * factors
    ratio = _radius(batch - centre) / _radius(stretched).clamp_min(torch.finfo(batch.dtype).tiny)
    return _like_input(stretched * ratio + centre, single)


def corrupt_add_outliers(
    points: torch.Tensor, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace a random `OUTLIER_RATIO[s]` of the points (at least one) by points uniform in the cloud's bounding
    sphere: background clutter and sensor impulses, at a constant point count."""
    batch, single = _as_batch(points)
    num_clouds, num_points, _ = batch.shape
    num_outliers = max(1, round(_level(OUTLIER_RATIO, severity) * num_points))
    victims = torch.rand(num_clouds, num_points, generator=generator, device=batch.device).argsort(dim=1)
    victims = victims[:, :num_outliers]
    directions = torch.randn(num_clouds, num_outliers, 3, generator=generator, device=batch.device, dtype=batch.dtype)
    directions = directions / directions.norm(dim=2, keepdim=True).clamp_min(torch.finfo(batch.dtype).tiny)
    radii = torch.rand(num_clouds, num_outliers, 1, generator=generator, device=batch.device, dtype=batch.dtype)
    centre = batch.mean(dim=1, keepdim=True)
    outliers = centre + directions * radii.pow(1 / 3) * _radius(batch - centre)  # cube root: uniform in volume
    corrupted = batch.clone()
    corrupted.scatter_(1, victims.unsqueeze(-1).expand(-1, -1, 3), outliers)
    return _like_input(corrupted, single)


def corrupt_occlusion(points: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-occlusion seen from a random viewing direction: remove the `OCCLUSION_RATIO[s]` of the points farthest
    from the camera along that direction (the back of the object), refilled from the visible points.

    Without normals or meshes this is a half-space approximation of what a depth sensor misses, not a render.
    """
    batch, single = _as_batch(points)
    view = torch.randn(len(batch), 1, 3, generator=generator, device=batch.device, dtype=batch.dtype)
    depth = ((batch - batch.mean(dim=1, keepdim=True)) * view).sum(dim=2)  # larger = farther from the camera
    num_drop = round(_level(OCCLUSION_RATIO, severity) * batch.shape[1])
    drop = depth.topk(num_drop, dim=1).indices
    keep = torch.ones(batch.shape[:2], dtype=torch.bool, device=batch.device).scatter_(1, drop, False)
    return _like_input(_refill_from_survivors(batch, keep, generator), single)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "jitter": corrupt_jitter,
    "dropout_global": corrupt_dropout_global,
    "dropout_local": corrupt_dropout_local,
    **{f"rotate_{axis}": functools.partial(corrupt_rotate, axis=axis) for axis in AXES},
    "scale": corrupt_scale,
    "add_outliers": corrupt_add_outliers,
    "occlusion": corrupt_occlusion,
}
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(
    points: torch.Tensor, corruption: str, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the corruption named `corruption` (a key of `CORRUPTIONS`) at `severity` 1..5."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {corruption!r}; expected one of {tuple(CORRUPTIONS)}")
    return CORRUPTIONS[corruption](points, severity, generator=generator)


def _as_batch(points: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View a single cloud (N, 3) as a batch of one; remember whether to squeeze it back."""
    if points.dim() not in (2, 3) or points.shape[-1] != 3:
        raise ValueError(f"Expected points of shape (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    return (points.unsqueeze(0), True) if points.dim() == 2 else (points, False)


def _like_input(batch: torch.Tensor, single: bool) -> torch.Tensor:
    return batch.squeeze(0) if single else batch


def _uniform(
    like: torch.Tensor, shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform samples in [low, high) with `like`'s dtype and device."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype) * (high - low) + low


def _level(table: Sequence[float], severity: int) -> float:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return table[severity - 1]


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _radius(points: torch.Tensor) -> torch.Tensor:
    """Largest distance from the origin per cloud, (batch, 1, 1)."""
    return points.norm(dim=2).amax(dim=1).view(-1, 1, 1)


def _gather_points(points: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """points (batch, N, 3), indices (batch, M) -> (batch, M, 3)."""
    return points.gather(1, indices.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def _rotate(points: torch.Tensor, angles: torch.Tensor, axis: str) -> torch.Tensor:
    """Rotate each cloud (batch, N, 3) by its angle (batch,) in radians about `axis` (right-handed)."""
    cos, sin = angles.cos(), angles.sin()
    zero, one = torch.zeros_like(angles), torch.ones_like(angles)
    rows = {
        "x": ((one, zero, zero), (zero, cos, -sin), (zero, sin, cos)),
        "y": ((cos, zero, sin), (zero, one, zero), (-sin, zero, cos)),
        "z": ((cos, -sin, zero), (sin, cos, zero), (zero, zero, one)),
    }[axis]
    rotation = torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)  # (batch, 3, 3)
    return points @ rotation.transpose(1, 2)


def _jitter(points: torch.Tensor, sigma: float, clip: float | None, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(points.shape, generator=generator, device=points.device, dtype=points.dtype) * sigma
    return points + (noise.clamp(-clip, clip) if clip is not None else noise)


def _drop_random(points: torch.Tensor, ratios: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Remove round(ratio * N) random points of each cloud (ratios (batch, 1)), always keeping at least one."""
    num_points = points.shape[1]
    num_drop = (ratios.float() * num_points).round().clamp(max=num_points - 1)  # float32: exact counts
    ranks = torch.rand(points.shape[:2], generator=generator, device=points.device).argsort(dim=1).argsort(dim=1)
    return _refill_from_survivors(points, ranks >= num_drop, generator)


def _refill_from_survivors(
    points: torch.Tensor, keep: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Replace the points where `keep` (batch, N) is False by copies of random kept points of the same cloud."""
    donors = torch.multinomial(keep.float(), points.shape[1], replacement=True, generator=generator)
    positions = torch.arange(points.shape[1], device=points.device).expand_as(keep)
    return _gather_points(points, torch.where(keep, positions, donors))
