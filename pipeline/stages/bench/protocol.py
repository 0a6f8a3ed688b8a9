"""The latency protocol, in the spirit of ONNX Runtime's perf_test, trtexec and MLPerf single-stream.

- Each backend runs in its own subprocess (``pipeline.stages.bench.worker``), so one runtime's thread
  pool never slows another's; every CPU backend gets the same explicit thread count.
- Cold start is timed apart: model or session creation, then the first inference.
- Warm-up: at least 10 iterations and at least ``warmup_s`` seconds.
- Timed run: until both ``iterations`` and ``seconds`` are reached, each iteration timed with
  ``perf_counter_ns``; on CUDA the runner synchronises before each stop.
- Results are flat rows: one per backend x batch size. A backend that cannot run is a row with
  a reason and no numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.core.bundle import Bundle
from pipeline.core.machine import machine_block
from pipeline.core.records import (
    BenchConfig,
    BenchedModel,
    ImageLoop,
    LatencyDoc,
    LatencyRow,
    ModelSection,
    Record,
    read_parity,
    reason_rows,
)
from pipeline.models.archs import describe, get_arch
from pipeline.options import BenchOptions
from pipeline.runtimes.registry import (
    get_backend,
    parse_targets,
    split_target,
    target_name,
)
from pipeline.stages.bench.timing import MIN_WARMUP_ITERATIONS
from pipeline.stages.recommend import attach_verification

WORKER_TIMEOUT_S = 1800  # one backend's worker process, all batch sizes


def all_targets() -> tuple[str, ...]:
    """Every target the registry times by default (``bench`` without ``--backends``)."""
    return tuple(target_name(b, p) for b, p in parse_targets(None))


@dataclass
class WorkerResult(Record):
    """What one worker process hands back (as JSON in a file): its rows, and the per-image
    loops when ``--images`` was given."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"rows": LatencyRow, "images": ImageLoop}

    rows: list[LatencyRow]
    images: list[ImageLoop] = field(default_factory=list)


@dataclass(kw_only=True)
class WorkerSpec:
    """What bench hands a worker process (as JSON in a file): which backend times which
    bundle, and how. ``mode="paired"`` is ``--baseline-rerun``'s alternating windows against
    ``baseline``; otherwise the worker times ``config.batch_sizes`` (and ``images``)."""

    bundle: str
    backend: str
    precision: str
    config: BenchOptions
    gmacs: float | None = None
    images: list[str] | None = None
    mode: str = "rows"  # rows | paired
    baseline: str | None = None  # paired: the baseline bundle or .onnx
    batch: int = 1  # paired: the batch size
    windows: int = 0  # paired: how many windows each

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        values = json.loads(text)
        config = values.pop("config")  # tuples come back from JSON as lists
        return cls(**values, config=BenchOptions(**{
            **config, "backends": tuple(config["backends"]),
            "batch_sizes": tuple(config["batch_sizes"])}))


@dataclass
class PairedRates(Record):
    """A paired worker's answer: images/s per window of this bundle and of the baseline, or
    why there are none."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"error"})

    now: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    error: str | None = None


def run_worker(bundle: Path, target: str, config: BenchOptions, *, gmacs: float | None,
               images: list[str] | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> WorkerResult:
    """Run one target in a fresh interpreter; a crash or a hang becomes error rows. A backend
    this machine cannot run (no GPU, no extra) or a precision this CPU cannot run fast is
    decided here, before any process starts."""
    backend, precision = split_target(target)
    entry = get_backend(backend)
    problem = entry.availability_problem() or entry.precision_problem(precision)
    if problem:
        return WorkerResult(reason_rows(backend, precision, config.reason_batches, problem))
    spec = WorkerSpec(bundle=str(bundle), backend=backend, precision=precision, config=config,
                      gmacs=gmacs, images=images)
    result, failure = worker_process(spec, timeout_s)
    if result is None:
        return WorkerResult(reason_rows(backend, precision, config.reason_batches, failure,
                                        "error"))
    return WorkerResult.from_dict(result, where=f"bench worker for {target}")


def worker_process(spec: WorkerSpec, timeout_s: float = WORKER_TIMEOUT_S) -> tuple[Any, str]:
    """``python -m pipeline.stages.bench.worker`` on ``spec`` in a fresh interpreter with
    ``spec.config.threads`` OpenMP/MKL threads: (its JSON result, "") or (None, why it left
    none: a timeout, a crash, an exit)."""
    threads = spec.config.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(spec.to_json())
        try:
            # -X faulthandler: a worker killed by a signal (a native crash) leaves the Python
            # frame it died in, which becomes the reason.
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m",
                                   "pipeline.stages.bench.worker", str(spec_path),
                                   str(result_path)], capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout_s:g}s"
        if result_path.is_file():
            return json.loads(result_path.read_text()), ""
        return None, worker_failure(proc.returncode, proc.stderr or proc.stdout)


def worker_failure(returncode: int, output: str) -> str:
    """Why a worker left no result: its last line, or for a signal the frame it died in."""
    lines = [line.strip() for line in (output or "").strip().splitlines() if line.strip()]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        frames = [line for line in lines if line.startswith('File "')]
        return f"worker killed by {name}" + (f" in {frames[0][:300]}" if frames else "")
    return f"worker exited {returncode}: {(lines[-1:] or ['no output'])[0][:300]}"


def run_bench(bundle: Path, config: BenchOptions, *, images: list[str] | None = None,
              progress: bool = True, label: str | None = None) -> LatencyDoc:
    """Every selected backend, each in its own subprocess; returns the latency document, its
    machine under ``label`` (the hostname when None)."""
    from tqdm import tqdm

    opened = Bundle.open(bundle)
    manifest = opened.read_manifest()
    opened.require_export(manifest)
    model = ModelSection.of(manifest, str(opened.manifest_path))
    gmacs = describe(get_arch(model.arch), num_classes=model.num_classes,
                     input_size=model.input_size)["gmacs"]
    rows: list[LatencyRow] = []
    loops: list[ImageLoop] = []
    for target in tqdm(config.backends or all_targets(), desc="bench", unit="target", disable=None if progress else True,
                       file=sys.stderr):
        result = run_worker(bundle, target, config, gmacs=gmacs, images=images)
        rows += result.rows
        loops += result.images
    attach_verification(rows, read_parity(opened))
    return LatencyDoc(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=BenchedModel(arch=model.arch, input_size=model.input_size,
                           num_classes=model.num_classes, gmacs_per_image=gmacs,
                           onnx_file=opened.fp32_onnx()),
        config=BenchConfig(**{**asdict(config), "backends": list(config.backends),
                              "batch_sizes": list(config.batch_sizes)}, sweep=config.sweep,
                           min_warmup_iterations=MIN_WARMUP_ITERATIONS),
        machine=machine_block(label), rows=rows, images=loops)
