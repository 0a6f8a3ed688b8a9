"""The Python API: one function per stage, the same stages the CLI runs.

    import pipeline

    result = pipeline.export("resnet18", out="exported/resnet18")
    report = pipeline.verify("exported/resnet18")          # truthy when it passed
    bench = pipeline.bench("exported/resnet18", backends="ort-cpu,torch-export-cpu", batch_sizes=[1])
    print(bench.recommendation.fastest_batch1)
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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from pipeline.core.console import log as stderr_log
from pipeline.core.records import (
    LatencyDoc,
    LatencyRow,
    ModelSection,
    ParityReport,
    QuantizedVariant,
    Recommendation,
    TrainSummary,
    TritonRepository,
    unavailable,
)
from pipeline.errors import InputError
from pipeline.options import (
    DEFAULT_MAX_SLOWDOWN,
    HEADROOM,
    MODEL,
    SCENARIOS,
    SWEEP,
    BenchOptions,
    ExportOptions,
    KubernetesOptions,
    PredictOptions,
    QuantizeOptions,
    RunOptions,
    ScenarioOptions,
    ServeOptions,
    TritonOptions,
    VerifyOptions,
    batch_list,
    check_arrival,
    int_list,
    names,
)
from pipeline.runtimes.registry import get_backend, parse_targets, predict_backends, target_name

if TYPE_CHECKING:  # these modules load numpy: imported inside the calls, off `import pipeline`
    from pipeline.core.capacity import CostTable
    from pipeline.core.records import OfflineRun
    from pipeline.serving.kubernetes import KubernetesDeployment
    from pipeline.serving.serve import Endpoints
    from pipeline.stages.predict import Prediction, StreamSummary
    from pipeline.stages.run import RunResult

Log = Callable[[str], None]


def quiet_log(message: str) -> None:
    """Say nothing (the list-returning ``predict`` is a library call)."""
DEFAULT_BUNDLE_ROOT = Path(MODEL.BUNDLE_ROOT)


# ----------------------------------------------------------------------------- results
# Every stage's result is a ``StageResult`` (pipeline.core.records): ``path`` (what it wrote),
# ``summary`` (one line for a person) and ``record`` (the typed record). verify returns its
# ParityReport and bench --scenario offline its OfflineRun, documents that are results
# themselves; the others are below.
@dataclass
class TrainResult:
    """The trained bundle and ``fit``'s TrainSummary."""

    bundle: Path
    record: TrainSummary

    @property
    def path(self) -> Path:
        return self.bundle

    @property
    def best_val_acc(self) -> float:
        return self.record.best_val_acc

    @property
    def epochs(self) -> int:
        return self.record.epochs

    @property
    def classes(self) -> list[str]:
        return self.record.classes

    @property
    def summary(self) -> str:
        return (f"{self.record.arch}: best validation accuracy {self.best_val_acc:.4f} "
                f"after {self.epochs} epochs, in {self.bundle}")


@dataclass
class ExportResult:
    """The bundle written, its manifest, and verify's report (None with ``verify=False``).
    Truthy when the export verified (or was not asked to). ``record`` is the manifest's model
    section."""

    bundle: Path
    manifest: dict[str, Any]  # manifest.json as written, for reading any section of it
    parity: ParityReport | None
    durations: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.parity is None or bool(self.parity)

    @property
    def path(self) -> Path:
        return self.bundle

    @property
    def record(self) -> ModelSection:
        return ModelSection.of(self.manifest, str(self.bundle / "manifest.json"))

    @property
    def summary(self) -> str:
        verdict = "not verified" if self.parity is None else self.parity.summary
        return f"exported {self.record.arch} to {self.bundle}; {verdict}"


@dataclass
class QuantizeResult:
    """The variants written: ``record`` holds the manifest's quantize entry of each, by
    precision (its file, source, duration, and for int8 the calibration and any repair)."""

    bundle: Path
    record: dict[str, QuantizedVariant]

    @property
    def path(self) -> Path:
        return self.bundle

    @property
    def precisions(self) -> list[str]:
        return list(self.record)

    @property
    def summary(self) -> str:
        return f"wrote {', '.join(f'model.{p}.onnx' for p in self.record)} in {self.bundle}"


