"""``run``: train -> export -> quantize -> verify -> bench -> report into one bundle, callable
without click. int8 is calibrated on the training split (and repaired there if it falls short,
``quantize --repair``) and gated on the validation split, topped up with held-apart images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.console import StageTimer
from pipeline.core.records import LatencyDoc, ParityReport, TrainSummary
from pipeline.models.weights import load_model
from pipeline.options import BenchOptions, TrainOptions
from pipeline.stages.bench.protocol import run_bench
from pipeline.stages.export import ExportOptions, export_bundle
from pipeline.stages.quantize import QuantizeOptions, quantize_bundle
from pipeline.stages.bench.writeup import save_bench
from pipeline.stages.train import fit
from pipeline.stages.verify import verify_bundle


@dataclass
class RunResult:
    bundle: Path
    training: TrainSummary
    parity: ParityReport
    latency: LatencyDoc

    def __bool__(self) -> bool:
        """True when verify passed: the run's CI answer."""
        return bool(self.parity)

    @property
    def path(self) -> Path:
        return self.bundle

    @property
    def record(self) -> LatencyDoc:
        return self.latency

    @property
    def summary(self) -> str:
        return (f"{self.bundle}: best val accuracy {self.training.best_val_acc:.4f}, "
                f"{self.parity.summary}")


def run_all(config: TrainOptions, bench_config: BenchOptions, *, command: str,
            log: Callable[[str], None]) -> RunResult:
    log("== train")
    training = fit(config, log=log)
    bundle = Path(training.bundle)
    log("== export")
    export_bundle(load_model(checkpoint=bundle / "checkpoint.pt"), bundle, ExportOptions(), StageTimer())
    log("== quantize")
    quantize_bundle(bundle, QuantizeOptions(precisions=("int8",), calibration="train", repair=True),
                    log=log)
    log("== verify")
    parity = verify_bundle(bundle)
    log("== bench")
    started = time.perf_counter()
    latency = run_bench(bundle, bench_config)
    latency.command = command
    save_bench(latency, bundle, None, started=started)
    return RunResult(bundle, training, parity, latency)
