"""Geometry ops against independent float64 brute force, across every installed backend."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_any2point import ops
from peft_any2point.ops import (
    _KNN_CHUNK_ELEMENTS,
    _fps_torch,
    available_backends,
    default_backend,
    farthest_point_sampling,
    gather_points,
    knn_indices,
    snap_outliers,
)


ROOT = Path(__file__).resolve().parents[1]


def _backend_params(op: str) -> list:
    """Every backend the ops know of for `op`; the optional ones skip, with the reason, when not installed."""
    installed = available_backends()[op]
    known = {"fps": ["torch", "fpsample", "torch_cluster"], "knn": ["torch", "torch_cluster"]}[op]
    return [
        pytest.param(name, id=name, marks=pytest.mark.skipif(name not in installed, reason=f"{name} is not installed"))
        for name in known
    ]


def _cloud(batch: int, num_points: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_points, 3, generator=torch.Generator().manual_seed(seed))


def _reference_fps(cloud: np.ndarray, num_samples: int, start: int) -> list[int]:
    """Textbook FPS in float64: each step takes the point farthest from everything selected so far."""
    cloud = cloud.astype(np.float64)
    selected = [start]
    nearest = np.full(len(cloud), np.inf)
    while len(selected) < num_samples:
        nearest = np.minimum(nearest, ((cloud - cloud[selected[-1]]) ** 2).sum(axis=1))
        selected.append(int(np.argmax(nearest)))
    return selected


def _reference_knn(query: np.ndarray, cloud: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, k) neighbour indices and their float64 squared distances, by a full sort."""
    dist = ((query[:, None, :].astype(np.float64) - cloud[None, :, :].astype(np.float64)) ** 2).sum(-1)  # (M, N)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def _assert_true_neighbours(queries: torch.Tensor, points: torch.Tensor, found: torch.Tensor) -> None:
    """`found` (B, M, k) holds, for every query, k distinct points at the reference's k smallest distances, in order."""
    k = found.shape[-1]
    for query, cloud, neighbours in zip(queries.numpy(), points.numpy(), found.numpy(), strict=True):
        _, expected_dist = _reference_knn(query, cloud, k)
        dist = ((query[:, None, :].astype(np.float64) - cloud[neighbours].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_allclose(dist, expected_dist, rtol=1e-6, atol=1e-12)  # ties may swap indices
        assert all(len(set(row)) == k for row in neighbours)


# --------------------------------------------------------------------------- farthest point sampling


@pytest.mark.parametrize("backend", _backend_params("fps"))
def test_fps_matches_float64_reference(backend: str) -> None:
    points = _cloud(3, 97)
    start = torch.tensor([0, 41, 96])
    picked = farthest_point_sampling(points, 40, start_index=start, backend=backend)
    assert picked.dtype == torch.int64 and picked.shape == (3, 40)
    for cloud, first, row in zip(points.numpy(), start.tolist(), picked.tolist(), strict=True):
        assert row == _reference_fps(cloud, 40, first)


def test_fps_default_start_is_the_point_farthest_from_the_centroid() -> None:
    points = _cloud(4, 50)
    centred = points.double() - points.double().mean(dim=1, keepdim=True)
    expected = centred.norm(dim=-1).argmax(dim=1)
    picked = farthest_point_sampling(points, 10)
    assert torch.equal(picked[:, 0], expected)
    for cloud, first, row in zip(points.numpy(), expected.tolist(), picked.tolist(), strict=True):
        assert row == _reference_fps(cloud, 10, first)


@pytest.mark.parametrize("backend", _backend_params("fps"))
def test_fps_selected_points_do_not_depend_on_point_order(backend: str) -> None:
    points = _cloud(2, 256, seed=1)
    shuffle = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    shuffled = gather_points(points, shuffle)
    picked = gather_points(points, farthest_point_sampling(points, 64, backend=backend))
    picked_shuffled = gather_points(shuffled, farthest_point_sampling(shuffled, 64, backend=backend))
    assert torch.equal(picked, picked_shuffled)


@pytest.mark.parametrize("backend", _backend_params("fps"))
def test_fps_all_points_is_a_permutation_and_one_point_is_the_start(backend: str) -> None:
    points = _cloud(2, 33)
    start = torch.tensor([5, 32])
    everything = farthest_point_sampling(points, 33, start_index=start, backend=backend)
    assert torch.equal(everything.sort(dim=1).values, torch.arange(33).expand(2, 33))
    assert torch.equal(farthest_point_sampling(points, 1, start_index=start, backend=backend), start[:, None])


@pytest.mark.parametrize("backend", _backend_params("fps"))
def test_fps_backends_agree_on_realistic_clouds(backend: str) -> None:
    points = _cloud(4, 1024, seed=2)
    start = torch.tensor([0, 1, 500, 1023])
    expected = farthest_point_sampling(points, 512, start_index=start, backend="torch")
    assert torch.equal(farthest_point_sampling(points, 512, start_index=start, backend=backend), expected)


def test_fps_bf16_autocast_input_selects_as_float32() -> None:
    points = _cloud(2, 128).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked = farthest_point_sampling(points, 32)
    assert torch.equal(picked, farthest_point_sampling(points.float(), 32))


def test_fps_ignores_autograd() -> None:
    points = _cloud(2, 64).requires_grad_()
    for backend in available_backends("cpu")["fps"]:
        assert not farthest_point_sampling(points, 8, backend=backend).requires_grad


# --------------------------------------------------------------------------- Triton FPS, interpreted on CPU


def _grid_cloud(batch: int, side: int) -> torch.Tensor:
    """Shuffled integer grids: many exactly equal distances, so every step has ties to break."""
    grid = torch.cartesian_prod(*[torch.arange(side, dtype=torch.float32)] * 3)  # (side^3, 3)
    return torch.stack(
        [grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(b))] for b in range(batch)]
    )