@dataclass
class BenchResult:
    """latency.json's document, its recommendation, and warnings about stale results."""

    bundle: Path
    doc: LatencyDoc
    recommendation: Recommendation
    warnings: list[str]

    def __bool__(self) -> bool:
        """False when the regression gate (``baseline``) found a row slower than allowed."""
        return not (self.doc.regression and self.doc.regression.regressed)

    @property
    def rows(self) -> list[LatencyRow]:
        return self.doc.rows

    @property
    def unavailable(self) -> list[LatencyRow]:
        return unavailable(self.rows)

    @property
    def path(self) -> Path:
        return self.bundle / "latency.json"

    @property
    def record(self) -> LatencyDoc:
        return self.doc

    @property
    def summary(self) -> str:
        return self.recommendation.summary


@dataclass
class ReportResult:
    """The comparison's recommendation, its cost table (None without prices or a bound) and
    its warnings; ``path`` is report.md."""

    recommendation: Recommendation
    warnings: list[str]
    path: Path
    costs: "CostTable | None" = None
    files: list[Path] = field(default_factory=list)  # report.md, report.png, report-cost.png

    @property
    def record(self) -> Recommendation:
        return self.recommendation

    @property
    def summary(self) -> str:
        return self.recommendation.summary


@dataclass
class DeployResult:
    """What ``deploy triton`` wrote: ``record`` says where, and what it serves."""

    record: TritonRepository

    @property
    def path(self) -> Path:
        return Path(self.record.repository)

    @property
    def summary(self) -> str:
        return f"wrote {self.record.config} ({self.record.target}, {self.record.onnx})"


