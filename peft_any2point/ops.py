"""Geometry ops for point clouds: farthest point sampling, k nearest neighbours and gathering.

Models call only these functions; which implementation ("backend") runs is decided here, so that a
compiled kernel can be swapped in without touching the models and a pure-torch path always works.
Every backend returns the same indices (ties excepted); distances are always computed in float32 or
better, whatever the input dtype, because bf16 distances would reorder neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor


__all__ = ["available_backends", "farthest_point_sampling", "gather_points", "knn_indices"]


def _check_points(name: str, points: Tensor) -> None:
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (batch, num_points, 3), got {tuple(points.shape)}")


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast would run matmuls in bf16/fp16; distances must stay float32."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------- farthest point sampling


def _centroid_farthest(points: Tensor) -> Tensor:
    """Index of the point farthest from the centroid, per cloud: a start that ignores the points' order.

    Float64 so that the centroid's summation order (which a shuffle changes) cannot flip the choice.
    """
    pts = points.double()  # (B, N, 3)
    dist = (pts - pts.mean(dim=1, keepdim=True)).square().sum(-1)  # (B, N)
    return dist.argmax(dim=1)  # argmax returns the lowest index on ties


def _fps_torch(points: Tensor, num_samples: int, start: Tensor) -> Tensor:
    """Exact FPS as a loop over samples, keeping each point's distance to the nearest selected one.

    One contiguous (B, N) tensor per coordinate and preallocated buffers keep each iteration to a few small
    kernels; at B * N <= 32k elements they also stay under torch's parallel grain size, so the loop does not
    pay a thread synchronisation per kernel. Squared distances use direct differences, not |p|^2 - 2 p.c + |c|^2,
    whose cancellation error changes which point is farthest.
    """
    batch, num_points, _ = points.shape
    x, y, z = points.float().permute(2, 0, 1).contiguous().unbind(0)  # 3 x (B, N)
    min_dist = torch.full((batch, num_points), float("inf"), device=points.device)  # (B, N)
    dist = torch.empty_like(min_dist)
    diff = torch.empty_like(min_dist)
    current = start.view(batch, 1)
    selected = [current]
    for _ in range(num_samples - 1):
        torch.sub(x, x.gather(1, current), out=dist).square_()
        torch.sub(y, y.gather(1, current), out=diff)
        dist.addcmul_(diff, diff)
        torch.sub(z, z.gather(1, current), out=diff)
        dist.addcmul_(diff, diff)
        torch.minimum(min_dist, dist, out=min_dist)
        current = min_dist.argmax(dim=1, keepdim=True)  # (B, 1), lowest index on ties
        selected.append(current)
    return torch.cat(selected, dim=1)  # (B, num_samples)


def farthest_point_sampling(
    points: Tensor, num_samples: int, start_index: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """Pick `num_samples` well-spread points of each cloud by iterative farthest point sampling.

    Args:
        points: (B, N, 3) coordinates, any float dtype.
        num_samples: how many points to keep per cloud, 1 <= num_samples <= N.
        start_index: (B,) int64 first point of each cloud. None picks the point farthest from the cloud's
            centroid (lowest index on ties), so the selected points do not depend on the input order.
        backend: "torch", "fpsample" or "torch_cluster"; None picks the fastest available for the device.

    Returns:
        (B, num_samples) int64 indices into the points, in selection order; the first is the start.
    """
    _check_points("points", points)
    batch, num_points, _ = points.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be between 1 and the number of points ({num_points}), got {num_samples}")
    if start_index is None:
        start_index = _centroid_farthest(points)
    elif start_index.shape != (batch,) or start_index.dtype != torch.long:
        raise ValueError(
            f"start_index must be an int64 tensor of shape ({batch},), got {start_index.dtype} {tuple(start_index.shape)}"
        )
    elif bool(((start_index < 0) | (start_index >= num_points)).any()):
        raise ValueError(f"start_index values must be in [0, {num_points})")
    run = _pick("fps", points.device, backend)
    with torch.no_grad(), _no_autocast(points.device):
        return run(points, num_samples, start_index.to(points.device))


# --------------------------------------------------------------------------- k nearest neighbours


def _knn_torch(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Exact kNN from all query-point distances, computed by direct differences."""
    dist = torch.cdist(queries.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")  # (B, M, N)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices  # (B, M, k)


def knn_indices(queries: Tensor, points: Tensor, k: int, backend: str | None = None) -> Tensor:
    """Indices of the `k` points nearest to each query, nearest first.

    Args:
        queries: (B, M, 3) query coordinates (typically the FPS centres).
        points: (B, N, 3) coordinates to search, same device as `queries`.
        k: neighbours per query, 1 <= k <= N.
        backend: "torch" or "torch_cluster"; None picks the fastest available for the device.

    Returns:
        (B, M, k) int64 indices into `points`; equal-distance ties may come in any order.
    """
    _check_points("queries", queries)
    _check_points("points", points)
    if queries.shape[0] != points.shape[0]:
        raise ValueError(
            f"queries and points must have the same batch size, got {queries.shape[0]} and {points.shape[0]}"
        )
    if not 1 <= k <= points.shape[1]:
        raise ValueError(f"k must be between 1 and the number of points ({points.shape[1]}), got {k}")
    run = _pick("knn", points.device, backend)
    with torch.no_grad(), _no_autocast(points.device):
        return run(queries, points, k)


# --------------------------------------------------------------------------- gathering


def gather_points(values: Tensor, indices: Tensor) -> Tensor:
    """Select per-cloud rows of `values` by index (centres, neighbour groups, features); differentiable.

    Args:
        values: (B, N, *rest) per-point values.
        indices: (B, *idx_shape) int64 indices into dimension 1 of `values`.

    Returns:
        (B, *idx_shape, *rest).
    """
    if indices.shape[0] != values.shape[0] or values.dim() < 2:
        raise ValueError(
            f"values (B, N, ...) and indices (B, ...) must share the batch size, got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    batch, num_points = values.shape[:2]
    offsets = torch.arange(batch, device=indices.device).mul_(num_points)  # (B,)
    flat_index = (indices.reshape(batch, -1) + offsets[:, None]).reshape(-1)  # (B * L,)
    flat = values.reshape(batch * num_points, *values.shape[2:]).index_select(0, flat_index)  # (B * L, *rest)
    return flat.view(*indices.shape, *values.shape[2:])


# --------------------------------------------------------------------------- backends

_BACKENDS = {
    "fps": {"torch": _fps_torch},
    "knn": {"torch": _knn_torch},
}


def available_backends() -> dict[str, list[str]]:
    """Installed backends per op, e.g. {"fps": ["torch", "fpsample"], "knn": ["torch"]}."""
    return {op: list(impls) for op, impls in _BACKENDS.items()}


def _pick(op: str, device: torch.device, backend: str | None):
    """The implementation of `op` to run: the requested backend, or the fastest one for the device."""
    impls = _BACKENDS[op]
    if backend is None:
        backend = "torch"
    if backend not in impls:
        raise ValueError(f"unknown or unavailable {op} backend {backend!r}; available: {sorted(impls)}")
    return impls[backend]
