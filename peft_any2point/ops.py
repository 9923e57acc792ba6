"""Geometry ops for point clouds: farthest point sampling, k nearest neighbours and gathering.

Models call only these functions; which implementation ("backend") runs is decided here, so that a
compiled kernel can be swapped in without touching the models and a pure-torch path always works.
Every backend returns the same indices (ties excepted); distances are always computed in float32 or
better, whatever the input dtype, because bf16 distances would reorder neighbours.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from torch import Tensor


__all__ = [
    "available_backends",
    "default_backend",
    "farthest_point_sampling",
    "gather_points",
    "knn_indices",
    "snap_outliers",
]


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
    # Distances >= 0 order like the int32s of their bit patterns, and argmax over int32 is about twice as fast on a
    # CPU (B=32, 256-1024 points); the index is the same.
    min_dist_bits = min_dist.view(torch.int32)
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
        current = min_dist_bits.argmax(dim=1, keepdim=True)  # (B, 1), lowest index on ties
        selected.append(current)
    return torch.cat(selected, dim=1)  # (B, num_samples)


# Under torch.compile of a whole model these run eagerly between graphs: traced, FPS's loop over samples would unroll
# into the graph, and torch_cluster's and fpsample's kernels cannot be traced at all.
@torch.compiler.disable
def farthest_point_sampling(
    points: Tensor, num_samples: int, start_index: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """Pick `num_samples` well-spread points of each cloud by iterative farthest point sampling.

    Args:
        points: (B, N, 3) coordinates, any float dtype.
        num_samples: how many points to keep per cloud, 1 <= num_samples <= N.
        start_index: (B,) int64 first point of each cloud. None picks the point farthest from the cloud's
            centroid (lowest index on ties), so the selected points do not depend on the input order.
        backend: "torch", "fpsample", "torch_cluster" or "triton" (CUDA); None picks the fastest available for the
            device.

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
    run = _IMPLEMENTATIONS["fps"][_choose("fps", points.device, backend, 0, num_points)]
    with torch.no_grad(), _no_autocast(points.device):
        return run(points, num_samples, start_index.to(points.device))


# --------------------------------------------------------------------------- k nearest neighbours


# Distance-matrix elements the torch kNN computes at once, per device type: memory stays bounded at any N. On CPU
# 1 MiB blocks are still in cache when `topk` reads them (about 12% faster than 32 MiB); a GPU wants big launches.
_KNN_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
# From this many points per cloud the CPU kNN skips far-away leaves of a k-d partition instead of computing every
# distance; leaves of about 32 points and 8 queries were fastest (B=32, k=32, 1k-16k points, 2 threads).
_KNN_CPU_PRUNED_MIN_POINTS = 1024
_LEAF_POINTS, _LEAF_QUERIES = 32, 8


def _distances(queries: Tensor, points: Tensor) -> Tensor:
    """(..., m, 3), (..., N, 3) -> (..., m, N) distances on CPU, squared distances elsewhere, by direct differences.

    The matmul formula (`cdist`'s default) is faster but its cancellation error reorders near neighbours. The exact
    `cdist` mode is the fastest exact option on CPU, but on CUDA broadcasting differences is about 40x faster.
    """
    if queries.device.type == "cpu":
        return torch.cdist(queries, points, compute_mode="donot_use_mm_for_euclid_dist")
    return (queries.unsqueeze(-2) - points.unsqueeze(-3)).square_().sum(-1)  # (..., m, N, 3) -> (..., m, N)


def _nearest(distances: Tensor, k: int) -> Tensor:
    """Indices of the k smallest of each row of non-negative `distances`, smallest first.

    Finite distances >= 0 order like the int32s of their IEEE bit patterns, and `topk` on int32 is faster (4-39% on
    this 2-core CPU, 256-1024 points); the indices are the same.
    """
    return distances.view(torch.int32).topk(k, dim=-1, largest=False, sorted=True).indices