# name: (points, num_samples, start); each runs with the clouds in registers and streamed in chunks of 32 points.
_TRITON_CASES = {
    "n97": (_cloud(2, 97), 40, [41, 96]),  # N not a power of two
    "n200": (_cloud(2, 200, seed=2), 50, [0, 199]),
    "all-points": (_cloud(2, 33), 33, [5, 32]),  # the last steps are all ties at distance 0
    "one-point": (_cloud(2, 1), 1, [0, 0]),
    "grid-ties": (_grid_cloud(2, 4), 64, [0, 37]),
    "duplicates": (_cloud(2, 16, seed=3).repeat(1, 4, 1), 40, [3, 60]),  # every point four times
}
_TRITON_BLOCKS = {"registers": 16384, "streamed": 32}

# Runs in a subprocess: TRITON_INTERPRET must be set before triton is imported (its own library functions are
# decorated then), and the interpreter runs the kernels on CPU tensors.
_TRITON_INTERPRETED = """
import sys
import torch
from peft_any2point import _triton_fps

picked = {}
for name, (points, num_samples, start, max_block) in torch.load(sys.argv[1]).items():
    _triton_fps.MAX_BLOCK = max_block
    picked[name] = _triton_fps.farthest_point_sampling(points, num_samples, torch.tensor(start))
torch.save(picked, sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Every Triton case's selection, by name "<case>-<blocks>", from one interpreter run."""
    if "triton" not in available_backends()["fps"]:
        pytest.skip("triton is not installed")
    triton_version = tuple(map(int, importlib.import_module("triton").__version__.split(".")[:2]))
    if triton_version < (3, 7) and tuple(map(int, np.__version__.split(".")[:2])) >= (2, 4):
        pytest.skip("the interpreter of triton < 3.7 fails with numpy >= 2.4 (triton-lang/triton#9171)")
    folder = tmp_path_factory.mktemp("triton")
    cases = {
        f"{name}-{blocks}": (*case, max_block)
        for name, case in _TRITON_CASES.items()
        for blocks, max_block in _TRITON_BLOCKS.items()
    }
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _TRITON_INTERPRETED, str(folder / "cases.pt"), str(folder / "picked.pt")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the interpreted Triton FPS failed:\n{result.stderr[-4000:]}"
    return torch.load(folder / "picked.pt")


