"""``run``: train -> export -> quantize -> verify -> bench -> report into one bundle, callable
without click. int8 is calibrated on the training split and gated on the validation split."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.bench import BenchConfig
from pipeline.train import TrainConfig


@dataclass
class RunResult:
    bundle: Path
    training: dict[str, Any]
    parity: Any
    latency: dict[str, Any]

    def __bool__(self) -> bool:
        """True when verify passed: the run's CI answer."""
        return bool(self.parity)


def run_all(config: TrainConfig, bench_config: BenchConfig, *, command: str,
            log: Callable[[str], None]) -> RunResult:
    from pipeline.bench import run_bench
    from pipeline.console import StageTimer
    from pipeline.export import ExportOptions, export_bundle
    from pipeline.quantize import QuantizeOptions, quantize_bundle
    from pipeline.report import record_bench, write_bench_outputs
    from pipeline.train import fit
    from pipeline.verify import verify_bundle
    from pipeline.weights import load_model

    log("== train")
    training = fit(config, log=log)
    bundle = Path(training["bundle"])
    log("== export")
    export_bundle(load_model(checkpoint=bundle / "checkpoint.pt"), bundle, ExportOptions(), StageTimer())
    log("== quantize")
    quantize_bundle(bundle, QuantizeOptions(precisions=("int8",), calibration="train"), log=log)
    log("== verify")
    parity = verify_bundle(bundle)
    log("== bench")
    started = time.perf_counter()
    latency = run_bench(bundle, bench_config)
    latency["command"] = command
    write_bench_outputs(latency, bundle, None)
    record_bench(bundle, time.perf_counter() - started)
    return RunResult(bundle, training, parity, latency)