def targets(backends: str | Sequence[str] | None,
            precisions: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Backends (and precisions) as ``backend:precision`` targets, from the registry."""
    return tuple(target_name(b, p) for b, p in parse_targets(names(backends), names(precisions)))


# ----------------------------------------------------------------------------- stages
def train(arch: str | None = None, data: str | None = None, *, resume: str | Path | None = None,
          log: Log = stderr_log, **options: Any) -> TrainResult:
    """Train or fine-tune; ``options`` are TrainOptions' fields (epochs, batch_size, lr, out,
    optimizer, schedule, weights, freeze_backbone, input_size, seed, device, ...).

    With ``resume`` (a last.pt), the interrupted run's own options fill in what is not given
    here. Ctrl-C raises KeyboardInterrupt after last.pt holds the last complete epoch.
    """
    from pipeline.stages.train import build_config, fit

    config = build_config({"arch": arch, "data": data, **options},
                          resume=str(resume) if resume else None)
    summary = fit(config, log=log)
    return TrainResult(Path(summary.bundle), summary)


def export(arch: str | None = None, *, out: str | Path | None = None, weights: str = MODEL.weights,
           checkpoint: str | Path | None = None, num_classes: int | None = None,
           class_names: str | Sequence[str] | None = None, input_size: int | None = None,
           seed: int = MODEL.seed, exporter: str = ExportOptions.exporter,
           opset: int = ExportOptions.opset, simplify: bool = ExportOptions.simplify,
           pt2: bool = ExportOptions.pt2, aoti: bool = ExportOptions.aoti, verify: bool = True,
           images: str | Path | None = None, atol: float | None = VerifyOptions.atol,
           rtol: float | None = VerifyOptions.rtol, max_top1_drop: float | None = None,
           min_agreement: float | None = None, verbose: bool = ExportOptions.verbose,
           log: Log = stderr_log) -> ExportResult:
    """Export to ONNX (+ onnxsim), TorchScript and model.pt2 (+ AOTInductor with ``aoti``),
    then verify parity unless ``verify=False``. Returns an ExportResult, truthy when verified."""
    from pipeline.core.console import StageTimer
    from pipeline.models.weights import load_model, parse_class_names
    from pipeline.stages.export import check_options, export_bundle

    options = ExportOptions(exporter=exporter, opset=opset, simplify=simplify, pt2=pt2, aoti=aoti,
                            verbose=verbose)
    check_options(options)
    checks = _verify_options(atol, rtol, max_top1_drop, min_agreement, cuda=True)
    checks.check()
    class_list = parse_class_names(names(class_names))
    timer = StageTimer(log=log)
    with timer.stage("load") as step:
        loaded = load_model(arch, num_classes=num_classes, weights=weights,
                            checkpoint=Path(checkpoint) if checkpoint else None,
                            class_names=class_list, input_size=input_size, seed=seed)
        step["text"] = (f"{loaded.arch}, {loaded.num_classes} classes, "
                        f"{loaded.preprocessing.crop}px, weights {loaded.weights['source']}")
    bundle_dir = Path(out) if out else DEFAULT_BUNDLE_ROOT / loaded.arch
    log(f"exporting {loaded.arch} to {bundle_dir}/")
    bundle = export_bundle(loaded, bundle_dir, options, timer)
    del loaded
    report = None
    if verify:
        from pipeline.stages.verify import verify_bundle

        with timer.stage("verify") as step:
            report = verify_bundle(bundle.root, checks, images=Path(images) if images else None)
            step["text"] = f"{'passed' if report else 'FAILED'} ({len(report.pairs)} comparisons)"
    return ExportResult(bundle.root, bundle.read_manifest(), report, dict(timer.durations))


def _verify_options(atol: float | None, rtol: float | None, max_top1_drop: float | None,
                    min_agreement: float | None, *, cuda: bool,
                    precisions: str | Sequence[str] | None = None,
                    localize: bool = VerifyOptions.localize,
                    accept_inconclusive: bool = VerifyOptions.accept_inconclusive) -> VerifyOptions:
    """None means the default (the CLI passes its own defaults, which are the same)."""
    defaults = VerifyOptions()
    named = tuple(p.strip() for p in (names(precisions) or "").split(",") if p.strip())
    return VerifyOptions(
        atol=atol, rtol=rtol, cuda=cuda, precisions=named, localize=localize,
        accept_inconclusive=accept_inconclusive,
        max_top1_drop=defaults.max_top1_drop if max_top1_drop is None else max_top1_drop,
        min_agreement=defaults.min_agreement if min_agreement is None else min_agreement)


def verify(bundle: str | Path, *, images: str | Path | None = None,
           atol: float | None = VerifyOptions.atol, rtol: float | None = VerifyOptions.rtol,
           max_top1_drop: float | None = None, min_agreement: float | None = None,
           cuda: bool = VerifyOptions.cuda, precisions: str | Sequence[str] | None = None,
           localize: bool = VerifyOptions.localize,
           accept_inconclusive: bool = VerifyOptions.accept_inconclusive,
           junit_xml: str | Path | None = None) -> ParityReport:
    """Hashes, fp32 parity of every artifact against eager PyTorch, and the accuracy gate of
    every reduced-precision variant. The report is truthy when everything that decides the
    exit code passed: fp32 parity, the gates of the variant files (int8, fp16) and of the
    ``precisions`` named here; its ``environment_only`` says a failure came only from what this
    machine lacks. Each gate's ``verdict`` is pass, fail or inconclusive (its confidence
    bounds cannot tell yet; ``images_needed`` says how many images would);
    ``accept_inconclusive`` lets inconclusive gates through (never recommended). ``localize``
    compares every candidate layer by layer (a failed one always is) and puts the first
    divergent layer in ``report.localized``. ``junit_xml`` also writes every pair and gate as a
    JUnit test case there (a changed file, which stops verify before any pair runs, as one
    error case)."""
    from pipeline.errors import CheckFailed
    from pipeline.stages.verify import verify_bundle

    options = _verify_options(atol, rtol, max_top1_drop, min_agreement, cuda=cuda,
                              precisions=precisions, localize=localize,
                              accept_inconclusive=accept_inconclusive)
    started = time.perf_counter()
    try:
        report = verify_bundle(Path(bundle), options, images=Path(images) if images else None)
    except CheckFailed as exc:  # integrity: a file differs from the manifest
        if junit_xml:
            from pipeline.core.checks import integrity_failure, write_junit

            write_junit(junit_xml, "verify", [integrity_failure(str(exc))],
                        seconds=time.perf_counter() - started)
        raise
    if junit_xml:
        _write_checks(junit_xml, "verify", report, time.perf_counter() - started)
    return report


def _write_checks(path: str | Path, suite: str, record: "ParityReport | LatencyDoc",
                  seconds: float, budget_ms: float | None = None) -> None:
    from pipeline.core.checks import latency_checks, parity_checks, write_junit

    checks = (parity_checks(record) if isinstance(record, ParityReport)
              else latency_checks(record, budget_ms))
    write_junit(path, suite, checks, seconds=seconds)


def recheck(parity_json: str | Path, *, atol: float | None = None, rtol: float | None = None,
            max_top1_drop: float | None = None, min_agreement: float | None = None,
            accept_inconclusive: bool | None = None, out: str | Path | None = None,
            junit_xml: str | Path | None = None) -> ParityReport:
    """Judge a saved parity.json again against new limits without running anything (the CLI's
    ``verify --recheck``); a limit left None keeps the file's. Returns the re-judged report
    (truthy when it passes); ``out`` writes it there, never over ``parity_json`` itself.
    Raises InputError when a limit needs figures the file does not store."""
    from pipeline.stages.verify import recheck as run_recheck

    source = Path(parity_json)
    if out is not None and Path(out).resolve() == source.resolve():
        raise InputError(f"--out {str(out)!r} is the file being rechecked; --recheck never "
                         f"rewrites it: give another path")
    report = run_recheck(source, atol=atol, rtol=rtol, max_top1_drop=max_top1_drop,
                         min_agreement=min_agreement, accept_inconclusive=accept_inconclusive)
    if out is not None:
        report.dump(Path(out))
    if junit_xml:
        _write_checks(junit_xml, "verify", report, 0.0)
    return report


def quantize(bundle: str | Path, *, precisions: str | Sequence[str] = QuantizeOptions.precisions,
             calibration: str | Path | None = QuantizeOptions.calibration,
             count: int = QuantizeOptions.count, method: str = QuantizeOptions.method,
             seed: int = QuantizeOptions.seed, reduce_range: bool | None = QuantizeOptions.reduce_range,
             repair: bool = QuantizeOptions.repair,
             repair_images: str | Path | None = QuantizeOptions.repair_images,
             log: Log = stderr_log) -> QuantizeResult:
    """Write model.int8.onnx / model.fp16.onnx; returns the manifest's quantize record.
    ``repair`` repairs an int8 model that falls short of the gate's agreement limit on the
    repair images (``repair_images``, else the calibration images): cross-layer equalization,
    then the layers with the largest error share kept in float; the record's ``repair`` says
    what was done."""
    from pipeline.stages.quantize import quantize_bundle

    wanted = tuple(p.strip() for p in (names(precisions) or "").split(",") if p.strip())
    options = QuantizeOptions(precisions=wanted, calibration=str(calibration) if calibration else None,
                              count=count, method=method, seed=seed, reduce_range=reduce_range,
                              repair=repair,
                              repair_images=str(repair_images) if repair_images else None)
    return QuantizeResult(Path(bundle), quantize_bundle(Path(bundle), options, log=log))


_BENCH = BenchOptions()
_SCENARIO = ScenarioOptions()


def bench(bundle: str | Path, *, backends: str | Sequence[str] | None = None,
          precisions: str | Sequence[str] | None = None,
          batch_sizes: str | Sequence[int] = SWEEP,
          iterations: int = _BENCH.iterations, seconds: float = _BENCH.seconds,
          warmup_seconds: float = _BENCH.warmup_s, threads: int | None = None,
          images: str | Path | None = None, budget_ms: float | None = None,
          progress: bool = False, command: str | None = None, scenario: str = SCENARIOS[0],
          concurrency: str | Sequence[int] = _SCENARIO.concurrency,
          arrival: str = _SCENARIO.arrival, p99_ms: float | None = None,
          poisson_trials: int = _SCENARIO.poisson_trials, fast_decode: bool = False,
          baseline: str | Path | None = None, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
          baseline_rerun: str | Path | None = None, force: bool = False,
          junit_xml: str | Path | None = None, machine: str | None = None,
          verify_capacity: bool = False,
          log: Log = stderr_log) -> "BenchResult | OfflineRun":
    """Time every backend (each in its own process); writes latency.json, report.md and
    latency.png into the bundle. ``command`` is recorded as what made the numbers.

    ``scenario="server"`` serves the bundle with Triton instead and drives it with each
    ``concurrency`` of loopback clients for ``seconds``, beside fresh in-process ORT baselines
    (batch 1 and the batching ceiling), each level broken down by stage from the server's
    metrics; ``arrival="poisson"`` then searches the highest Poisson request rate whose p99 is
    within ``p99_ms`` (MLPerf LoadGen, at most ``poisson_trials`` runs). The results go into
    latency.json's ``server`` section; ``verify_capacity`` then runs Poisson arrivals at 0.9x
    the capacity found (a miss lowers the capacity to its rate, at most 3 runs) and records
    each check.

    ``machine`` labels the machine in latency.json (default: the hostname): ``report`` groups
    rows and looks up ``--price`` by it.

    ``scenario="offline"`` is ``bench_offline`` on the folder ``images`` (returns its
    OfflineRun): ``backends`` names at most one target predict can run (default: what
    ``precision="auto"`` picks), and one batch size in ``batch_sizes`` sets its batch.

    ``baseline`` (an earlier latency.json) turns on the regression gate: each row against the
    baseline's row for the same target and batch on the same machine fingerprint, regressed
    when slower than ``max_slowdown`` allows and significantly so over the stability windows
    (one-sided Mann-Whitney U). ``baseline_rerun`` (a bundle or an .onnx) re-measures the
    baseline model in this run instead, alternating windows of the two. The result is falsy
    when a row regressed; ``junit_xml`` writes every row (and regression) as a test case."""
    from pipeline.core.bundle import Bundle
    from pipeline.core.machine import check_label

    if scenario not in SCENARIOS:
        raise InputError(f"unknown --scenario {scenario!r}; choose from: {', '.join(SCENARIOS)}")
    check_arrival(scenario, arrival, p99_ms)
    if machine is not None:
        check_label(machine)
    if verify_capacity and scenario != "server":
        raise InputError("--verify-capacity re-runs a Poisson search's capacity: add --scenario "
                         "server --arrival poisson --p99-ms BOUND")
    if machine is not None and scenario == "offline":
        raise InputError("--machine labels latency.json for report; the offline scenario writes "
                         "offline.json: leave --machine out")
    if scenario != SCENARIOS[0] and (baseline or baseline_rerun or junit_xml):
        raise InputError("--baseline, --baseline-rerun and --junit-xml judge the single-stream "
                         "rows: leave --scenario out")
    if scenario == "offline":
        if images is None:
            raise InputError("--scenario offline needs --images DIR: the folder to classify")
        target = _offline_target(backends, precisions)
        sizes = batch_list(batch_sizes)  # () for the sweep: predict's default batch
        return bench_offline(bundle, images, **target,
                             batch_size=sizes[0] if len(sizes) == 1 else _PREDICT.batch,
                             threads=threads, fast_decode=fast_decode, seconds=seconds, log=log)
    if scenario == "server":
        from pipeline.stages.bench.server import server_bench
        from pipeline.stages.bench.writeup import stale_parity_warnings

        target = Bundle.open(Path(bundle))
        doc, advice = server_bench(
            target, ScenarioOptions(concurrency=int_list(concurrency, "--concurrency"),
                                    seconds=seconds, warmup_s=max(warmup_seconds, 1.0),
                                    threads=threads, arrival=arrival, p99_ms=p99_ms,
                                    poisson_trials=poisson_trials, verify_capacity=verify_capacity),
            iterations=iterations, warmup_seconds=warmup_seconds, budget_ms=budget_ms,
            progress=progress, command=command or f"pipeline.bench({str(bundle)!r}, scenario='server')",
            log=log, label=machine)
        return BenchResult(target.root, doc, advice, stale_parity_warnings(target))
    from pipeline.data.images import find_images
    from pipeline.stages.bench.protocol import run_bench
    from pipeline.stages.bench.writeup import save_bench, stale_parity_warnings

    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads} must be at least 1")
    if max_slowdown < 0:
        raise InputError(f"--max-slowdown {max_slowdown:g} must be >= 0 (0.10 allows 10% slower)")
    config = BenchOptions(backends=targets(backends, precisions),
                          batch_sizes=batch_list(batch_sizes),
                          iterations=iterations, seconds=seconds, warmup_s=warmup_seconds,
                          **({"threads": threads} if threads else {}))
    config.check()
    target = Bundle.open(Path(bundle))
    files = [str(p) for p in find_images([Path(images)])] if images else None
    started = time.perf_counter()
    gate = None
    if baseline is not None or baseline_rerun is not None:  # a bad baseline refused before timing
        from pipeline.stages.bench.regression import Gate

        gate = Gate.open(target, baseline, baseline_rerun, max_slowdown, force=force)
    doc = run_bench(target.root, config, images=files, progress=progress, label=machine)
    doc.command = command or f"pipeline.bench({str(bundle)!r})"
    if gate is not None:
        log("regression gate: " + ("re-measuring the baseline model, alternating windows"
                                   if gate.rerun else f"against {gate.baseline_path}"))
        doc.regression = gate.judge(doc, config)
    advice = save_bench(doc, target.root, budget_ms, started=started)
    if junit_xml:
        _write_checks(junit_xml, "bench", doc, time.perf_counter() - started, budget_ms)
    return BenchResult(target.root, doc, advice, stale_parity_warnings(target))


def _offline_target(backends: str | Sequence[str] | None,
                    precisions: str | Sequence[str] | None) -> dict[str, Any]:
    """The one target the offline scenario runs, as predict's precision, runtime and provider
    (none named: what predict's ``precision="auto"`` picks)."""
    if not backends:
        return {"precision": "auto", "runtime": None, "provider": "cpu"}
    chosen = parse_targets(names(backends), names(precisions))
    runnable = [b.name for b in predict_backends()]
    if len(chosen) != 1 or chosen[0][0] not in runnable:
        raise InputError(f"--scenario offline runs one target of {', '.join(runnable)} "
                         f"(e.g. ort-cpu:int8), not {names(backends)!r}; or leave --backends out "
                         f"to run what predict --precision auto picks")
    name, precision = chosen[0]
    backend = get_backend(name)
    return {"precision": precision, "runtime": backend.runtime,
            "provider": backend.provider or backend.device}


def bench_offline(bundle: str | Path, images: str | Path, *, precision: str = "auto",
                  runtime: str | None = None, provider: str = "cpu",
                  batch_size: int = PredictOptions.batch, workers: int | None = None,
                  threads: int | None = None, fast_decode: bool = False,
                  seconds: float = _BENCH.seconds, log: Log = stderr_log) -> "OfflineRun":
    """MLPerf's offline scenario on a folder of image files: end-to-end images/s through
    predict's streaming engine, beside the decode-only and inference-only ceilings on the same
    cores and the bound they set; writes offline.json into the bundle."""
    from pipeline.stages.bench.offline import offline_bench

    options = PredictOptions(precision=precision, runtime=runtime, provider=provider,
                             batch=batch_size, workers=workers, threads=threads,
                             fast_decode=fast_decode)
    return offline_bench(Path(bundle), Path(images), options, seconds=seconds, log=log)


def _predict_options(top_k: int, provider: str, runtime: str | None, precision: str,
                     batch_size: int, workers: int | None, threads: int | None,
                     max_wait_ms: float, fast_decode: bool, output: str | Path | None = None,
                     resume: bool = False) -> PredictOptions:
    return PredictOptions(top_k=top_k, provider=provider, runtime=runtime, precision=precision,
                          batch=batch_size, workers=workers, threads=threads,
                          max_wait_ms=max_wait_ms, fast_decode=fast_decode,
                          output=str(output) if output is not None else None, resume=resume)


_PREDICT = PredictOptions()


def predict(model: str | Path, images: str | Path | Sequence[str | Path], *,
            top_k: int = _PREDICT.top_k, provider: str = _PREDICT.provider,
            runtime: str | None = _PREDICT.runtime, precision: str = _PREDICT.precision,
            batch_size: int = _PREDICT.batch, workers: int | None = _PREDICT.workers,
            threads: int | None = _PREDICT.threads, max_wait_ms: float = _PREDICT.max_wait_ms,
            fast_decode: bool = _PREDICT.fast_decode, server: str | None = None,
            log: Log = quiet_log) -> list["Prediction"]:
    """Classify image files or folders with a bundle, a bare .onnx or a model.pt2, or through
    the Triton server at ``server`` (a URL) that serves the bundle; returns every Prediction
    in input order. A file that cannot be read is a Prediction with ``error`` set; the others
    are still classified. ``precision="auto"`` runs the fastest gated variant here (else
    fp32). For a folder of any size, ``classify`` streams to a file instead of a list."""
    from pipeline.stages.predict import predict as run_predict

    items = [images] if isinstance(images, (str, Path)) else list(images)
    options = _predict_options(top_k, provider, runtime, precision, batch_size, workers, threads,
                               max_wait_ms, fast_decode)
    return run_predict(Path(model), [Path(p) for p in items], options, server=server, log=log)


def classify(model: str | Path, images: str | Path | Sequence[str | Path], *,
             output: str | Path | None = None, resume: bool = False,
             top_k: int = _PREDICT.top_k, provider: str = _PREDICT.provider,
             runtime: str | None = _PREDICT.runtime, precision: str = _PREDICT.precision,
             batch_size: int = _PREDICT.batch, workers: int | None = _PREDICT.workers,
             threads: int | None = _PREDICT.threads, max_wait_ms: float = _PREDICT.max_wait_ms,
             fast_decode: bool = _PREDICT.fast_decode, server: str | None = None,
             emit: Callable[["Prediction"], None] | None = None, log: Log = stderr_log,
             progress: bool | None = None, ray: str | bool | None = None) -> "StreamSummary":
    """Classify a folder of any size at the machine's limit: decode in worker processes,
    batch, infer, and append each prediction to ``output`` (.jsonl or .csv) and/or hand it to
    ``emit``, in input order, with memory bounded. ``resume`` skips files already in
    ``output``. Returns counts, seconds and images/s (``.summary``)."""
    items = [images] if isinstance(images, (str, Path)) else list(images)
    options = _predict_options(top_k, provider, runtime, precision, batch_size, workers, threads,
                               max_wait_ms, fast_decode, output, resume)
    if ray:
        from pipeline.stages.scale_out import classify_on_ray

        return classify_on_ray(Path(model), [Path(p) for p in items], options,
                               address=ray if isinstance(ray, str) else None, emit=emit, log=log)
    from pipeline.stages.predict import write_predictions

    return write_predictions(Path(model), [Path(p) for p in items], options, server=server,
                             emit=emit, log=log, progress=progress)


_SERVE = ServeOptions()


def serve(bundle: str | Path, *, host: str = _SERVE.host, port: int = _SERVE.port,
          grpc_port: int = _SERVE.grpc_port, metrics_port: int = _SERVE.metrics_port,
          max_batch_size: int = _SERVE.max_batch_size, queue_delay_us: int = _SERVE.queue_delay_us,
          instances: int = _SERVE.instances, threads: int | None = _SERVE.threads,
          precision: str = _SERVE.precision, max_request_mb: float | None = _SERVE.max_request_mb,
          on_ready: Callable[["Endpoints"], None] | None = None) -> None:
    """Serve the bundle with Triton (HTTP, gRPC, dynamic batching) until SIGTERM or Ctrl-C.
    Request bodies over ``max_request_mb`` (default: the largest batch as binary tensors +
    1 MiB) are refused unread. ``on_ready`` receives the ``Endpoints`` once the model is ready."""
    from pipeline.serving.serve import serve as run_serve

    run_serve(Path(bundle), ServeOptions(host=host, port=port, grpc_port=grpc_port,
                                         metrics_port=metrics_port, max_batch_size=max_batch_size,
                                         queue_delay_us=queue_delay_us, instances=instances,
                                         threads=threads, precision=precision,
                                         max_request_mb=max_request_mb), on_ready=on_ready)


_RUN = RunOptions()


def run(arch: str | None = None, data: str | None = None, *,
        backends: str | Sequence[str] = _RUN.backends, batch_sizes: str | Sequence[int] = _RUN.batch_sizes,
        bench_seconds: float = _RUN.bench_seconds, bench_iterations: int = _RUN.bench_iterations,
        command: str | None = None, log: Log = stderr_log, **options: Any) -> "RunResult":
    """Train, export, quantize (int8 on the training split), verify (gated on the validation
    split), bench and report into one bundle. ``options`` are train's; batch_size defaults to
    16 and epochs to 8 (``RunOptions``)."""
    from pipeline.stages.run import run_all
    from pipeline.stages.train import build_config

    config = build_config({"arch": arch, "data": data, **options},
                          defaults={"batch_size": _RUN.batch_size, "epochs": _RUN.epochs})
    bench_config = BenchOptions(backends=targets(backends),
                                batch_sizes=int_list(batch_sizes, "--batch-sizes"),
                                iterations=bench_iterations, seconds=bench_seconds)
    bench_config.check()
    return run_all(config, bench_config, command=command or "pipeline.run()", log=log)


def report(latency_files: Sequence[str | Path], *, out: str | Path = ".", budget_ms: float | None = None,
           force: bool = False, prices: Mapping[str, float] | Sequence[str] | None = None,
           prices_file: str | Path | None = None, p99_ms: float | None = None,
           target_rate: str | None = None, headroom: float = HEADROOM,
           command: str | None = None) -> ReportResult:
    """Merge latency.json files from several machines into out/report.md and report.png;
    returns the recommendation, the cost table and any warnings.

    Rows are grouped by machine label (``bench --machine``); two different machines under one
    label are refused unless ``force``. ``prices`` (label -> US dollars per hour, or
    ``"LABEL=USD"`` strings) and ``prices_file`` (TOML) add each verified configuration's cost
    per million images; ``p99_ms`` its capacity and cost within that p99 bound;
    ``target_rate`` (``"400 images/s"`` or ``"400 requests/s"``) the replicas needed and the
    fleet's cost per hour, at ``headroom`` (0.8) of each replica's capacity. The cheapest
    configuration within the bound and the fastest are ``result.costs.cheapest`` and
    ``.fastest``; report-cost.png plots cost against p99 with the Pareto front."""
    from pipeline.core.bundle import ensure_writable_dir
    from pipeline.core.capacity import Rate
    from pipeline.stages.report import write_comparison

    files = [Path(p) for p in latency_files]
    if p99_ms is not None and not p99_ms > 0:
        raise InputError(f"--p99-ms {p99_ms:g} must be more than 0")
    rate = Rate.parse(target_rate) if target_rate is not None else None
    if prices is not None and not isinstance(prices, Mapping):
        given = [prices] if isinstance(prices, str) else list(prices)
    else:
        given = [f"{label}={usd}" for label, usd in (prices or {}).items()]
    out = ensure_writable_dir(Path(out))
    command = command or "python -m pipeline report " + " ".join(str(p) for p in files)
    made = write_comparison(files, out, budget_ms, command, force=force, prices=given,
                            prices_file=Path(prices_file) if prices_file else None,
                            p99_ms=p99_ms, target_rate=rate, headroom=headroom)
    return ReportResult(made.advice, made.warnings, out / "report.md", made.costs, made.files)


_TRITON = TritonOptions()
_KUBERNETES = KubernetesOptions()


def deploy_triton(bundle: str | Path, out: str | Path, *, name: str | None = _TRITON.name,
                  target: str = _TRITON.target, precision: str | None = _TRITON.precision,
                  max_batch_size: int = _TRITON.max_batch_size,
                  instances: int = _TRITON.instances,
                  threads: int | None = _TRITON.threads) -> DeployResult:
    """Write a Triton model repository (ONNX Runtime backend) for the bundle into ``out``;
    ``threads`` sets ONNX Runtime's intra-op threads per instance."""
    from pipeline.serving.repository import triton_repository

    return DeployResult(triton_repository(Path(bundle), Path(out), TritonOptions(
        name=name, target=target, precision=precision, max_batch_size=max_batch_size,
        instances=instances, threads=threads)))


def deploy_kubernetes(bundle: str | Path, out: str | Path, *, name: str | None = _TRITON.name,
                      target: str = _TRITON.target, precision: str | None = _TRITON.precision,
                      latency: str | Path | None = None, replicas: int | None = None,
                      target_rate: str | None = None, p99_ms: float | None = None,
                      headroom: float = _KUBERNETES.headroom, max_replicas: int | None = None,
                      kserve: bool = False, model_image: str | None = None,
                      storage_uri: str | None = None,
                      namespace: str | None = None) -> "KubernetesDeployment":
    """Write Triton for Kubernetes into ``out``: the model repository, a Dockerfile for the
    image that carries it, and a Deployment + Service + HorizontalPodAutoscaler (or, with
    ``kserve``, a KServe InferenceService), the pods sized from ``latency`` (the bundle's
    latency.json by default): CPU from the threads, memory from the measured peak. The count
    is ``replicas``, or sized for ``target_rate`` within ``p99_ms`` as ``report`` sizes it.
    The result is the typed record itself (a StageResult: ``path``, ``summary``, ``record``)."""
    from pipeline.serving.kubernetes import kubernetes_deployment

    options = KubernetesOptions(
        triton=TritonOptions(name=name, target=target, precision=precision),
        latency=str(latency) if latency is not None else None, replicas=replicas,
        target_rate=target_rate, p99_ms=p99_ms, headroom=headroom, max_replicas=max_replicas,
        kserve=kserve, model_image=model_image, storage_uri=storage_uri, namespace=namespace)
    return kubernetes_deployment(Path(bundle), Path(out), options)