@pytest.mark.parametrize("blocks", _TRITON_BLOCKS)
@pytest.mark.parametrize("case", _TRITON_CASES)
def test_triton_fps_equals_the_torch_loop(triton_interpreted: dict[str, torch.Tensor], case: str, blocks: str) -> None:
    points, num_samples, start = _TRITON_CASES[case]
    assert torch.equal(triton_interpreted[f"{case}-{blocks}"], _fps_torch(points, num_samples, torch.tensor(start)))


# --------------------------------------------------------------------------- k nearest neighbours


@pytest.mark.parametrize("backend", _backend_params("knn"))
def test_knn_matches_brute_force_sort(backend: str) -> None:
    points = _cloud(3, 200, seed=3)
    queries = _cloud(3, 50, seed=4)
    found = knn_indices(queries, points, 16, backend=backend)
    assert found.dtype == torch.int64 and found.shape == (3, 50, 16)
    _assert_true_neighbours(queries, points, found)
    for query, cloud, neighbours in zip(queries.numpy(), points.numpy(), found.numpy(), strict=True):
        expected, _ = _reference_knn(query, cloud, 16)  # random points have no ties: the very same indices
        np.testing.assert_array_equal(np.sort(neighbours, axis=1), np.sort(expected, axis=1))


@pytest.mark.parametrize("backend", _backend_params("knn"))
def test_knn_backends_agree_on_realistic_clouds(backend: str) -> None:
    points = _cloud(4, 1024, seed=5)
    queries = gather_points(points, farthest_point_sampling(points, 512))
    expected = knn_indices(queries, points, 32, backend="torch")
    found = knn_indices(queries, points, 32, backend=backend)
    assert torch.equal(found.sort(dim=-1).values, expected.sort(dim=-1).values)
    assert torch.equal(found[..., 0], expected[..., 0])  # a query's nearest point is itself


def test_knn_chunks_give_the_unchunked_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    points = _cloud(2, 100, seed=6)
    queries = _cloud(2, 37, seed=7)
    whole = knn_indices(queries, points, 8, backend="torch")
    monkeypatch.setitem(_KNN_CHUNK_ELEMENTS, "cpu", 2 * 100 * 5)  # 5 queries at a time
    assert torch.equal(knn_indices(queries, points, 8, backend="torch"), whole)


def _lattice(batch: int, side: int) -> torch.Tensor:
    """A cubic grid: every point has many neighbours at exactly the same distance."""
    axis = torch.arange(side, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).view(1, -1, 3)
    return grid.expand(batch, -1, -1).contiguous()


@pytest.mark.parametrize(
    ("make_points", "make_queries", "k"),
    [
        (lambda: _cloud(2, 1500, seed=8), lambda p: gather_points(p, farthest_point_sampling(p, 700)), 24),
        (lambda: _sphere_with_outliers(1100, 6, seed=9)[0], lambda p: p[:, ::3], 16),
        (lambda: _lattice(2, 11), lambda p: p[:, 5::7], 27),
        (lambda: _cloud(1, 1030, seed=10), lambda p: _cloud(1, 37, seed=11) * 10, 1),
        (lambda: _cloud(1, 1030, seed=12), lambda p: p[:, :20], 1030),
    ],
    ids=["gaussian-fps-centres", "sphere-outliers", "lattice-ties", "far-queries-k1", "k-equals-n"],
)
def test_pruned_knn_finds_the_exhaustive_neighbours(make_points: Callable, make_queries: Callable, k: int) -> None:
    """From 1k points the CPU torch kNN searches only nearby k-d leaves; it must still find the true neighbours.

    1500 points make leaves of 24 slots of which the last holds only padding; a sphere is a surface, like scanned
    objects, with strays whose neighbours are far; the lattice has ties at every distance; far queries lie outside
    every leaf's box.
    """
    points = make_points()
    queries = make_queries(points).contiguous()
    assert points.shape[1] >= ops._KNN_CPU_PRUNED_MIN_POINTS
    found = knn_indices(queries, points, k, backend="torch")
    assert found.shape == (*queries.shape[:2], k) and found.min() >= 0 and found.max() < points.shape[1]
    _assert_true_neighbours(queries, points, found)


