"""The Python API: one function per stage, the same stages the CLI runs.

    import pipeline

    result = pipeline.export("resnet18", out="exported/resnet18")
    report = pipeline.verify("exported/resnet18")          # truthy when it passed
    bench = pipeline.bench("exported/resnet18", backends="ort-cpu,torch-export-cpu", batch_sizes=[1])
    print(bench.recommendation["fastest_batch1"])
    top = pipeline.predict("exported/resnet18/model.pt2", ["cat.jpg"])

Every function returns a result object and prints nothing to stdout; progress lines go to
``log`` (stderr by default; pass ``log=lambda line: None`` to silence them). Bad input raises
the typed errors of ``pipeline.errors`` (``InputError``, ``EnvironmentUnavailable``,
``CheckFailed``), the same ones the CLI maps to exit codes 2, 3 and 1; nothing here calls
``sys.exit``. A failed parity check is not an exception: it is a falsy report.

Heavy libraries (torch, onnx, runtimes) are imported inside the calls, so ``import pipeline``
stays light.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pipeline.console import log as stderr_log
from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.predict import Prediction
    from pipeline.verify import ParityReport
    from pipeline.workflow import RunResult

Log = Callable[[str], None]
DEFAULT_BUNDLE_ROOT = Path("exported")


# ----------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    bundle: Path
    best_val_acc: float
    epochs: int
    classes: list[str]
    summary: dict[str, Any]


@dataclass
class ExportResult:
    """The bundle written, its manifest, and verify's report (None with ``verify=False``).
    Truthy when the export verified (or was not asked to)."""

    bundle: Path
    manifest: dict[str, Any]
    parity: "ParityReport | None"
    durations: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.parity is None or bool(self.parity)


@dataclass
class BenchResult:
    """latency.json's document, the recommendation, and warnings about stale results."""

    bundle: Path
    doc: dict[str, Any]
    recommendation: dict[str, Any]
    warnings: list[str]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.doc["rows"]

    @property
    def unavailable(self) -> list[dict[str, Any]]:
        from pipeline.bench import unavailable

        return unavailable(self.rows)


# ----------------------------------------------------------------------------- helpers
def _names(value: str | Iterable[str] | None) -> str | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``"a,b"`` (the CLI's spelling, parsed in one place)."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(v) for v in value)


def int_list(value: str | Iterable[int], option: str) -> tuple[int, ...]:
    """``"1,8,32"`` or ``[1, 8, 32]`` as positive integers, else an InputError naming ``option``."""
    try:
        values = (tuple(int(v) for v in value.split(",") if v.strip()) if isinstance(value, str)
                  else tuple(int(v) for v in value))
    except (TypeError, ValueError):
        values = ()
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} {value!r} must be positive integers separated by commas, "
                         f"e.g. 1,8,32")
    return values