def _knn_torch(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Exact kNN: every query-point distance, then `topk`, over chunks of queries; pruned for large CPU clouds."""
    queries, points = queries.float(), points.float()
    if points.device.type == "cpu" and points.shape[1] >= _KNN_CPU_PRUNED_MIN_POINTS:
        return _knn_pruned(queries, points, k)
    batch, num_queries, _ = queries.shape
    chunk = _KNN_CHUNK_ELEMENTS.get(points.device.type, _KNN_CHUNK_ELEMENTS["cuda"])
    step = max(1, chunk // (batch * points.shape[1]))
    chunks = [_nearest(_distances(queries[:, i : i + step], points), k) for i in range(0, num_queries, step)]
    return torch.cat(chunks, dim=1)  # (B, M, k)


def _kd_leaves(xyz: Tensor, leaf_size: int) -> tuple[Tensor, int, int]:
    """An order of each cloud's L points that groups them into P = 2^d leaves of S >= L / P slots (a k-d tree's leaves).

    Every level splits each group at its median along the group's widest axis, for all groups and clouds at once.
    Returns the order (B, P * S) into the points padded to P * S (entries >= L are padding, which sorts last), P
    and S; d is chosen so that S is about `leaf_size`.
    """
    batch, length, _ = xyz.shape
    depth = round(math.log2(length / leaf_size)) if length > leaf_size else 0
    num_leaves = 2**depth
    size = -(-length // num_leaves)
    big = torch.finfo(xyz.dtype).max
    padded = torch.cat([xyz, xyz.new_full((batch, num_leaves * size - length, 3), big)], dim=1)
    order = torch.arange(num_leaves * size, device=xyz.device).expand(batch, -1)
    for level in range(depth):
        groups = order.view(batch, 2**level, -1)  # (B, G, n)
        coords = gather_points(padded, groups)  # (B, G, n, 3)
        real = (groups < length).unsqueeze(-1)
        spread = torch.where(real, coords, -big).amax(2) - torch.where(real, coords, big).amin(2)  # (B, G, 3)
        axis = spread.argmax(-1)[:, :, None, None].expand(-1, -1, coords.shape[2], 1)
        order = groups.gather(2, coords.gather(3, axis).squeeze(-1).argsort(dim=-1)).view(batch, -1)
    return order, num_leaves, size


def _knn_pruned(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Exact kNN on the CPU that computes distances only to the point leaves that can hold a neighbour.

    Points and queries are each split into k-d leaves with bounding boxes. For a query leaf, the k-th nearest
    distance among the points of a few nearby leaves bounds every one of its queries' true k-th distance from above
    (R, the largest over the leaf's queries); a point leaf whose box is farther than R from the query leaf's box
    cannot hold a neighbour of any of them. The rest are searched exhaustively, query leaves that need the same
    number of point leaves together. Same answer as `_knn_torch` up to equal-distance ties.
    """
    batch, num_queries, _ = queries.shape
    num_points = points.shape[1]
    point_order, num_leaves, leaf_size = _kd_leaves(points, _LEAF_POINTS)
    query_order, num_query_leaves, query_leaf_size = _kd_leaves(queries, _LEAF_QUERIES)
    # Padding points lie at infinity, so they are never nearer than a real point; padding queries repeat the last.
    padded_points = torch.cat([points, points.new_full((batch, num_leaves * leaf_size - num_points, 3), math.inf)], 1)
    leaves = gather_points(padded_points, point_order).view(batch * num_leaves, leaf_size, 3)
    last_query = queries[:, -1:].expand(-1, num_query_leaves * query_leaf_size - num_queries, -1)
    query_leaves = gather_points(torch.cat([queries, last_query], 1), query_order)
    query_leaves = query_leaves.view(batch * num_query_leaves, query_leaf_size, 3)

    real = (point_order < num_points).view(batch * num_leaves, leaf_size, 1)
    low = torch.where(real, leaves, math.inf).amin(1).view(batch, num_leaves, 3)
    high = torch.where(real, leaves, -math.inf).amax(1).view(batch, num_leaves, 3)
    query_low = query_leaves.amin(1).view(batch, num_query_leaves, 3)
    query_high = query_leaves.amax(1).view(batch, num_query_leaves, 3)
    gaps = (query_low[:, :, None] - high[:, None]).clamp_min(0) + (low[:, None] - query_high[:, :, None]).clamp_min(0)
    box_distance = gaps.square().sum(-1).view(-1, num_leaves)  # (B * QL, PL) squared, lower bounds

    # The upper bound R from the leaves with the nearest box centres: enough of them for about 4k points.
    first_leaf = (torch.arange(batch * num_query_leaves) // num_query_leaves * num_leaves)[:, None]  # (B * QL, 1)
    num_near = min(num_leaves, -(-4 * k // leaf_size))
    centre_distance = torch.cdist((query_low + query_high) / 2, (low + high) / 2).view(-1, num_leaves)
    near = centre_distance.topk(num_near, dim=-1, largest=False).indices + first_leaf
    candidates = leaves[near.view(-1)].view(-1, num_near * leaf_size, 3)
    distances = _distances(query_leaves, candidates)
    kth = distances.gather(-1, _nearest(distances, k)[..., -1:])  # (B * QL, QS, 1)
    radius = kth.flatten(1).amax(-1)  # (B * QL,); infinite when the near leaves hold padding
    # Slack for rounding: keeping a leaf too many costs time, dropping one would lose a neighbour.
    needed = (box_distance <= radius[:, None].square() * (1 + 1e-5)).sum(-1)

    found = torch.empty(batch * num_query_leaves, query_leaf_size, k, dtype=torch.long)
    sources = point_order.reshape(-1)  # leaf slot -> point index; padding, at infinity, is never among the k
    slots = torch.arange(num_leaves * leaf_size).view(num_leaves, leaf_size)  # (PL, S)
    by_need = needed.argsort()
    counts = needed[by_need].tolist()
    budget = _KNN_CHUNK_ELEMENTS["cpu"]
    start = 0
    while start < len(counts):
        stop = start + max(1, budget // (query_leaf_size * leaf_size * counts[start]))
        rows = by_need[start:stop]
        kept = box_distance[rows].topk(counts[min(stop, len(counts)) - 1], dim=-1, largest=False).indices  # (n, c)
        candidates = leaves[(kept + first_leaf[rows]).view(-1)].view(len(rows), -1, 3)  # (n, c * S, 3)
        nearest = _nearest(_distances(query_leaves[rows], candidates), k)  # (n, QS, k) into the candidates
        slot = slots[kept].view(len(rows), 1, -1).expand(-1, query_leaf_size, -1).gather(2, nearest)
        found[rows] = sources[slot + (first_leaf[rows] * leaf_size)[:, :, None]]
        start = stop
    result = torch.empty_like(found).view(batch, -1, k)
    result.scatter_(1, query_order.unsqueeze(-1).expand(-1, -1, k), found.view(batch, -1, k))
    return result[:, :num_queries]


@torch.compiler.disable  # see farthest_point_sampling
def knn_indices(queries: Tensor, points: Tensor, k: int, backend: str | None = None) -> Tensor:
    """Indices of the `k` points nearest to each query, nearest first.

    Args:
        queries: (B, M, 3) query coordinates (typically the FPS centres).
        points: (B, N, 3) coordinates to search, same device as `queries`.
        k: neighbours per query, 1 <= k <= N.
        backend: "torch" or "torch_cluster"; None picks the fastest available for the device and cloud size.

    Returns:
        (B, M, k) int64 indices into `points`; equal-distance ties may come in any order.

    Raises:
        ValueError: on bad shapes or k, and on NaN or infinite coordinates in CPU tensors (on a GPU the check would
            cost a device sync per call; models validate their inputs anyway).
    """
    _check_points("queries", queries)
    _check_points("points", points)
    if queries.shape[0] != points.shape[0]:
        raise ValueError(
            f"queries and points must have the same batch size, got {queries.shape[0]} and {points.shape[0]}"
        )
    if not 1 <= k <= points.shape[1]:
        raise ValueError(f"k must be between 1 and the number of points ({points.shape[1]}), got {k}")
    if points.device.type == "cpu" and not (torch.isfinite(points).all() and torch.isfinite(queries).all()):
        raise ValueError("queries and points must have finite coordinates, got NaN or infinity")
    run = _IMPLEMENTATIONS["knn"][_choose("knn", points.device, backend, k, points.shape[1])]
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


# --------------------------------------------------------------------------- outliers


MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation, for normally distributed values
_MIN_RELATIVE_SPREAD = 0.1  # evenly spaced points have no spread: a floor keeps their edges from counting as outliers


def snap_outliers(points: Tensor, num_neighbors: int, std_ratio: float) -> Tensor:
    """Move isolated points onto their nearest inlier: statistical outlier removal that keeps the shape (B, N, 3).

    A point is an outlier when the mean distance to its `num_neighbors` nearest points exceeds the cloud's median
    of that statistic by `std_ratio` robust standard deviations (median absolute deviation), so that the outliers
    themselves do not widen the threshold. Farthest point sampling would otherwise pick stray points first and make
    tokens of them. Each outlier takes the coordinates of its nearest inlier neighbour (or, with none among its
    neighbours, of the cloud's least isolated point), which FPS never picks twice; the count N stays fixed.
    """
    _check_points("points", points)
    num_points = points.shape[1]
    if not 1 <= num_neighbors < num_points:
        raise ValueError(f"num_neighbors must be between 1 and num_points - 1 ({num_points - 1}), got {num_neighbors}")
    with torch.no_grad(), _no_autocast(points.device):
        xyz = points.float()
        neighbors = knn_indices(xyz, xyz, num_neighbors + 1)  # (B, N, k + 1), the point itself among them
        distances = (gather_points(xyz, neighbors) - xyz.unsqueeze(2)).norm(dim=-1)  # (B, N, k + 1), ascending
        isolation = distances[..., 1:].mean(dim=-1)  # (B, N); a duplicate may come before the point, at distance 0
        median = isolation.median(dim=1, keepdim=True).values
        spread = (isolation - median).abs().median(dim=1, keepdim=True).values * MAD_TO_STD
        spread = torch.maximum(spread, _MIN_RELATIVE_SPREAD * median)
        outlier = isolation > median + std_ratio * spread  # (B, N)
        inlier_neighbor = ~gather_points(outlier, neighbors)  # (B, N, k + 1)
        first_inlier = inlier_neighbor.int().argmax(dim=-1, keepdim=True)  # (B, N, 1), 0 when there is none
        target = neighbors.gather(-1, first_inlier).squeeze(-1)  # (B, N)
        least_isolated = isolation.argmin(dim=1, keepdim=True).expand(-1, num_points)  # (B, N)
        target = torch.where(inlier_neighbor.any(dim=-1), target, least_isolated)
        target = torch.where(outlier, target, torch.arange(num_points, device=points.device))
    return gather_points(points, target)


# --------------------------------------------------------------------------- optional backends


@functools.cache
def _module(name: str) -> ModuleType | None:
    """The optional backend package, or None when it is missing or fails to load (e.g. a build for another torch)."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):
        return None


def _fps_fpsample(points: Tensor, num_samples: int, start: Tensor) -> Tensor:
    """`fpsample`'s vanilla (exact) FPS, one cloud at a time; its bucket variants return the samples unordered."""
    fpsample = _module("fpsample")
    clouds = points.detach().float().numpy()  # (B, N, 3)
    picked = [
        fpsample.fps_sampling(cloud, num_samples, start_idx=s) for cloud, s in zip(clouds, start.tolist(), strict=True)
    ]
    return torch.from_numpy(np.stack(picked).astype(np.int64))  # (B, num_samples)


def _cloud_offsets(batch: int, size: int, device: torch.device) -> Tensor:
    """(B + 1,) start of each cloud in the flattened (B * size, 3) layout torch_cluster works on."""
    return torch.arange(0, (batch + 1) * size, size, device=device)


def _fps_torch_cluster(points: Tensor, num_samples: int, start: Tensor) -> Tensor:
    """torch_cluster's FPS, which always starts at a cloud's first point: swap the start there and back."""
    torch_cluster = _module("torch_cluster")
    batch, num_points, _ = points.shape
    swap = torch.arange(num_points, device=points.device).repeat(batch, 1)  # (B, N), its own inverse
    swap.scatter_(1, start.view(batch, 1), 0)
    swap[:, 0] = start
    flat = points.float().gather(1, swap.unsqueeze(-1).expand(-1, -1, 3)).reshape(-1, 3)  # (B * N, 3)
    offsets = _cloud_offsets(batch, num_points, points.device)
    # torch_cluster keeps ceil(ratio * N) points per cloud; half a point below num_samples survives float rounding.
    ratio = (num_samples - 0.5) / num_points
    picked = torch_cluster.fps(flat, ratio=ratio, random_start=False, ptr=offsets)  # (B * num_samples,)
    return swap.gather(1, picked.view(batch, num_samples) - offsets[:-1, None])  # (B, num_samples)


def _fps_triton(points: Tensor, num_samples: int, start: Tensor) -> Tensor:
    """Triton FPS, one program per cloud for the whole loop, where the torch loop launches kernels per sample.

    Its module imports triton, so it is loaded only here, once the backend has been chosen.
    """
    return importlib.import_module("peft_any2point._triton_fps").farthest_point_sampling(points, num_samples, start)


def _knn_torch_cluster(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """torch_cluster's kNN (a KD-tree on CPU); it returns flattened (query, neighbour) pairs, nearest first."""
    torch_cluster = _module("torch_cluster")
    batch, num_queries, _ = queries.shape
    num_points = points.shape[1]
    clouds = torch.arange(batch, device=points.device)
    _, neighbour = torch_cluster.knn(
        points.float().reshape(-1, 3),
        queries.float().reshape(-1, 3),
        k,
        batch_x=clouds.repeat_interleave(num_points),
        batch_y=clouds.repeat_interleave(num_queries),
        batch_size=batch,
    )  # (B * M * k,) indices into the flattened points
    return neighbour.view(batch, num_queries, k) - _cloud_offsets(batch, num_points, points.device)[:-1, None, None]


# --------------------------------------------------------------------------- backend choice

_IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "fps": {
        "torch": _fps_torch,
        "fpsample": _fps_fpsample,
        "torch_cluster": _fps_torch_cluster,
        "triton": _fps_triton,
    },
    "knn": {"torch": _knn_torch, "torch_cluster": _knn_torch_cluster},
}

# Fastest first, per (op, device type); "torch" closes each list. CPU as measured by benchmarks/bench_kernels.py
# (results/kernels.md, B=32, 2 threads): the torch FPS loop uses every thread and beats the single-threaded fpsample
# by 1.2x (512 points) to 2.5x (8k) and torch_cluster's FPS by 3-5x; on one thread fpsample was 7-18% faster than
# the loop. torch_cluster's KD-tree kNN is 1.0-1.5x faster than the pruned torch kNN on surfaces and 1.7-2.1x in a
# Gaussian blob (1k-16k points).
# On CUDA the torch FPS loop is launch-bound, so compiled kernels come first: the Triton FPS runs the whole loop in
# one launch, 0.2 ms against the loop's 46.5 ms for 1024 -> 512 at B=32 on an H200 (results/kernels_cuda.md;
# torch_cluster was not installed there, so the two compiled kernels have not been compared), then torch_cluster's.
_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    ("fps", "cpu"): ("torch", "fpsample"),
    ("knn", "cpu"): ("torch_cluster", "torch"),
    ("fps", "cuda"): ("triton", "torch_cluster", "torch"),
    ("knn", "cuda"): ("torch_cluster", "torch"),
}
_SINGLE_THREAD_FPS_CPU = ("fpsample", "torch")
# Small clouds on a threaded CPU: computing every distance beats the KD-tree up to this many points per cloud
# (44 against 46 ms at 512 points; from 1k on the tree wins, 88 against the pruned search's 157 ms; B=32, k=32). On
# one thread the KD-tree won at 512 too.
_KNN_CPU_BRUTE_FORCE_MAX_POINTS = 512

# torch_cluster's CUDA kNN keeps each query's best candidates in a fixed array of 100.
_TORCH_CLUSTER_CUDA_MAX_K = 100


def available_backends(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Installed backends per op, e.g. {"fps": ["torch", "fpsample"], "knn": ["torch"]}.

    With `device`, only those that take its tensors (fpsample is CPU-only, triton CUDA-only; torch_cluster needs a
    CUDA build on GPU).
    """
    installed = {
        op: [name for name in impls if name == "torch" or _module(name) is not None]
        for op, impls in _IMPLEMENTATIONS.items()
    }
    if device is None:
        return installed
    return {op: [name for name in names if _runs_on(name, torch.device(device), 1)] for op, names in installed.items()}


def _runs_on(backend: str, device: torch.device, k: int) -> bool:
    """Whether an installed backend handles tensors on `device` (and, for kNN, this k)."""
    if backend == "triton":
        return device.type == "cuda"
    if backend == "torch" or device.type == "cpu":
        return True
    if backend == "torch_cluster" and device.type == "cuda":
        return _module("torch_cluster").cuda_version != -1 and k <= _TORCH_CLUSTER_CUDA_MAX_K
    return False


def default_backend(op: str, device: torch.device | str = "cpu", k: int = 1, num_points: int = 1024) -> str:
    """The backend `backend=None` runs for `op` ("fps" or "knn") on `device`, for kNN with this k among
    `num_points` points per cloud; for logs."""
    return _choose(op, torch.device(device), None, k, num_points)


def _preference(op: str, device: torch.device, num_points: int) -> tuple[str, ...]:
    """Backends for `op` on `device`, fastest first (see `_PREFERENCE`): the order depends on the thread count and,
    for kNN on the CPU, on the cloud size."""
    threaded = torch.get_num_threads() > 1
    if (op, device.type) == ("fps", "cpu") and not threaded:
        return _SINGLE_THREAD_FPS_CPU
    if (op, device.type) == ("knn", "cpu") and threaded and num_points <= _KNN_CPU_BRUTE_FORCE_MAX_POINTS:
        return ("torch",)
    return _PREFERENCE.get((op, device.type), ("torch",))


def _choose(op: str, device: torch.device, backend: str | None, k: int, num_points: int) -> str:
    """The requested backend, checked, or the fastest usable one for the device and cloud size."""
    usable = [name for name in available_backends()[op] if _runs_on(name, device, k)]
    if backend is None:
        return next(name for name in _preference(op, device, num_points) if name in usable)
    if backend not in usable:
        raise ValueError(
            f"{op} backend {backend!r} is unknown or unavailable for these {device.type} inputs; available: {usable}"
        )
    return backend