def test_pruned_knn_keeps_exactly_the_leaves_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one point per leaf and one query per query leaf the boxes are the points, and the bound is the true
    k-th distance: a leaf is kept only if its point is a neighbour, so any shortfall of the bound (or of its
    rounding slack) would lose one."""
    monkeypatch.setattr(ops, "_LEAF_POINTS", 1)
    monkeypatch.setattr(ops, "_LEAF_QUERIES", 1)
    points = _cloud(2, 1024, seed=14)
    queries = gather_points(points, farthest_point_sampling(points, 64))
    _assert_true_neighbours(queries, points, knn_indices(queries, points, 16, backend="torch"))


def test_pruned_knn_chunks_give_the_unchunked_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    points = _cloud(2, 1200, seed=13)
    queries = gather_points(points, farthest_point_sampling(points, 300))
    whole = knn_indices(queries, points, 16, backend="torch")
    monkeypatch.setitem(_KNN_CHUNK_ELEMENTS, "cpu", 1)  # one query leaf at a time
    assert torch.equal(knn_indices(queries, points, 16, backend="torch"), whole)


def test_knn_bf16_autocast_input_ranks_as_float32() -> None:
    points = _cloud(2, 128).bfloat16()
    queries = points[:, :32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = knn_indices(queries, points, 8)
    expected = knn_indices(queries.float(), points.float(), 8)
    assert torch.equal(found.sort(dim=-1).values, expected.sort(dim=-1).values)


# --------------------------------------------------------------------------- gather


def test_gather_points_shapes() -> None:
    features = torch.randn(2, 10, 4, 5)
    assert gather_points(features, torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 4, 5)
    assert gather_points(features, torch.zeros(2, 3, 7, dtype=torch.long)).shape == (2, 3, 7, 4, 5)
    assert gather_points(features[..., 0, 0], torch.zeros(2, 3, 7, dtype=torch.long)).shape == (2, 3, 7)


def test_gather_points_selects_within_each_cloud() -> None:
    features = torch.randn(3, 10, 6)
    indices = torch.randint(0, 10, (3, 4, 5))
    expected = torch.stack([features[b][indices[b]] for b in range(3)])
    assert torch.equal(gather_points(features, indices), expected)


def test_gather_points_gradient_accumulates_repeated_indices() -> None:
    features = torch.randn(2, 6, 3, dtype=torch.double, requires_grad=True)
    indices = torch.tensor([[[0, 0, 5]], [[1, 2, 2]]])
    torch.autograd.gradcheck(lambda f: gather_points(f, indices), (features,))
    gather_points(features, indices).sum().backward()
    assert features.grad[0, 0].tolist() == [2.0, 2.0, 2.0] and features.grad[0, 1].abs().sum() == 0


# --------------------------------------------------------------------------- outliers


def _reference_snap(cloud: np.ndarray, k: int, std_ratio: float) -> np.ndarray:
    """Statistical outlier removal point by point in float64: outliers take their nearest inlier's coordinates."""
    dist = np.sqrt(((cloud[:, None].astype(np.float64) - cloud[None].astype(np.float64)) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    nearest = np.argsort(dist, axis=1)[:, :k]  # (N, k), the point itself excluded
    isolation = np.take_along_axis(dist, nearest, axis=1).mean(axis=1)
    median = np.median(isolation)
    spread = max(np.median(np.abs(isolation - median)) * 1.4826, 0.1 * median)
    outlier = isolation > median + std_ratio * spread
    snapped = cloud.copy()
    for i in np.flatnonzero(outlier):
        inliers = [j for j in nearest[i] if not outlier[j]]
        snapped[i] = cloud[inliers[0] if inliers else int(np.argmin(isolation))]
    return snapped


def _sphere_with_outliers(num_points: int, num_outliers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, 3) points on the unit sphere, `num_outliers` of them (returned indices) moved out to radius 3-5."""
    generator = torch.Generator().manual_seed(seed)
    cloud = torch.nn.functional.normalize(torch.randn(1, num_points, 3, generator=generator), dim=-1)
    victims = torch.randperm(num_points, generator=generator)[:num_outliers]
    cloud[0, victims] *= 3 + 2 * torch.rand(num_outliers, 1, generator=generator)
    return cloud, victims


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snap_outliers_matches_a_point_by_point_reference(seed: int) -> None:
    cloud, _ = _sphere_with_outliers(200, 6, seed)
    cloud[0, :20] += 0.05 * torch.randn(20, 3, generator=torch.Generator().manual_seed(seed))  # milder strays too
    expected = _reference_snap(cloud[0].numpy(), k=8, std_ratio=3.0)
    np.testing.assert_array_equal(snap_outliers(cloud, 8, 3.0)[0].numpy(), expected)


def test_snap_outliers_moves_far_points_onto_the_surface_and_barely_touches_the_rest() -> None:
    cloud, victims = _sphere_with_outliers(512, 5, seed=3)
    snapped = snap_outliers(cloud, 8, 3.0)
    moved = (snapped != cloud).any(-1)[0]
    assert moved[victims].all()
    assert moved.sum() - len(victims) <= 0.03 * 512  # the sparsest true points may move, onto a neighbour
    assert (snapped[0, moved, None] == cloud[0, None, ~moved]).all(-1).any(-1).all()  # onto points that stayed
    assert snapped.norm(dim=-1).sub(1).abs().max() < 1e-6  # every point is back on the sphere
    centres = gather_points(snapped, farthest_point_sampling(snapped, 64))
    assert centres.norm(dim=-1).sub(1).abs().max() < 1e-6


def test_snap_outliers_leaves_an_evenly_spaced_grid_alone() -> None:
    axis = torch.linspace(-1, 1, 8)
    grid = torch.cartesian_prod(axis, axis, axis)[None]  # corners and edges are more isolated than the middle
    assert torch.equal(snap_outliers(grid, 8, 3.0), grid)


def test_snap_outliers_falls_back_to_the_least_isolated_point_when_no_neighbour_is_an_inlier() -> None:
    cloud, _ = _sphere_with_outliers(300, 0, seed=4)
    ray = torch.linspace(3, 12, 10)[:, None] * torch.tensor([1.0, 0.0, 0.0])  # sparse: each one isolated
    cloud = torch.cat([cloud, ray[None]], dim=1)  # the middle ones have only outliers among their 8 nearest
    expected = _reference_snap(cloud[0].numpy(), k=8, std_ratio=3.0)
    assert (np.linalg.norm(expected[300:], axis=1) < 1.01).all()
    np.testing.assert_array_equal(snap_outliers(cloud, 8, 3.0)[0].numpy(), expected)


# --------------------------------------------------------------------------- errors and backend choice


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: farthest_point_sampling(p[0], 4), r"points must have shape \(batch, num_points, 3\)"),
        (lambda p: farthest_point_sampling(p[..., :2], 4), r"points must have shape \(batch, num_points, 3\)"),
        (lambda p: farthest_point_sampling(p, 11), r"num_samples must be between 1 and the number of points \(10\)"),
        (lambda p: farthest_point_sampling(p, 0), r"num_samples must be between 1"),
        (
            lambda p: farthest_point_sampling(p, 4, torch.tensor([0])),
            r"start_index must be an int64 tensor of shape \(2,\)",
        ),
        (lambda p: farthest_point_sampling(p, 4, torch.tensor([0, 10])), r"start_index values must be in \[0, 10\)"),
        (
            lambda p: farthest_point_sampling(p, 4, backend="nope"),
            r"fps backend 'nope' is unknown or unavailable.*'torch'",
        ),
        (
            lambda p: farthest_point_sampling(p, 4, backend="triton"),
            r"fps backend 'triton' is unknown or unavailable for these cpu inputs",
        ),
        (lambda p: knn_indices(p, p, 11), r"k must be between 1 and the number of points \(10\)"),
        (lambda p: knn_indices(p, p, 0), r"k must be between 1"),
        (lambda p: knn_indices(p[..., :2], p, 3), r"queries must have shape"),
        (lambda p: knn_indices(p, p[:1], 3), r"same batch size"),
        (lambda p: knn_indices(p, p, 3, backend="fpsample"), r"knn backend 'fpsample' is unknown or unavailable"),
        (
            lambda p: knn_indices(p, p.index_fill(1, torch.tensor([4]), float("nan")), 3),
            r"finite coordinates, got NaN",
        ),
        (lambda p: gather_points(p, torch.zeros(3, 4, dtype=torch.long)), r"must share the batch size"),
        (lambda p: snap_outliers(p, 10, 3.0), r"num_neighbors must be between 1 and num_points - 1 \(9\), got 10"),
        (lambda p: snap_outliers(p[0], 3, 3.0), r"points must have shape \(batch, num_points, 3\)"),
    ],
    ids=[
        "fps-rank",
        "fps-last-dim",
        "fps-too-many",
        "fps-zero",
        "fps-start-shape",
        "fps-start-range",
        "fps-backend",
        "fps-triton-on-cpu",
        "knn-k-too-big",
        "knn-k-zero",
        "knn-last-dim",
        "knn-batch",
        "knn-backend",
        "knn-nan",
        "gather-batch",
        "outliers-k",
        "outliers-rank",
    ],
)
def test_invalid_inputs_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(_cloud(2, 10))


def test_available_backends_always_include_torch() -> None:
    backends = available_backends()
    assert backends["fps"][0] == "torch" and backends["knn"][0] == "torch"


def test_default_backend_is_installed_and_runs_on_the_device() -> None:
    cuda_only = {"triton"}
    assert available_backends("cpu") == {
        op: [name for name in names if name not in cuda_only] for op, names in available_backends().items()
    }
    assert "fpsample" not in available_backends("cuda")["fps"]  # fpsample is CPU-only
    for op, installed in available_backends().items():
        assert default_backend(op, "cpu") in installed
        assert default_backend(op, "cuda") in available_backends("cuda")[op]
    assert default_backend("knn", "cuda", k=101) == "torch"  # torch_cluster's CUDA kNN stops at k=100


@pytest.mark.skipif("fpsample" not in available_backends()["fps"], reason="fpsample is not installed")
def test_cpu_fps_prefers_the_threaded_torch_loop_unless_torch_has_one_thread() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_backend("fps", "cpu") == "torch"
        torch.set_num_threads(1)
        assert default_backend("fps", "cpu") == "fpsample"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_knn_backend_depends_on_cloud_size_and_threads(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """With torch_cluster installed, clouds of <= 512 points on a threaded CPU still compute every distance."""
    from peft_any2point import ops

    monkeypatch.setattr(ops, "available_backends", lambda: {"fps": ["torch"], "knn": ["torch", "torch_cluster"]})
    calls = []

    def recording(name: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """A stand-in for backend `name`: records that it ran on how many points, answers with the torch kNN."""

        def run(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
            calls.append((name, points.shape[1]))
            return ops._knn_torch(queries, points, k)

        return run

    for name in ("torch", "torch_cluster"):
        monkeypatch.setitem(ops._IMPLEMENTATIONS["knn"], name, recording(name))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        small = "torch" if threads > 1 else "torch_cluster"
        assert default_backend("knn", "cpu", k=8, num_points=512) == small
        assert default_backend("knn", "cpu", k=8, num_points=513) == "torch_cluster"
        points = _cloud(2, 600)
        knn_indices(points[:, :16], points[:, :512], 8)  # 16 queries: the choice follows the points searched
        knn_indices(points[:, :16], points, 8)
    finally:
        torch.set_num_threads(previous)
    assert calls == [(small, 512), ("torch_cluster", 600)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif("triton" not in available_backends()["fps"], reason="triton is not installed")
def test_cuda_fps_prefers_triton() -> None:
    assert default_backend("fps", "cuda") == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    points = _cloud(4, 1024, seed=8)
    start = torch.tensor([0, 1, 2, 3])
    picked = farthest_point_sampling(points, 256, start_index=start)
    assert torch.equal(farthest_point_sampling(points.cuda(), 256, start_index=start.cuda()).cpu(), picked)
    queries = gather_points(points, picked)
    expected = knn_indices(queries, points, 32).sort(dim=-1).values
    assert torch.equal(knn_indices(queries.cuda(), points.cuda(), 32).cpu().sort(dim=-1).values, expected)
