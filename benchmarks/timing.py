"""Interleaved wall-clock timing shared by the benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from torch.utils.benchmark import Timer


def interleaved_median(
    calls: dict[str, Callable[[], object]], min_run_time: float, rounds: int, num_threads: int
) -> dict[str, tuple[float, int]]:
    """Median wall time of each call in seconds, and the number of timed runs behind it.

    The calls take turns, `rounds` times, so that load from other processes on the shared cores falls on all of
    them alike rather than on whichever ran during a busy spell. `Timer` runs with one thread unless told
    otherwise, hence `num_threads`.
    """
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=num_threads) for name, fn in calls.items()}
    for timer in timers.values():
        timer.timeit(1)  # warm-up: allocator, oneDNN primitives, lazily built buffers
    number = {name: max(1, round(min_run_time / rounds / timer.timeit(1).mean)) for name, timer in timers.items()}
    blocks: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, timer in timers.items():
            blocks[name].append(timer.timeit(number[name]).mean)
    return {name: (statistics.median(times), rounds * number[name]) for name, times in blocks.items()}
