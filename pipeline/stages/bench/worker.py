"""One backend's benchmark, run in its own interpreter by ``pipeline.stages.bench.protocol.run_worker``.

Usage (internal): ``python -m pipeline.stages.bench.worker SPEC.json RESULT.json``
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.bundle import Bundle, sha256_of
from pipeline.core.machine import cpu_model, gpu_info
from pipeline.core.records import LatencyRow, ModelSection, reason_rows
from pipeline.data.images import BadImage
from pipeline.errors import EnvironmentUnavailable, PipelineError
from pipeline.options import BenchOptions
from pipeline.runtimes.registry import VariantMissing, get_backend
from pipeline.stages.bench.image_loop import image_loops
from pipeline.stages.bench.protocol import PairedRates, WorkerResult, WorkerSpec
from pipeline.stages.bench.timing import (
    WINDOW_CALLS,
    percentile_stats,
    stable_loop,
    sweep,
    throughput_fields,
    timed_loop,
    warm_up,
    window_rates,
)


def device_label(runner: Any) -> str:
    if runner.device == "cuda":
        gpu = gpu_info() or {}
        return f"cuda:0 ({gpu.get('name', 'unknown GPU')})"
    return f"cpu ({cpu_model()})"


def bench_batches(runner: Any, backend: str, requested: str, config: BenchOptions, size: int,
                  gmacs: float | None, cold: dict[str, float]) -> list[LatencyRow]:
    """One row per batch size: the sizes given, or a sweep to the throughput peak."""
    rows: list[LatencyRow] = []

    def measure(batch_size: int) -> float | None:
        row = bench_batch(runner, backend, requested, config, size, gmacs, cold, batch_size)
        # the process's peak so far: with batch sizes ascending (the sweep, or a sorted list),
        # the memory this batch size needs with the runtime loaded
        row.peak_rss_mib = peak_rss_mib()
        rows.append(row)
        return row.images_per_s if row.ok else None

    if config.sweep:
        sweep(measure, max_batch=config.max_batch)
    else:
        for batch_size in config.batch_sizes:
            measure(batch_size)
    return rows


def bench_batch(runner: Any, backend: str, requested: str, config: BenchOptions, size: int,
                gmacs: float | None, cold: dict[str, float], batch_size: int) -> LatencyRow:
    model = {"model_file": runner.model_path.name, "model_sha256": sha256_of(runner.model_path)}
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, size, size),
                                                              dtype=np.float32)
    row = LatencyRow(backend, batch_size, precision=runner.precision, precision_requested=requested,
                     device=runner.device, provider=runner.provider, threads=config.threads,
                     **model, **cold)
    try:
        # A warm-up per batch size: cuDNN's algorithm search and TensorRT's profiles re-tune
        # for every new shape (and OpenVINO compiles each static shape).
        step, row.io = runner.timed_step(batch)
        row.warmup_iterations = warm_up(step, seconds=config.warmup_s, sync=runner.synchronize)
        samples, row.stable, row.window_spread = stable_loop(
            step, iterations=config.iterations, seconds=config.seconds,
            max_seconds=STABILITY_ALLOWANCE * config.seconds, sync=runner.synchronize)
    except Exception as exc:  # e.g. out of memory at a large batch: a row, not a crash
        return LatencyRow(backend, batch_size, precision=runner.precision,
                          precision_requested=requested, status="error", device=runner.device,
                          provider=runner.provider, **model,
                          reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    stats = percentile_stats(samples)
    row.windows_per_s = [round(rate, 3) for rate in  # None: not one complete window
                         window_rates(samples, runner.images_per_step(batch_size))] or None
    return replace(row, **stats.to_dict(), **throughput_fields(
        stats.p50_ms, runner.images_per_step(batch_size), gmacs))


STABILITY_ALLOWANCE = 3  # a row may run up to 3x --seconds looking for three agreeing windows


def cold_start(bundle: Bundle, backend: str, precision: str, config: BenchOptions,
               size: int) -> tuple[Any, dict[str, float]]:
    start = time.perf_counter_ns()
    runner = get_backend(backend).make(bundle, precision, threads=config.threads)
    created = time.perf_counter_ns()
    runner.infer(np.zeros((1, 3, size, size), np.float32))
    runner.synchronize()
    first = time.perf_counter_ns()
    return runner, {"cold_create_ms": (created - start) / 1e6,
                    "cold_first_infer_ms": (first - created) / 1e6}


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def bench_backend(spec: WorkerSpec) -> WorkerResult:
    config, backend, precision = spec.config, spec.backend, spec.precision
    bundle = Bundle.open(spec.bundle)
    size = ModelSection.read(bundle).input_size
    set_threads(config.threads)
    try:
        runner, cold = cold_start(bundle, backend, precision, config, size)
    except (EnvironmentUnavailable, VariantMissing) as exc:
        return WorkerResult(reason_rows(backend, precision, config.reason_batches,
                                        str(exc).split(": ", 1)[-1]
                                        if isinstance(exc, EnvironmentUnavailable) else str(exc)))
    with runner:
        result = WorkerResult(bench_batches(runner, backend, precision, config, size,
                                            spec.gmacs, cold))
        if spec.images:
            result.images = [image_loops(runner, backend, bundle, spec.images, config,
                                         device_label(runner))]
    return result


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def paired(spec: WorkerSpec) -> PairedRates:
    """``bench --baseline-rerun``: this bundle's model and the baseline model (a bundle or a
    bare .onnx) under one backend, warmed up, then timed in alternating windows of 25 calls,
    A B B A ..., so that both see the same machine state; images/s per window of each."""
    config, precision, batch = spec.config, spec.precision, spec.batch
    backend = get_backend(spec.backend)
    set_threads(config.threads)
    bundle = Bundle.open(spec.bundle)
    if spec.baseline is None:
        return PairedRates(error="paired mode needs a baseline (bench --baseline-rerun)")
    baseline = Path(spec.baseline)
    try:
        now = backend.make(bundle, precision, threads=config.threads)
        if baseline.is_dir():
            base = backend.make(Bundle.open(baseline), precision, threads=config.threads)
            base_size = ModelSection.read(Bundle.open(baseline)).input_size
        else:
            from pipeline.formats.onnx import io_spec

            base = backend.make_file(baseline, precision, threads=config.threads)
            base_size = int(io_spec(baseline)["input_dims"][-1])
    except (EnvironmentUnavailable, VariantMissing, PipelineError) as exc:
        return PairedRates(error=str(exc)[:300])
    size = ModelSection.read(bundle).input_size
    rng = np.random.default_rng(batch)
    rates: list[list[float]] = [[], []]
    with now, base:
        steps = []
        for runner, side in ((now, size), (base, base_size)):
            step, _ = runner.timed_step(rng.standard_normal((batch, 3, side, side), dtype=np.float32))
            warm_up(step, seconds=config.warmup_s, sync=runner.synchronize)
            steps.append((step, runner))
        for window in range(spec.windows):
            order = (0, 1) if window % 2 == 0 else (1, 0)
            for side in order:
                step, runner = steps[side]
                samples = timed_loop(step, iterations=WINDOW_CALLS, seconds=0, sync=runner.synchronize)
                rates[side] += window_rates(samples, runner.images_per_step(batch))
    return PairedRates(now=rates[0], baseline=rates[1])


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = WorkerSpec.from_json(spec_path.read_text())
    if spec.mode == "paired":
        result_path.write_text(json.dumps(paired(spec).to_dict()))
        return 0
    try:
        result = bench_backend(spec)
    except (PipelineError, BadImage) as exc:
        result = WorkerResult(reason_rows(spec.backend, spec.precision,
                                          spec.config.batch_sizes or (1,), str(exc), "error"))
    result_path.write_text(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
