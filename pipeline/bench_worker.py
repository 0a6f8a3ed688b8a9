"""One backend's benchmark, run in its own interpreter by ``pipeline.bench.run_worker``.

Usage (internal): ``python -m pipeline.bench_worker SPEC.json RESULT.json``
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.bench import (BenchConfig, Row, percentile_stats, reason_rows, throughput_fields,
                            timed_loop, warm_up)
from pipeline.bundle import ONNX, TORCHSCRIPT, WEIGHTS, Bundle
from pipeline.errors import EnvironmentUnavailable, PipelineError
from pipeline.images import BadImage

ORT_BACKENDS = {"ort-cpu": ("cpu", False), "ort-cuda": ("cuda", False),
                "ort-cuda-iobinding": ("cuda", True), "ort-tensorrt": ("tensorrt", False)}


def onnx_path(bundle: Bundle, preferred: str) -> Path:
    path = bundle.path(preferred)
    return path if path.is_file() else bundle.path(ONNX)


def make_runner(bundle: Bundle, backend: str, config: BenchConfig) -> Any:
    from pipeline.runners import OrtRunner, TorchRunner
    from pipeline.weights import load_model

    if backend in ORT_BACKENDS:
        provider, iobinding = ORT_BACKENDS[backend]
        return OrtRunner(onnx_path(bundle, config.onnx_file), provider=provider,
                         threads=config.threads, iobinding=iobinding)
    kind, device = backend.rsplit("-", 1)
    if kind == "torchscript":
        return TorchRunner.from_torchscript(bundle.path(TORCHSCRIPT), device=device)
    return TorchRunner(load_model(checkpoint=bundle.path(WEIGHTS)).model, device=device)


def step_for(runner: Any, batch: np.ndarray) -> tuple[Callable[[], None], str]:
    """The timed call and where its input and output live."""
    if getattr(runner, "iobinding", False):
        binding = runner.bind_on_device(batch)
        return (lambda: runner.run_bound(binding)), "device"
    return (lambda: runner.infer(batch)), "host"


def device_label(runner: Any) -> str:
    from pipeline.machine import cpu_model, gpu_info

    if runner.device == "cuda":
        gpu = gpu_info() or {}
        return f"cuda:0 ({gpu.get('name', 'unknown GPU')})"
    return f"cpu ({cpu_model()})"


def bench_batches(runner: Any, backend: str, config: BenchConfig, size: int,
                  gmacs: float | None, cold: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for batch_size in config.batch_sizes:
        batch = np.random.default_rng(batch_size).standard_normal((batch_size, 3, size, size),
                                                                  dtype=np.float32)
        row = Row(backend, batch_size, device=runner.device, provider=runner.provider,
                  threads=config.threads, **cold)
        try:
            step, row.io = step_for(runner, batch)
            row.warmup_iterations = warm_up(step, seconds=config.warmup_s, sync=runner.synchronize)
            samples = timed_loop(step, iterations=config.iterations, seconds=config.seconds,
                                 sync=runner.synchronize)
        except Exception as exc:  # e.g. out of memory at a large batch: a row, not a crash
            rows.append(asdict(Row(backend, batch_size, status="error", device=runner.device,
                                   provider=runner.provider,
                                   reason=f"{type(exc).__name__}: {str(exc)[:300]}")))
            continue
        stats = percentile_stats(samples)
        rows.append({**asdict(row), **stats, **throughput_fields(stats, batch_size, gmacs)})
    return rows


def cold_start(bundle: Bundle, backend: str, config: BenchConfig, size: int) -> tuple[Any, dict[str, float]]:
    start = time.perf_counter_ns()
    runner = make_runner(bundle, backend, config)
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
    backend = spec["backend"]
    bundle = Bundle.open(spec["bundle"])
    size = int(bundle.read_manifest()["model"]["input_size"])
    set_threads(config.threads)
    try:
        runner, cold = cold_start(bundle, backend, config, size)
    except EnvironmentUnavailable as exc:
        return {"rows": reason_rows(backend, config.batch_sizes, str(exc).split(": ", 1)[-1])}
    result: dict[str, Any] = {"rows": bench_batches(runner, backend, config, size,
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
        result = {"rows": reason_rows(spec["backend"], tuple(config["batch_sizes"]), str(exc), "error")}
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
