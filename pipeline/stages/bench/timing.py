"""Timing: warm-up, the timed loop, and the statistics every latency row carries.

Warm-up is at least ``MIN_WARMUP_ITERATIONS`` and at least ``warmup_s`` seconds; the timed run
lasts until both ``iterations`` and ``seconds`` are reached, each iteration timed with
``perf_counter_ns`` (the runner synchronises a GPU before each stop).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipeline.core.records import Percentiles

MIN_WARMUP_ITERATIONS = 10
P99_MIN_SAMPLES = 600


def percentile_stats(samples_ns: list[int]) -> Percentiles:
    """n, mean, std, min, p50, p90, p95, p99, max in milliseconds.

    Percentiles use numpy's linear interpolation. p99 needs at least 600 samples (six beyond
    the 99th percentile); below that it is None and ``p99_note`` says why.
    """
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    n = int(values.size)
    if n == 0:
        raise ValueError("no samples")
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    few = n < P99_MIN_SAMPLES
    return Percentiles(n=n, mean_ms=float(values.mean()),
                       std_ms=float(values.std(ddof=1)) if n > 1 else 0.0,
                       min_ms=float(values.min()), p50_ms=float(p50), p90_ms=float(p90),
                       p95_ms=float(p95), p99_ms=None if few else float(p99),
                       p99_note=f"omitted: n={n} < {P99_MIN_SAMPLES}" if few else None,
                       max_ms=float(values.max()))


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


def throughput_fields(p50_ms: float, batch: int, gmacs: float | None) -> dict[str, float | None]:
    """A latency row's ms per image, images/s and achieved GFLOP/s (2 x MACs per image / p50)."""
    p50_s = p50_ms / 1e3
    return {"ms_per_image": p50_ms / batch,
            "images_per_s": batch / p50_s,
            "gflops": (2 * gmacs * batch / p50_s) if gmacs else None}


WINDOW_CALLS = 25  # calls per stability window (Model Navigator's)
STABLE_WINDOWS = 3
STABLE_SPREAD = 0.10


def window_spread(samples_ns: list[int], images_per_call: int = 1) -> float | None:
    """(max - min) / median of the images/s of the last three windows of 25 calls, or None
    with fewer than three windows."""
    if len(samples_ns) < STABLE_WINDOWS * WINDOW_CALLS:
        return None
    rates = []
    for k in range(STABLE_WINDOWS):
        end = len(samples_ns) - k * WINDOW_CALLS
        window = samples_ns[end - WINDOW_CALLS:end]
        rates.append(WINDOW_CALLS * images_per_call / (sum(window) / 1e9))
    median = sorted(rates)[1]
    return (max(rates) - min(rates)) / median


def window_rates(samples_ns: list[int], images_per_call: int = 1) -> list[float]:
    """images/s of every complete window of 25 consecutive calls, in order (the regression
    gate's samples: windows, not single calls, so that one slow call is not a sample)."""
    return [WINDOW_CALLS * images_per_call / (sum(samples_ns[i:i + WINDOW_CALLS]) / 1e9)
            for i in range(0, len(samples_ns) - WINDOW_CALLS + 1, WINDOW_CALLS)]


def stable_loop(step: Callable[[], None], *, iterations: int, seconds: float,
                max_seconds: float, sync: Callable[[], None] = lambda: None,
                clock: Callable[[], int] = time.perf_counter_ns) -> tuple[list[int], bool | None, float | None]:
    """``timed_loop``, then more windows of 25 calls until the last three agree within 10% or
    ``max_seconds`` have passed: (samples, stable, spread). With fewer than three windows'
    worth of calls and no time to add more (``--seconds 0``), stability is unknown (None)."""
    start = clock()
    samples = timed_loop(step, iterations=iterations, seconds=seconds, sync=sync, clock=clock)
    spread = window_spread(samples)
    while (spread is None or spread > STABLE_SPREAD) and clock() - start < max_seconds * 1e9:
        samples += timed_loop(step, iterations=WINDOW_CALLS, seconds=0, sync=sync, clock=clock)
        spread = window_spread(samples)
    if spread is None:
        return samples, None, None
    return samples, spread <= STABLE_SPREAD, spread


def sweep(measure: Callable[[int], float | None], *, max_batch: int = 256, gain: float = 0.05,
          backoff: int = 2) -> list[int]:
    """Batch sizes 1, 2, 4, ... measured until throughput stops gaining: a size that does not
    beat the best so far by ``gain`` (5%) is a miss, and after ``backoff`` (2) more misses in a
    row the sweep stops, so that a plateau is not taken for the peak (NVIDIA Model Navigator's
    rule). ``measure(batch)`` returns images/s, or None when the batch cannot run (memory):
    the sweep stops there. Returns the sizes measured."""
    best, misses, batch, tried = 0.0, 0, 1, []
    while batch <= max_batch:
        rate = measure(batch)
        tried.append(batch)
        if rate is None:
            break
        if rate >= best * (1.0 + gain):
            misses = 0
        else:
            misses += 1
            if misses > backoff:
                break
        best = max(best, rate)
        batch *= 2
    return tried
