"""One backend's benchmark, run in its own interpreter by ``pipeline.bench.run_worker``.

Usage (internal): ``python -m pipeline.bench_worker SPEC.json RESULT.json``
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import VariantMissing, get_backend
from pipeline.bench import (BenchConfig, Row, percentile_stats, reason_rows, throughput_fields,
                            timed_loop, warm_up)
from pipeline.bundle import Bundle, sha256_of
from pipeline.errors import EnvironmentUnavailable, PipelineError
from pipeline.images import BadImage


def device_label(runner: Any) -> str:
    from pipeline.machine import cpu_model, gpu_info

    if runner.device == "cuda":
        gpu = gpu_info() or {}
        return f"cuda:0 ({gpu.get('name', 'unknown GPU')})"
    return f"cpu ({cpu_model()})"


def bench_batches(runner: Any, backend: str, requested: str, config: BenchConfig, size: int,
                  gmacs: float | None, cold: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    model = {"model_file": runner.model_path.name, "model_sha256": sha256_of(runner.model_path)}
    for batch_size in config.batch_sizes:
        batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, size, size),
                                                                  dtype=np.float32)
        row = Row(backend, batch_size, precision=runner.precision, precision_requested=requested,
                  device=runner.device, provider=runner.provider, threads=config.threads,
                  **model, **cold)
        try:
            # A warm-up per batch size: cuDNN's algorithm search and TensorRT's profiles
            # re-tune for every new shape.
            step, row.io = runner.timed_step(batch)
            row.warmup_iterations = warm_up(step, seconds=config.warmup_s, sync=runner.synchronize)
            samples = timed_loop(step, iterations=config.iterations, seconds=config.seconds,
                                 sync=runner.synchronize)
        except Exception as exc:  # e.g. out of memory at a large batch: a row, not a crash
            rows.append(asdict(Row(backend, batch_size, precision=runner.precision,
                                   precision_requested=requested, status="error",
                                   device=runner.device, provider=runner.provider, **model,
                                   reason=f"{type(exc).__name__}: {str(exc)[:300]}")))
            continue
        stats = percentile_stats(samples)
        rows.append({**asdict(row), **stats, **throughput_fields(stats, batch_size, gmacs)})
    return rows


def cold_start(bundle: Bundle, backend: str, precision: str, config: BenchConfig,
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


def bench_backend(spec: dict[str, Any]) -> dict[str, Any]:
    config = BenchConfig(**{**spec["config"], "backends": tuple(spec["config"]["backends"]),
                            "batch_sizes": tuple(spec["config"]["batch_sizes"])})
    backend, precision = spec["backend"], spec["precision"]
    bundle = Bundle.open(spec["bundle"])
    size = int(bundle.read_manifest()["model"]["input_size"])
    set_threads(config.threads)
    problem = get_backend(backend).precision_problem(precision)
    if problem:
        return {"rows": reason_rows(backend, precision, config.batch_sizes, problem)}
    try:
        runner, cold = cold_start(bundle, backend, precision, config, size)
    except (EnvironmentUnavailable, VariantMissing) as exc:
        return {"rows": reason_rows(backend, precision, config.batch_sizes,
                                    str(exc).split(": ", 1)[-1] if isinstance(exc, EnvironmentUnavailable)
                                    else str(exc))}
    result: dict[str, Any] = {"rows": bench_batches(runner, backend, precision, config, size,
                                                    spec.get("gmacs"), cold)}
    if spec.get("images"):
        from pipeline.image_loop import image_loops

        result["images"] = [image_loops(runner, backend, bundle, spec["images"], config,
                                        device_label(runner))]
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        result = bench_backend(spec)
    except (PipelineError, BadImage) as exc:
        config = spec["config"]
        result = {"rows": reason_rows(spec["backend"], spec["precision"],
                                      tuple(config["batch_sizes"]), str(exc), "error")}
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