def targets(backends: str | Iterable[str] | None, precisions: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """Backends (and precisions) as ``backend:precision`` targets, from the registry."""
    from pipeline.backends import parse_targets, target_name

    return tuple(target_name(b, p) for b, p in parse_targets(_names(backends), _names(precisions)))


# ----------------------------------------------------------------------------- stages
def train(arch: str | None = None, data: str | None = None, *, resume: str | Path | None = None,
          log: Log = stderr_log, **options: Any) -> TrainResult:
    """Train or fine-tune; ``options`` are TrainConfig's fields (epochs, batch_size, lr, out,
    optimizer, schedule, weights, freeze_backbone, input_size, seed, device, ...).

    With ``resume`` (a last.pt), the interrupted run's own options fill in what is not given
    here. Ctrl-C raises KeyboardInterrupt after last.pt holds the last complete epoch.
    """
    from pipeline.train import build_config, fit

    config = build_config({"arch": arch, "data": data, **options},
                          resume=str(resume) if resume else None)
    summary = fit(config, log=log)
    return TrainResult(Path(summary["bundle"]), summary["best_val_acc"], summary["epochs"],
                       summary["classes"], summary)


def export(arch: str | None = None, *, out: str | Path | None = None, weights: str = "random",
           checkpoint: str | Path | None = None, num_classes: int | None = None,
           class_names: str | Sequence[str] | None = None, input_size: int | None = None,
           seed: int = 0, exporter: str = "dynamo", opset: int = 18, simplify: bool = True,
           pt2: bool = True, aoti: bool = False, verify: bool = True,
           images: str | Path | None = None, atol: float | None = None, rtol: float | None = None,
           max_top1_drop: float | None = None, min_agreement: float | None = None,
           verbose: bool = False, log: Log = stderr_log) -> ExportResult:
    """Export to ONNX (+ onnxsim), TorchScript and model.pt2 (+ AOTInductor with ``aoti``),
    then verify parity unless ``verify=False``. Returns an ExportResult, truthy when verified."""
    from pipeline.console import StageTimer
    from pipeline.export import ExportOptions, check_options, export_bundle
    from pipeline.weights import load_model, parse_class_names

    options = ExportOptions(exporter=exporter, opset=opset, simplify=simplify, pt2=pt2, aoti=aoti,
                            verbose=verbose)
    check_options(options)
    names = parse_class_names(_names(class_names))
    timer = StageTimer(log=log)
    with timer.stage("load") as step:
        loaded = load_model(arch, num_classes=num_classes, weights=weights,
                            checkpoint=Path(checkpoint) if checkpoint else None,
                            class_names=names, input_size=input_size, seed=seed)
        step["text"] = (f"{loaded.arch}, {loaded.num_classes} classes, "
                        f"{loaded.preprocessing.crop}px, weights {loaded.weights['source']}")
    bundle_dir = Path(out) if out else DEFAULT_BUNDLE_ROOT / loaded.arch
    log(f"exporting {loaded.arch} to {bundle_dir}/")
    bundle = export_bundle(loaded, bundle_dir, options, timer)
    del loaded
    report = None
    if verify:
        with timer.stage("verify") as step:
            report = _verify(bundle.root, images=images, atol=atol, rtol=rtol,
                             max_top1_drop=max_top1_drop, min_agreement=min_agreement)
            step["text"] = f"{'passed' if report else 'FAILED'} ({len(report.pairs)} comparisons)"
    return ExportResult(bundle.root, bundle.read_manifest(), report, dict(timer.durations))


def verify(bundle: str | Path, *, images: str | Path | None = None, atol: float | None = None,
           rtol: float | None = None, max_top1_drop: float | None = None,
           min_agreement: float | None = None, cuda: bool = True) -> "ParityReport":
    """Hashes, fp32 parity of every artifact against eager PyTorch, and the accuracy gate of
    every reduced-precision variant. The report is truthy when everything passed; its
    ``environment_only`` says a failure came only from what this machine lacks."""
    return _verify(bundle, images=images, atol=atol, rtol=rtol, max_top1_drop=max_top1_drop,
                   min_agreement=min_agreement, cuda=cuda)


def _verify(bundle: str | Path, *, images: str | Path | None = None, atol: float | None = None,
            rtol: float | None = None, max_top1_drop: float | None = None,
            min_agreement: float | None = None, cuda: bool = True) -> "ParityReport":
    from pipeline.tolerances import DEFAULT_MAX_TOP1_DROP, DEFAULT_MIN_AGREEMENT
    from pipeline.verify import verify_bundle

    return verify_bundle(
        Path(bundle), atol=atol, rtol=rtol, images=Path(images) if images else None,
        with_cuda=cuda,
        max_top1_drop=DEFAULT_MAX_TOP1_DROP if max_top1_drop is None else max_top1_drop,
        min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement)


def quantize(bundle: str | Path, *, precisions: str | Sequence[str] = ("int8", "fp16"),
             calibration: str | Path | None = None, count: int = 300, method: str = "minmax",
             seed: int = 0, reduce_range: bool | None = None, log: Log = stderr_log) -> dict[str, Any]:
    """Write model.int8.onnx / model.fp16.onnx; returns the manifest's quantize record."""
    from pipeline.quantize import QuantizeOptions, quantize_bundle

    wanted = tuple(p.strip() for p in (_names(precisions) or "").split(",") if p.strip())
    options = QuantizeOptions(precisions=wanted, calibration=str(calibration) if calibration else None,
                              count=count, method=method, seed=seed, reduce_range=reduce_range)
    return quantize_bundle(Path(bundle), options, log=log)


def bench(bundle: str | Path, *, backends: str | Sequence[str] | None = None,
          precisions: str | Sequence[str] | None = None,
          batch_sizes: str | Sequence[int] = (1, 8, 32), iterations: int = 200,
          seconds: float = 5.0, warmup_seconds: float = 1.0, threads: int | None = None,
          images: str | Path | None = None, budget_ms: float | None = None,
          progress: bool = False, command: str | None = None, scenario: str = "single-stream",
          concurrency: str | Sequence[int] = (1, 4, 16), log: Log = stderr_log) -> BenchResult:
    """Time every backend (each in its own process); writes latency.json, report.md and
    latency.png into the bundle. ``command`` is recorded as what made the numbers.

    ``scenario="server"`` serves the bundle with Triton instead and drives it with each
    ``concurrency`` of loopback clients for ``seconds``, beside a fresh single-stream ORT
    batch-1 baseline; the rows go into latency.json's ``server`` section."""
    if scenario not in ("single-stream", "server"):
        raise InputError(f"unknown --scenario {scenario!r}; choose from: single-stream, server")
    if scenario == "server":
        from pipeline.bundle import Bundle
        from pipeline.loadtest import ServerScenario, server_bench
        from pipeline.report import stale_parity_warnings

        target = Bundle.open(Path(bundle))
        doc, advice = server_bench(
            target, ServerScenario(concurrency=int_list(concurrency, "--concurrency"),
                                   seconds=seconds, warmup_s=max(warmup_seconds, 1.0),
                                   threads=threads),
            iterations=iterations, warmup_seconds=warmup_seconds, budget_ms=budget_ms,
            progress=progress, command=command or f"pipeline.bench({str(bundle)!r}, scenario='server')",
            log=log)
        return BenchResult(target.root, doc, advice, stale_parity_warnings(target))
    from pipeline.bench import BenchConfig, run_bench
    from pipeline.bundle import Bundle
    from pipeline.images import find_images
    from pipeline.report import record_bench, stale_parity_warnings, write_bench_outputs

    if iterations < 1 or seconds < 0 or warmup_seconds < 0:
        raise InputError("--iterations must be >= 1 and --seconds/--warmup-seconds >= 0")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads} must be at least 1")
    config = BenchConfig(backends=targets(backends, precisions),
                         batch_sizes=int_list(batch_sizes, "--batch-sizes"),
                         iterations=iterations, seconds=seconds, warmup_s=warmup_seconds,
                         threads=threads or os.cpu_count() or 1)
    target = Bundle.open(Path(bundle))
    files = [str(p) for p in find_images([Path(images)])] if images else None
    started = time.perf_counter()
    doc = run_bench(target.root, config, images=files, progress=progress)
    doc["command"] = command or f"pipeline.bench({str(bundle)!r})"
    advice = write_bench_outputs(doc, target.root, budget_ms)
    record_bench(target.root, time.perf_counter() - started)
    return BenchResult(target.root, doc, advice, stale_parity_warnings(target))


