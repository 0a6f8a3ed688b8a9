"""Timing: warm-up, the timed loop, and the statistics every latency row carries.

Warm-up is at least ``MIN_WARMUP_ITERATIONS`` and at least ``warmup_s`` seconds; the timed run
lasts until both ``iterations`` and ``seconds`` are reached, each iteration timed with
``perf_counter_ns`` (the runner synchronises a GPU before each stop).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

MIN_WARMUP_ITERATIONS = 10
P99_MIN_SAMPLES = 600


def percentile_stats(samples_ns: list[int]) -> dict[str, Any]:
    """n, mean, std, min, p50, p90, p95, p99, max in milliseconds.

    Percentiles use numpy's linear interpolation. p99 needs at least 600 samples (six beyond
    the 99th percentile); below that it is None and ``p99_note`` says why.
    """
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    n = int(values.size)
    if n == 0:
        raise ValueError("no samples")
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    stats = {"n": n, "mean_ms": float(values.mean()), "std_ms": float(values.std(ddof=1)) if n > 1 else 0.0,
             "min_ms": float(values.min()), "p50_ms": float(p50), "p90_ms": float(p90),
             "p95_ms": float(p95), "p99_ms": float(p99), "p99_note": None, "max_ms": float(values.max())}
    if n < P99_MIN_SAMPLES:
        stats["p99_ms"] = None
        stats["p99_note"] = f"omitted: n={n} < {P99_MIN_SAMPLES}"
    return stats


def timed_loop(step: Callable[[], None], *, iterations: int, seconds: float,
               sync: Callable[[], None] = lambda: None,
               clock: Callable[[], int] = time.perf_counter_ns) -> list[int]:
    """Run ``step`` until both ``iterations`` and ``seconds`` are reached; per-iteration ns."""
    samples: list[int] = []
    deadline = clock() + int(seconds * 1e9)
    while len(samples) < iterations or clock() < deadline:
        start = clock()
        step()
        sync()
        samples.append(clock() - start)
    return samples


def warm_up(step: Callable[[], None], *, seconds: float, sync: Callable[[], None] = lambda: None,
            clock: Callable[[], int] = time.perf_counter_ns) -> int:
    """At least ``MIN_WARMUP_ITERATIONS`` and at least ``seconds``; returns the count."""
    return len(timed_loop(step, iterations=MIN_WARMUP_ITERATIONS, seconds=seconds, sync=sync,
                          clock=clock))


def throughput_fields(stats: dict[str, Any], batch: int, gmacs: float | None) -> dict[str, Any]:
    """ms per image, images/s and achieved GFLOP/s (2 x MACs per image / p50)."""
    p50_s = stats["p50_ms"] / 1e3
    return {"ms_per_image": stats["p50_ms"] / batch,
            "images_per_s": batch / p50_s,
            "gflops": (2 * gmacs * batch / p50_s) if gmacs else None}