def predict(model: str | Path, images: str | Path | Sequence[str | Path], *, top_k: int = 5,
            provider: str = "cpu", runtime: str = "ort", precision: str = "fp32",
            server: str | None = None) -> list["Prediction"]:
    """Classify image files or folders with a bundle, a bare .onnx or a model.pt2, or through
    the Triton server at ``server`` (a URL) that serves the bundle. A file that cannot be read
    is a Prediction with ``error`` set; the others are still classified."""
    from pipeline.predict import predict as run_predict

    items = [images] if isinstance(images, (str, Path)) else list(images)
    return run_predict(Path(model), [Path(p) for p in items], k=top_k, provider=provider,
                       runtime=runtime, precision=precision, server=server)


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch_size: int = 32, queue_delay_us: int = 2000,
          instances: int = 1, threads: int | None = None, precision: str = "fp32",
          max_request_mb: float | None = None,
          on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Serve the bundle with Triton (HTTP, gRPC, dynamic batching) until SIGTERM or Ctrl-C.
    Request bodies over ``max_request_mb`` (default: the largest batch as binary tensors +
    1 MiB) are refused unread."""
    from pipeline.serve import ServeOptions
    from pipeline.serve import serve as run_serve

    run_serve(Path(bundle), ServeOptions(host=host, port=port, grpc_port=grpc_port,
                                         metrics_port=metrics_port, max_batch_size=max_batch_size,
                                         queue_delay_us=queue_delay_us, instances=instances,
                                         threads=threads, precision=precision,
                                         max_request_mb=max_request_mb), on_ready=on_ready)


def run(arch: str | None = None, data: str | None = None, *,
        backends: str | Sequence[str] = "torch-cpu,torchscript-cpu,ort-cpu,openvino-cpu,torch-cuda,ort-cuda",
        batch_sizes: str | Sequence[int] = (1, 8), bench_seconds: float = 2.0,
        bench_iterations: int = 100, command: str | None = None, log: Log = stderr_log,
        **options: Any) -> "RunResult":
    """Train, export, quantize (int8 on the training split), verify (gated on the validation
    split), bench and report into one bundle. ``options`` are train's; batch_size defaults to 16."""
    from pipeline.bench import BenchConfig
    from pipeline.train import build_config
    from pipeline.workflow import run_all

    config = build_config({"arch": arch, "data": data, **options}, defaults={"batch_size": 16})
    bench_config = BenchConfig(backends=targets(backends), batch_sizes=int_list(batch_sizes, "--batch-sizes"),
                               iterations=bench_iterations, seconds=bench_seconds,
                               threads=os.cpu_count() or 1)
    return run_all(config, bench_config, command=command or "pipeline.run()", log=log)


def report(latency_files: Sequence[str | Path], *, out: str | Path = ".", budget_ms: float | None = None,
           force: bool = False, command: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Merge latency.json files from several machines into out/report.md and report.png;
    returns the recommendation and any warnings."""
    from pipeline.bundle import ensure_writable_dir
    from pipeline.report import write_comparison

    out = ensure_writable_dir(Path(out))
    files = [Path(p) for p in latency_files]
    command = command or "python -m pipeline report " + " ".join(str(p) for p in files)
    return write_comparison(files, out, budget_ms, command, force=force)


def deploy_triton(bundle: str | Path, out: str | Path, *, name: str | None = None,
                  target: str = "cpu", precision: str | None = None, max_batch_size: int = 64,
                  instances: int = 1) -> dict[str, Any]:
    """Write a Triton model repository (ONNX Runtime backend) for the bundle into ``out``."""
    from pipeline.deploy import TritonOptions, triton_repository

    return triton_repository(Path(bundle), Path(out), TritonOptions(
        name=name, target=target, precision=precision, max_batch_size=max_batch_size,
        instances=instances))
