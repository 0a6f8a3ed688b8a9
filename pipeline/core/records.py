"""The documents stages write and read: typed records with one schema version per document.

Stages talk through files in the bundle, never through Python objects held across commands.
Each file is read and written through a record here (as Polygraphy's ``RunResults`` encode and
decode themselves), so a renamed or unknown key fails at load time, naming the file and the
key, with exit 2 and the command that writes a fresh one.

    latency.json      LatencyDoc: LatencyRow per (backend, precision, batch); ServerSection
    parity.json       ParityReport: PairResult per (candidate, input); GateResult per variant
    calibration.json  CalibrationRecord: where int8's calibration images came from
    manifest.json     read by ``pipeline.core.bundle``; its ``model`` section is ModelSection
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Protocol, TypeVar, runtime_checkable

from pipeline.core.bundle import PARITY, write_json_atomic
from pipeline.errors import InputError

LATENCY_SCHEMA_VERSION = 4  # 2: rows without the stability windows (stable, window_spread);
# 3: no machine label, no peak memory per row, no --verify-capacity run
LATENCY_KIND = "pipeline.latency"
PARITY_SCHEMA_VERSION = 3  # 1: no schema_version yet; 2: no "localized", no "machine"
CALIBRATION_SCHEMA_VERSION = 1
OFFLINE_SCHEMA_VERSION = 2  # 1: no machine label

R = TypeVar("R", bound="Record")


def target_name(backend: str, precision: str) -> str:
    """A (backend, precision) pair as the command line and the reports write it."""
    return f"{backend}:{precision}"


def precision_label(ran: str | None, asked: str | None) -> str:
    """``bf16``, or for a precision chosen at run time, ``auto=bf16``: what was asked and what
    ran (a row or a recommendation written before the precision was recorded ran fp32)."""
    ran, asked = ran or "fp32", asked or "fp32"
    return ran if ran == asked else f"{asked}={ran}"


def split_target(target: str) -> tuple[str, str]:
    """``ort-cpu:int8`` -> (ort-cpu, int8); a bare backend name means fp32."""
    backend, _, precision = target.partition(":")
    return backend, precision or "fp32"


# ----------------------------------------------------------------------------- the base
@dataclass
class Record:
    """A dataclass that encodes to and decodes from a JSON object, strictly.

    ``OPTIONAL`` fields may be absent from a file (and are left out when None); every other
    field must be present, and a key the record does not declare is an error. ``NESTED`` maps
    a field to the record type of its value (or of each item, for a list).
    """

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    NESTED: ClassVar[dict[str, type["Record"]]] = {}
    WRITE_NONE: ClassVar[bool] = False  # True: optional fields are written even when None

    @classmethod
    def from_dict(cls: type[R], data: Any, *, where: str) -> R:
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected an object, found {type(data).__name__}")
        names = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (this version reads: "
                             f"{', '.join(names)})")
        missing = [n for n in names if n not in data and n not in cls.OPTIONAL]
        if missing:
            raise InputError(f"{where}: missing key {missing[0]!r}")
        values = {}
        for name in names:
            if name not in data:
                continue
            value, nested = data[name], cls.NESTED.get(name)
            if nested is not None and isinstance(value, list):
                value = [nested.from_dict(item, where=f"{where}.{name}[{index}]")
                         for index, item in enumerate(value)]
            elif nested is not None and value is not None:
                value = nested.from_dict(value, where=f"{where}.{name}")
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.OPTIONAL and value is None and not self.WRITE_NONE:
                continue
            if isinstance(value, Record):
                value = value.to_dict()
            elif isinstance(value, list):
                value = [item.to_dict() if isinstance(item, Record) else item for item in value]
            elif isinstance(value, dict):
                value = {key: item.to_dict() if isinstance(item, Record) else item
                         for key, item in value.items()}
            out[f.name] = value
        return out


def read_json(path: Path, *, remake: str) -> Any:
    """A JSON file's content; a missing or unreadable file is exit 2 naming how to remake it."""
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; make it with {remake}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc}); make a new one with "
                         f"{remake}") from None


def check_version(data: dict[str, Any], path: Path, version: int, remake: str) -> None:
    found = data.get("schema_version")
    if found != version:
        raise InputError(f"{str(path)!r} has schema_version {found!r}; this pipeline reads "
                         f"{version}. Make a new one with {remake}")


@dataclass
class Document(Record):
    """A record that is a file of its own (latency.json, parity.json, calibration.json,
    offline.json): ``load`` reads it strictly, upgrading what older versions wrote, and names
    the command that remakes it when it cannot; ``dump`` writes it atomically. A loaded or
    dumped document knows its ``path``; with ``summary`` and ``record`` (itself) it is a
    ``StageResult``."""

    FILE: ClassVar[str] = "file"  # its name in messages: latency.json ...
    REMAKE: ClassVar[str] = "python -m pipeline"
    VERSION: ClassVar[int | None] = None  # the schema_version this code reads; None: not checked

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: Path) -> dict[str, Any]:
        """What an earlier version wrote, in this version's shape (or an error naming why not)."""
        return data

    @classmethod
    def load(cls: type[D], path: Path | str) -> D:
        path = Path(path)
        data = read_json(path, remake=cls.REMAKE)
        if not isinstance(data, dict):
            raise InputError(f"{str(path)!r} is not a {cls.FILE} written by {cls.REMAKE}")
        data = cls.upgrade(data, path)
        if cls.VERSION is not None:
            check_version(data, path, cls.VERSION, cls.REMAKE)
        document = cls.from_dict(data, where=str(path))
        document._path = path
        return document

    def dump(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())
        self._path = path

    @property
    def path(self) -> Path | None:
        """Where it was read from or last written (None for one only built in memory)."""
        return getattr(self, "_path", None)

    @property
    def record(self: D) -> D:
        return self


D = TypeVar("D", bound=Document)


@runtime_checkable
class StageResult(Protocol):
    """The one shape of every stage's result, in the API and between stages: what it wrote
    (``path``), one line for a person (``summary``) and the typed record itself (``record``)."""

    @property
    def path(self) -> Path | None: ...

    @property
    def summary(self) -> str: ...

    @property
    def record(self) -> Any: ...


# ----------------------------------------------------------------------------- machine facts
@dataclass
class GpuFacts(Record):
    """The first CUDA device as torch saw it."""

    name: str
    memory_gib: float | None = None
    capability: str | None = None
    driver: str | None = None
    cuda_runtime: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Hardware:
    """What must agree for two files to come from one kind of machine: the CPU model, its
    flags, the core count, the GPU."""

    cpu: str
    cpu_flags: list[str]
    cpu_count: int | None
    gpu: str | None

    def describe(self, threads: int) -> str:
        gpu = f", {self.gpu}" if self.gpu else ""
        return f"{self.cpu}, {self.cpu_count} cores, {threads} threads{gpu}"


@dataclass
class Machine(Record):
    """The machine a latency.json (or offline.json) was measured on. ``label`` is the user's
    name for it (``bench --machine c7i.large``; the hostname by default): report groups rows
    and looks up prices by it. Files written before the label existed read as their hostname."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"label", "platform", "gpu", "versions"})
    NESTED: ClassVar[dict[str, type[Record]]] = {"gpu": GpuFacts}
    WRITE_NONE: ClassVar[bool] = True

    hostname: str = "?"
    cpu: str = "?"
    cpu_flags: dict[str, bool] = field(default_factory=dict)
    cpu_count: int | None = None
    platform: str | None = None
    gpu: GpuFacts | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        """The label, or the hostname for files from before ``--machine``."""
        return self.label or self.hostname

    @property
    def flags(self) -> list[str]:
        return sorted(flag for flag, present in self.cpu_flags.items() if present)

    @property
    def description(self) -> str:
        """'AMD EPYC, 2 cores + NVIDIA H200': what the machine is, without its label."""
        text = f"{self.cpu}, {self.cpu_count or '?'} cores"
        return f"{text} + {self.gpu.name}" if self.gpu else text

    @property
    def hardware(self) -> "Hardware":
        return Hardware(self.cpu, list(self.flags), self.cpu_count,
                        self.gpu.name if self.gpu else None)

    def same_hardware(self, other: "Machine") -> bool:
        return self.hardware == other.hardware


# ----------------------------------------------------------------------------- latency.json
@dataclass
class BenchedModel(Record):
    """latency.json's ``model``: what was timed."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"num_classes", "gmacs_per_image", "onnx_file"})

    arch: str
    input_size: int
    num_classes: int | None = None
    gmacs_per_image: float | None = None
    onnx_file: str | None = None


@dataclass
class BenchConfig(Record):
    """latency.json's ``config``: how it was timed (``options.BenchOptions``, as run)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"max_batch", "sweep", "min_warmup_iterations"})

    threads: int
    backends: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    iterations: int = 75
    seconds: float = 5.0
    warmup_s: float = 1.0
    max_batch: int | None = None
    sweep: bool | None = None
    min_warmup_iterations: int | None = None


@dataclass
class LatencyRow(Record):
    """One (backend, precision, batch) of a single-stream sweep: numbers, or a reason."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"machine", "arch", "stable", "window_spread",
                                                     "windows_per_s", "peak_rss_mib"})

    backend: str
    batch: int
    precision: str | None = None  # what really ran (OpenVINO's auto reads back its choice)
    precision_requested: str | None = None
    status: str = "ok"  # ok | unavailable | error
    reason: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    device: str | None = None
    provider: str | None = None
    threads: int | None = None
    io: str | None = None
    cold_create_ms: float | None = None
    cold_first_infer_ms: float | None = None
    warmup_iterations: int | None = None
    n: int | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    p99_note: str | None = None
    max_ms: float | None = None
    ms_per_image: float | None = None
    images_per_s: float | None = None
    gflops: float | None = None
    # Stability windows (Model Navigator's rule): the images/s of the last three windows of 25
    # calls agree within 10% (stable), or not after the time allowed; their spread, max-min
    # over median.
    stable: bool | None = None
    window_spread: float | None = None
    # images/s of every complete window of 25 timed calls, in order: what the regression gate
    # (bench --baseline) tests against another run's windows.
    windows_per_s: list[float] | None = None
    # The peak resident memory of the worker process that timed this target, read after this
    # batch size (so every batch size it ran before too, with the interpreter and the runtime):
    # what a pod serving it at batches up to this one needs.
    peak_rss_mib: float | None = None
    # What verify said of the very file this row timed (see stages.bench.recommend).
    verified: str = "not verified"
    top1_agreement: float | None = None
    top1_drop_points: float | None = None
    # Set only when rows of several machines share one table (report's comparison).
    machine: str | None = None
    arch: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def requested(self) -> str:
        """The precision asked for (fp32 for rows written before it was recorded)."""
        return self.precision_requested or self.precision or "fp32"

    @property
    def target(self) -> str:
        return target_name(self.backend, self.requested)

    @property
    def precision_label(self) -> str:
        return precision_label(self.precision, self.precision_requested)

    @property
    def recommendable(self) -> bool:
        """May this row be recommended (or ranked by cost)? fp32 unless its parity failed or
        verify never ran its backend here; reduced precision only with a passed accuracy gate."""
        if self.requested == "fp32":
            return self.verified not in ("parity failed", NOT_ON_THIS_MACHINE)
        return self.verified == "gate passed"


NOT_ON_THIS_MACHINE = "not verified on this machine"


def reason_rows(backend: str, precision: str, batch_sizes: tuple[int, ...], reason: str,
                status: str = "unavailable") -> list[LatencyRow]:
    """Rows that say why a target has no numbers, one per batch size."""
    return [LatencyRow(backend, batch, precision=precision, precision_requested=precision,
                       status=status, reason=reason) for batch in batch_sizes]


def ok_rows(rows: list[LatencyRow]) -> list[LatencyRow]:
    return [row for row in rows if row.ok]


def unavailable(rows: list[LatencyRow]) -> list[LatencyRow]:
    return [row for row in rows if not row.ok]


def by_reason(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(name, why it did not run) pairs grouped by the reason, names in order, each once."""
    grouped: dict[str, list[str]] = {}
    for name, reason in items:
        names = grouped.setdefault(reason or "no reason given", [])
        if name not in names:
            names.append(name)
    return grouped


def not_run_lines(rows: list[LatencyRow]) -> list[str]:
    """The targets that could not run here, one line per reason ("no CUDA GPU ...: 7 targets
    not run: ..."), so that a CPU machine's report is not a wall of identical reason rows.
    latency.json keeps every row; rows that ran and failed are not summarised here."""
    grouped = by_reason((row.target, row.reason or "") for row in rows
                        if row.status == "unavailable")
    return [f"{reason}: {len(targets)} target{'s' if len(targets) != 1 else ''} not run "
            f"({', '.join(targets)})" for reason, targets in grouped.items()]


@dataclass(kw_only=True)
class Advice(Record):
    """A row as a recommendation quotes it: what ran, how fast, and what verify said of it."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(  # absent from files of earlier versions
        {"machine", "precision_requested", "device", "p90_ms", "images_per_s", "stable",
         "verified", "top1_agreement", "top1_drop_points"})
    WRITE_NONE: ClassVar[bool] = True

    machine: str | None = None  # set in a comparison across machines
    backend: str
    precision: str | None
    precision_requested: str | None = None
    device: str | None = None
    batch: int
    p50_ms: float
    p90_ms: float | None = None
    images_per_s: float | None = None
    stable: bool | None = None
    verified: str | None = None
    top1_agreement: float | None = None
    top1_drop_points: float | None = None

    @classmethod
    def of(cls, row: LatencyRow) -> "Advice":
        return cls(machine=row.machine, backend=row.backend, precision=row.precision,
                   precision_requested=row.precision_requested, device=row.device,
                   batch=row.batch, p50_ms=row.p50_ms, p90_ms=row.p90_ms,
                   images_per_s=row.images_per_s, stable=row.stable, verified=row.verified,
                   top1_agreement=row.top1_agreement, top1_drop_points=row.top1_drop_points)

    @property
    def name(self) -> str:
        """``backend precision`` (``auto=bf16`` when what ran differs from what was asked)."""
        return f"{self.backend} {precision_label(self.precision, self.precision_requested)}"


@dataclass
class Recommendation(Record):
    """bench's and report's answer: the fastest verified model at batch 1 and at any batch,
    its speed-up over fp32, who meets a p90 budget, where a GPU overtakes the CPU, and which
    targets were never eligible (see ``pipeline.stages.recommend``)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"fastest_fp32_batch1", "best_throughput", "speedup_vs_fp32", "budget_ms",
         "meets_budget", "gpu_overtakes_cpu_at_batch", "gpu_vs_cpu", "not_verified"})
    NESTED: ClassVar[dict[str, type[Record]]] = {
        "fastest_batch1": Advice, "fastest_fp32_batch1": Advice, "best_throughput": Advice,
        "meets_budget": Advice}
    WRITE_NONE: ClassVar[bool] = True

    fastest_batch1: Advice | None = None
    fastest_fp32_batch1: Advice | None = None
    best_throughput: Advice | None = None
    speedup_vs_fp32: float | None = None
    budget_ms: float | None = None
    meets_budget: list[Advice] | None = None  # None: no budget was given
    gpu_overtakes_cpu_at_batch: int | None = None
    gpu_vs_cpu: dict[str, float] | str | None = None  # batch -> GPU/CPU images/s, or why not
    not_verified: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        best = self.fastest_batch1
        if best is None:
            return "no verified backend produced numbers"
        where = f" on {best.machine}" if best.machine else ""
        return f"fastest verified at batch 1: {best.name}{where} (p50 {best.p50_ms:.2f} ms)"


@dataclass
class StageBreakdown(Record):
    """Where a served request's time goes: per-request means over one load level, in ms, from
    the server's counters (``pipeline.stages.bench.breakdown`` says how each is measured).
    The stages add up to ``total_ms``, the clients' mean."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"mean_batch", "total_ms", "client_ms", "front_ms", "triton_http_ms", "handoff_ms",
         "batching_ms", "model_ms", "triton_p50_ms", "triton_p99_ms"})

    requests: int
    queue_ms: float
    compute_input_ms: float
    compute_output_ms: float
    triton_other_ms: float
    triton_request_ms: float
    mean_batch: float | None = None
    total_ms: float | None = None
    client_ms: float | None = None
    front_ms: float | None = None
    triton_http_ms: float | None = None
    handoff_ms: float | None = None
    batching_ms: float | None = None
    model_ms: float | None = None
    triton_p50_ms: float | None = None  # Triton's own summary (a sliding window) at the level's end
    triton_p99_ms: float | None = None

    def stages(self) -> list[tuple[str, float | None, str]]:
        """(stage, mean ms, where it is measured), outermost first: they add up to total_ms."""
        return [("client", self.client_ms, "client library + loopback: client mean - front"),
                ("front", self.front_ms, "serve's front, less its wait on Triton"),
                ("triton_http", self.triton_http_ms, "Triton's HTTP: front's wait - Triton's request time"),
                ("queue", self.queue_ms, "nv_inference_queue_duration_us"),
                ("compute_input", self.compute_input_ms, "nv_inference_compute_input_duration_us"),
                ("handoff", self.handoff_ms, "Python backend hand-off: Triton's compute - model function"),
                ("batching", self.batching_ms, "model function around the runtime: join, split"),
                ("model", self.model_ms, "the runtime's infer (ONNX Runtime)"),
                ("compute_output", self.compute_output_ms, "nv_inference_compute_output_duration_us"),
                ("triton_other", self.triton_other_ms, "rest of nv_inference_request_duration_us")]


# The process that runs the served model, among the roles of ServerRow.cpu_ms_per_request:
# Triton's Python-backend stub (``pipeline.serving.backend``).
MODEL_ROLE = "python backend stub"


@dataclass
class ServerRow(Record):
    """One concurrency level of the server scenario (MLPerf's "server")."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"n", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99_note", "max_ms",
         "max_batch_size", "queue_delay_us", "model_file", "breakdown", "cpu_ms_per_request"})
    NESTED: ClassVar[dict[str, type[Record]]] = {"breakdown": StageBreakdown}

    scenario: str
    backend: str
    batch: int
    concurrency: int
    requests: int
    errors: int
    first_error: str | None
    seconds: float
    images_per_s: float
    status: str
    n: int | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    p99_note: str | None = None
    max_ms: float | None = None
    max_batch_size: int | None = None
    queue_delay_us: int | None = None
    model_file: str | None = None
    breakdown: StageBreakdown | None = None
    # CPU ms per completed request, by process role (pipeline.stages.bench.breakdown.CPU_ROLES)
    cpu_ms_per_request: dict[str, float] | None = None


@dataclass
class PoissonTrial(Record):
    """One open-loop run: requests on a Poisson schedule at ``target_per_s``, latency from each
    request's scheduled send time (MLPerf LoadGen's server scenario)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"first_error", "breakdown"})
    NESTED: ClassVar[dict[str, type[Record]]] = {"breakdown": StageBreakdown}

    target_per_s: float
    scheduled_per_s: float
    completed_per_s: float
    requests: int
    errors: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    within_bound: bool  # p99 <= the bound and no request failed
    early_stopping_met: bool  # LoadGen: enough requests to trust the p99 statistically
    seconds: float
    first_error: str | None = None
    breakdown: StageBreakdown | None = None


@dataclass
class PoissonSearch(Record):
    """``--arrival poisson``: the highest Poisson request rate whose p99 stays within the bound."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"trials": PoissonTrial, "best": PoissonTrial,
                                                 "checks": PoissonTrial}

    p99_bound_ms: float
    generator: str  # mlcommons-loadgen and its version
    ceiling_per_s: float  # the search's upper end: the best closed-loop images/s of this run
    trial_seconds: float
    trials: list[PoissonTrial]
    best: PoissonTrial | None  # None: no rate tried kept its p99 within the bound
    # --verify-capacity: Poisson runs at VERIFY_FRACTION x the capacity, as long as a trial;
    # each one that fails lowers the capacity to the rate it ran at, up to MAX_CHECKS runs
    checks: list[PoissonTrial] = field(default_factory=list)

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"checks"})
    VERIFY_FRACTION: ClassVar[float] = 0.9
    MAX_CHECKS: ClassVar[int] = 3

    @property
    def found_per_s(self) -> float | None:
        """What the search found: the highest rate a trial ran at whose p99 held (never a
        bisection midpoint no trial ran at)."""
        return self.best.target_per_s if self.best else None

    @property
    def capacity_per_s(self) -> float | None:
        """The capacity: what the search found; after --verify-capacity, the rate whose
        VERIFY_FRACTION held in the last check, or, when no check held, the rate the last one
        missed at (an upper bound, marked not confirmed)."""
        walked = self.check_capacities
        if not walked:
            return self.found_per_s
        capacity, last = walked[-1]
        return capacity if last.within_bound else last.target_per_s

    @property
    def check_capacities(self) -> list[tuple[float, PoissonTrial]]:
        """Each --verify-capacity check with the capacity it checked (90% of which it ran
        at): a check that holds confirms it; one that misses lowers it to the check's rate."""
        walked, capacity = [], self.found_per_s or 0.0
        for check in self.checks:
            walked.append((capacity, check))
            if not check.within_bound:
                capacity = check.target_per_s
        return walked

    @property
    def verification(self) -> PoissonTrial | None:
        """--verify-capacity's last run (None when it was not asked for)."""
        return self.checks[-1] if self.checks else None

    @property
    def capacity_check(self) -> str | None:
        """``held at 90%`` when --verify-capacity's last run kept its p99 within the bound,
        ``not confirmed`` when none did; None when it was not asked for."""
        if not self.checks:
            return None
        if self.checks[-1].within_bound:
            return f"held at {100 * self.VERIFY_FRACTION:.0f}%"
        return "not confirmed"


@dataclass
class ServerStop(Record):
    """How the served process ended after SIGTERM, and whether its ports were free again."""

    exit_code: int | None = None
    ports_free: bool | None = None


@dataclass
class ServerSection(Record):
    """latency.json's ``server`` section: the levels, the single-stream baselines measured in
    the same run, how the server stopped, and the recommended level."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"poisson"})
    NESTED: ClassVar[dict[str, type[Record]]] = {"rows": ServerRow, "baseline": LatencyRow,
                                                 "batched_ceiling": LatencyRow, "best": ServerRow,
                                                 "poisson": PoissonSearch, "stop": ServerStop}

    scenario: str
    rows: list[ServerRow]
    baseline: LatencyRow | None
    batched_ceiling: LatencyRow | None
    stop: ServerStop
    budget_ms: float | None
    best: ServerRow | None
    seconds: float
    warmup_s: float
    max_batch_size: int
    queue_delay_us: int
    threads: int
    command: str
    created: str
    poisson: PoissonSearch | None = None


@dataclass
class Percentiles(Record):
    """Percentile statistics of a list of timings, ms (``stages.bench.timing.percentile_stats``):
    p99 is None below 600 samples, and ``p99_note`` says so."""

    WRITE_NONE: ClassVar[bool] = True

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float | None
    p99_note: str | None
    max_ms: float


@dataclass
class SequentialLoop(Record):
    """The classic per-image loop: open, preprocess, infer, one file at a time."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"decode": Percentiles, "infer": Percentiles}

    n: int
    wall_s: float
    images_per_s: float | None
    decode: Percentiles | None  # decode + preprocess
    infer: Percentiles | None  # inference
    total_s: float
    lines: list[str]  # `i/N: name 0.012s`, as the write-ups print them
    skipped: list[str]


@dataclass
class PipelinedLoop(Record):
    """The same files decoded in DataLoader workers while the model runs."""

    n: int
    workers: int
    wall_s: float
    images_per_s: float | None


@dataclass
class ImageLoop(Record):
    """``bench --images``: one backend's per-image loops over real files."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"sequential": SequentialLoop,
                                                 "pipelined": PipelinedLoop}

    backend: str
    device: str
    files: int
    summary: str  # `device:<device> total time:<t>s mean:<m>s`
    sequential: SequentialLoop
    pipelined: PipelinedLoop


@dataclass(kw_only=True)
class RegressionRow(Record):
    """One target against the baseline's row for the same target: ``status`` is regressed
    (slower by more than allowed, and significantly so over the windows), ok, or not
    comparable (with the reason; never counted as passing)."""

    target: str  # backend:precision
    batch: int
    status: str  # regressed | ok | not comparable
    reason: str | None = None
    baseline_per_s: float | None = None  # the medians of the windows
    now_per_s: float | None = None
    slowdown: float | None = None  # baseline images/s / now - 1: 0.15 is 15% slower
    p_value: float | None = None  # one-sided Mann-Whitney U: now slower than allowed
    windows: list[int] | None = None  # [now, baseline]


@dataclass(kw_only=True)
class RegressionSection(Record):
    """``bench --baseline``: each row against the baseline's, on the windows bench takes."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"rows": RegressionRow}

    baseline: str  # the baseline latency.json (or the model re-measured in this run)
    max_slowdown: float
    test: str  # the statistics, in words
    alpha: float
    rerun: bool  # True: the baseline model re-measured here, alternating windows
    notes: list[str] = field(default_factory=list)  # e.g. another input size
    rows: list[RegressionRow] = field(default_factory=list)

    @property
    def regressed(self) -> list[RegressionRow]:
        return [row for row in self.rows if row.status == "regressed"]


@dataclass
class LatencyDoc(Document):
    """latency.json: what bench measured on one machine, and what it recommends."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"recommendation", "command", "server",
                                                     "regression"})
    NESTED: ClassVar[dict[str, type[Record]]] = {"rows": LatencyRow, "server": ServerSection,
                                                 "images": ImageLoop,
                                                 "recommendation": Recommendation,
                                                 "regression": RegressionSection,
                                                 "machine": Machine, "model": BenchedModel,
                                                 "config": BenchConfig}

    model: BenchedModel
    config: BenchConfig
    machine: Machine
    rows: list[LatencyRow]
    created: str
    images: list[ImageLoop] = field(default_factory=list)
    schema_version: int = LATENCY_SCHEMA_VERSION
    kind: str = LATENCY_KIND
    recommendation: Recommendation | None = None
    command: str | None = None
    server: ServerSection | None = None
    regression: RegressionSection | None = None

    FILE: ClassVar[str] = "latency.json"
    REMAKE: ClassVar[str] = "python -m pipeline bench BUNDLE"
    VERSION: ClassVar[int | None] = LATENCY_SCHEMA_VERSION

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: Path) -> dict[str, Any]:
        if data.get("kind") != LATENCY_KIND:
            raise InputError(f"{str(path)!r} is not a latency.json written by python -m pipeline "
                             f"bench")
        if data.get("schema_version") in (2, 3):  # the fields added since are optional
            data = {**data, "schema_version": LATENCY_SCHEMA_VERSION}
        return data

    @property
    def summary(self) -> str:
        ran = len(ok_rows(self.rows))
        best = self.recommendation.summary if self.recommendation else "no recommendation"
        return f"{ran} of {len(self.rows)} rows measured; {best}"

    @property
    def machine_label(self) -> str:
        """The machine's label (``bench --machine``; the hostname by default)."""
        return self.machine.name


# ----------------------------------------------------------------------------- parity.json
@dataclass
class PairResult(Record):
    """One fp32 candidate on one input, against eager PyTorch (float64 under the floor rule)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"finite", "allclose_hull"})

    candidate: str  # the file's label and the backend: onnx-sim-ort-cpu, torch-export-cpu ...
    inputs: str
    batch: int
    provider: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    max_abs: float | None = None  # against eager fp32
    max_rel: float | None = None
    max_abs_vs_fp64: float | None = None
    fp32_floor: float | None = None  # max |eager fp32 - eager fp64| on this input
    tolerance: float | None = None  # the effective absolute tolerance (floor rule)
    margin: float | None = None  # tolerance / error: > 1 passes
    top1: float | None = None
    top5: float | None = None
    passed: bool = False
    error: str | None = None
    environment: bool = False  # failed because the environment cannot run it
    reference: str = "torch-cpu"
    backend: str | None = None  # the registry's name for what ran it
    # For ``verify --recheck`` with --atol/--rtol (files before it lack them): were the
    # outputs finite, and the points that decide numpy's rule against eager fp32 for any
    # tolerance (``stages.verify.allclose_hull``).
    finite: bool | None = None
    allclose_hull: list[list[float]] | None = None


@dataclass
class GateResult(Record):
    """A reduced-precision candidate judged on predictions against eager fp32: counts, their
    confidence bounds and a three-way verdict (``pipeline.core.confidence``)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(  # absent from files verify wrote before
        {"verdict", "confidence", "disagreements", "disagreement_bounds", "both_right",
         "fp32_only_right", "candidate_only_right", "both_wrong", "drop_bounds_points",
         "images_needed", "accepted_inconclusive"})

    candidate: str  # backend:precision, as bench rows name it
    backend: str
    precision_requested: str
    precision: str | None = None  # what really ran (OpenVINO reads its choice back)
    provider: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    images: int = 0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs: float | None = None
    fp32_top1: float | None = None
    candidate_top1: float | None = None
    top1_drop_points: float | None = None
    passed: bool = False
    failed_on: str | None = None
    error: str | None = None
    # Does this gate decide verify's exit code? Variant files (int8, fp16) and precisions the
    # user named do; runtime-only precisions (bf16 autocast, OpenVINO's auto) are advisory.
    decides_exit: bool = True
    # Why the gate's figures mean nothing (a random-weight model has no margins to keep).
    not_meaningful: str | None = None
    verdict: str | None = None  # pass | fail | inconclusive (None: it could not run)
    confidence: float | None = None  # of each one-sided bound
    disagreements: int | None = None  # images whose top-1 differs from fp32's
    disagreement_bounds: list[float] | None = None  # [lower, upper] on the disagreement rate
    both_right: int | None = None  # with labels: the paired counts behind the drop
    fp32_only_right: int | None = None
    candidate_only_right: int | None = None
    both_wrong: int | None = None
    drop_bounds_points: list[float] | None = None  # [lower, upper] on the top-1 drop
    images_needed: int | None = None  # for a conclusive verdict at the observed rates
    accepted_inconclusive: bool | None = None  # --accept-inconclusive let it through

    @property
    def blocks(self) -> bool:
        """Does this gate stop verify (when it decides the exit code)? A failed or
        inconclusive gate does, unless the user accepted inconclusive verdicts."""
        return not self.passed and not self.accepted_inconclusive

    @property
    def status(self) -> str:
        """What bench rows and reports say of it."""
        if self.not_meaningful:
            return "gate not meaningful"
        if self.passed:
            return "gate passed"
        if self.verdict == "inconclusive":
            needs = f" (needs {self.images_needed} images)" if self.images_needed else ""
            return f"gate inconclusive{needs}"
        return "gate failed"


@dataclass
class LayerError(Record):
    """One layer of a candidate against eager PyTorch (``verify --localize``)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"max_abs_vs_fp64", "fp32_floor", "tolerance", "relative_error", "logit_error_share"})

    pytorch: str  # the layer in PyTorch terms: layer3.1.conv2 (folded with layer3.1.bn2)
    artifact: str  # the artifact's node (an ONNX node name, an fx node name)
    tensor: str  # the artifact's tensor compared
    op: str
    index: int  # position among the layers compared, in graph order
    max_abs_vs_fp64: float | None = None
    fp32_floor: float | None = None  # max |eager fp32 - eager fp64| at this layer
    tolerance: float | None = None  # the floor rule, per layer
    relative_error: float | None = None  # ||candidate - fp32|| / ||fp32|| (reduced precision)
    logit_error_share: float | None = None  # this layer's quantization alone, over the whole's


@dataclass
class Localization(Record):
    """Where one candidate departs from eager PyTorch, layer by layer.

    fp32 artifacts: the first layer (in graph order) whose error against eager float64 exceeds
    its own tolerance, the floor rule applied per layer. int8: the layers with the largest
    share of the final logit error, each measured by quantizing that layer alone."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"first_divergent": LayerError, "largest": LayerError}

    candidate: str
    model_file: str | None
    inputs: str
    batch: int
    reference: str
    layers_compared: int
    first_divergent: LayerError | None = None
    largest: list[LayerError] = field(default_factory=list)
    logit_relative_error: float | None = None
    note: str | None = None


@dataclass(kw_only=True)
class ParityRule(Record):
    """parity.json's ``rule``: the fp32 noise-floor rule against eager fp64 (the default), or
    numpy's allclose against eager fp32 (``--atol/--rtol``)."""

    FLOOR: ClassVar[str] = "fp32 noise floor"
    ALLCLOSE: ClassVar[str] = "allclose vs eager fp32"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"formula", "atol", "rtol", "floor_multiple", "scale_term"})

    kind: str  # FLOOR | ALLCLOSE
    formula: str | None = None
    atol: float | None = None  # allclose
    rtol: float | None = None
    floor_multiple: float | None = None  # the floor rule
    scale_term: float | None = None

    @property
    def allclose(self) -> bool:
        return self.kind == self.ALLCLOSE


@dataclass(kw_only=True)
class GateRule(Record):
    """parity.json's ``gate_rule``: the limits every accuracy gate was judged against, and
    how its verdict was reached."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"decides_exit", "statistics", "confidence", "accept_inconclusive", "named",
         "rechecked_from"})

    max_top1_drop_points: float
    min_top1_agreement: float
    decides_exit: str | None = None
    statistics: str | None = None
    confidence: float | None = None
    accept_inconclusive: bool = False
    named: list[str] | None = None  # verify --precision: the precisions that must be gated
    rechecked_from: str | None = None  # verify --recheck: the file the figures came from


@dataclass(kw_only=True)
class EvaluationSet(Record):
    """parity.json's ``evaluation``: the images the accuracy gates ran on."""

    source: str
    images: int
    labelled: bool
    held_apart_from_calibration: str


@dataclass
class ParityReport(Document):
    """parity.json: verify's verdict. Truthy only when every pair and every gate that decides
    the exit code passed, and at least one CPU ONNX comparison ran."""

    NESTED: ClassVar[dict[str, type[Record]]] = {
        "pairs": PairResult, "gates": GateResult, "localized": Localization, "rule": ParityRule,
        "gate_rule": GateRule, "evaluation": EvaluationSet}
    FILE: ClassVar[str] = "parity.json"
    REMAKE: ClassVar[str] = "python -m pipeline verify BUNDLE"
    VERSION: ClassVar[int | None] = PARITY_SCHEMA_VERSION

    rule: ParityRule
    pairs: list[PairResult] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    gate_rule: GateRule | None = None
    evaluation: EvaluationSet | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    not_verified: dict[str, str] = field(default_factory=dict)
    integrity_checked: list[str] = field(default_factory=list)
    localized: list[Localization] = field(default_factory=list)
    machine: str | None = None  # the CPU (model and flags) the gates ran on
    schema_version: int = PARITY_SCHEMA_VERSION
    reference: str = "eager PyTorch on the CPU: float64 for parity, fp32 for the gate"
    passed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.passed = bool(self)

    def __bool__(self) -> bool:
        return self.has_cpu_onnx_pair and all(p.passed for p in self.pairs) \
            and not any(g.blocks for g in self.binding_gates)

    @property
    def has_cpu_onnx_pair(self) -> bool:
        return any(p.backend == "ort-cpu" for p in self.pairs)

    @property
    def binding_gates(self) -> list[GateResult]:
        """The gates that decide the exit code (see ``GateResult.decides_exit``)."""
        return [g for g in self.gates if g.decides_exit and not g.not_meaningful]

    @property
    def failures(self) -> list[PairResult | GateResult]:
        return [p for p in self.pairs if not p.passed] + [g for g in self.binding_gates if g.blocks]

    @property
    def advisories(self) -> list[GateResult]:
        """Gates that failed without deciding the exit code (kept out of recommendations)."""
        return [g for g in self.gates if not g.passed and not g.not_meaningful
                and not g.decides_exit]

    @property
    def environment_only(self) -> bool:
        """Every failure is an environment that cannot run a CPU pair (exit 3, not 1)."""
        failures = self.failures
        return bool(failures) and all(isinstance(f, PairResult) and f.environment for f in failures)

    def failure_summary(self) -> str:
        """One line naming what failed and its worst figure (the CLI's ``error:`` line)."""
        if not self.has_cpu_onnx_pair:
            return "parity FAILED: no CPU ONNX comparison ran, so nothing was verified"
        pairs = [p for p in self.pairs if not p.passed]
        gates = [g for g in self.binding_gates if g.blocks]
        parts = []
        if pairs:
            worst = max(pairs, key=lambda p: p.max_abs_vs_fp64 if p.max_abs_vs_fp64 is not None
                        else (p.max_abs if p.max_abs is not None else float("inf")))
            if worst.max_abs is None:
                detail = worst.error or "no result"
            elif worst.tolerance is not None:
                detail = (f"max abs error vs fp64 {worst.max_abs_vs_fp64:.3e} > tolerance "
                          f"{worst.tolerance:.3e} (fp32 floor {worst.fp32_floor:.2e})")
            else:
                detail = (f"max abs error {worst.max_abs:.3e} (atol {self.rule.atol:g}, "
                          f"rtol {self.rule.rtol:g})")
            parts.append(f"parity FAILED for {len(pairs)} pair(s); worst: {worst.candidate} on "
                         f"{worst.inputs}: {detail}")
        for gate in gates:
            word = "INCONCLUSIVE" if gate.verdict == "inconclusive" else "FAILED"
            fix = (" (give more evaluation images, or --accept-inconclusive)"
                   if gate.verdict == "inconclusive" else "")
            parts.append(f"accuracy gate {word} for {gate.candidate}: {gate.failed_on}{fix}"
                         + (f" ({gate.error})" if gate.error else ""))
        return "; ".join(parts)

    @property
    def summary(self) -> str:
        checked = f"{len(self.pairs)} comparisons, {len(self.gates)} gates"
        return f"verify passed ({checked})" if self else f"verify FAILED ({checked}): " \
            f"{self.failure_summary()}"

    def to_dict(self) -> dict[str, Any]:
        self.passed = bool(self)
        data = super().to_dict()
        return {"schema_version": data.pop("schema_version"), "passed": data.pop("passed"), **data}

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> "ParityReport":
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "passed"}  # derived, not stored state
        return super().from_dict(data, where=where)

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: Path) -> dict[str, Any]:
        if "schema_version" not in data:
            data = _parity_v1_to_v2(data)
        if data.get("schema_version") == 2:
            data = {**data, "schema_version": 3, "localized": [], "machine": None}
        if not data.get("gate_rule"):  # written as {} before any gate rule existed
            data = {**data, "gate_rule": None}
        return data


def _parity_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """parity.json as the version before this one wrote it (no schema_version; pairs without
    ``backend``; gates without ``decides_exit``/``not_meaningful``): read, not rejected."""
    upgraded = {**data, "schema_version": 2}
    upgraded["pairs"] = [{"backend": _backend_of(p.get("candidate", "")), **p}
                         for p in data.get("pairs", [])]
    upgraded["gates"] = [{"decides_exit": g.get("precision_requested") in ("int8", "fp16"),
                          "not_meaningful": None, **g} for g in data.get("gates", [])]
    return upgraded


def _backend_of(candidate: str) -> str:
    for prefix in ("onnx-sim-", "onnx-"):
        if candidate.startswith(prefix):
            return candidate[len(prefix):]
    return candidate


def read_parity(bundle: Any) -> ParityReport | None:
    """The bundle's parity.json, or None when verify has not run (or wrote something this
    version cannot read: then nothing timed counts as verified)."""
    path = bundle.path(PARITY)
    if not path.is_file():
        return None
    try:
        return ParityReport.load(path)
    except InputError:
        return None


# ----------------------------------------------------------------------------- calibration.json
@dataclass
class FloatLayer(Record):
    """A layer ``quantize --repair`` kept in float, and why it was chosen."""

    pytorch: str  # layer3.1.conv2
    node: str  # the ONNX node left unquantized
    logit_error_share: float | None  # its share of plain int8's logit error (verify --localize's)
    agreement_after: float  # on the repair images, once it was kept in float


@dataclass
class RepairRecord(Record):
    """What ``quantize --repair`` did to model.int8.onnx, in the manifest's quantize section."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"kept_in_float": FloatLayer}

    images: int  # repair images: int8 against fp32 on these
    source: str
    min_agreement: float  # the limit it aimed for
    agreement_before: float  # plain int8
    agreement_after: float
    met: bool
    equalized_pairs: int = 0  # Conv-Relu-Conv pairs cross-layer equalization rescaled
    equalization_kept: bool = False  # kept only when it raised the agreement
    agreement_equalized: float | None = None
    largest_channel_scale: float | None = None  # how uneven the channels it moved were
    kept_in_float: list[FloatLayer] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)  # reverts that did not help, put back
    quantized_nodes: int = 0  # Conv/Gemm nodes int8 quantizes
    max_in_float: int = 0
    seconds: float = 0.0
    note: str | None = None


@dataclass
class CalibrationRecord(Document):
    """Where int8's calibration images came from, with the sha256 of each file, so verify can
    refuse to evaluate on them."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"schema_version", "repair_source",
                                                     "repair_files_sha256"})
    FILE: ClassVar[str] = "calibration.json"
    REMAKE: ClassVar[str] = "python -m pipeline quantize BUNDLE --precision int8"

    source: str
    split: str | None
    count: int
    requested: int
    method: str
    files_sha256: list[str] | None
    schema_version: int | None = CALIBRATION_SCHEMA_VERSION
    # quantize --repair chose what to repair on these images (when not the calibration ones):
    # verify refuses them as evaluation images too.
    repair_source: str | None = None
    repair_files_sha256: list[str] | None = None

    @property
    def summary(self) -> str:
        return f"calibrated on {self.count} images from {self.source} ({self.method})"


# ----------------------------------------------------------------------------- offline.json
@dataclass
class OfflineRun(Document):
    """offline.json: ``bench --scenario offline`` (MLPerf's offline scenario: images/s over one
    large query), end to end from files to labels, beside the two ceilings that bound it on
    the same cores, measured in the same run."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"machine": Machine}
    FILE: ClassVar[str] = "offline.json"
    REMAKE: ClassVar[str] = "python -m pipeline bench BUNDLE --scenario offline --images DIR"
    VERSION: ClassVar[int | None] = OFFLINE_SCHEMA_VERSION

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: Path) -> dict[str, Any]:
        if data.get("schema_version") == 1:  # the machine's label is optional
            data = {**data, "schema_version": OFFLINE_SCHEMA_VERSION}
        return data

    created: str
    machine: Machine
    target: str  # backend:precision that ran (what predict's --precision auto chose, or given)
    choice: str  # why
    files: int
    classified: int
    errors: int
    batch: int
    cores: int
    workers: int  # decode processes in the end-to-end run
    threads: int  # runtime threads in the end-to-end run
    split: str  # how they were chosen
    fast_decode: bool
    decode_only_per_s: float  # decode+preprocess alone, every core decoding
    infer_only_per_s: float  # inference alone at ``batch``, every core as runtime threads
    shared_core_bound_per_s: float  # 1 / (1/decode + 1/infer): both on the same cores
    end_to_end_per_s: float  # files to labels through the streaming engine
    ratio_to_bound: float
    seconds: float  # the end-to-end run
    schema_version: int = OFFLINE_SCHEMA_VERSION

    @property
    def summary(self) -> str:
        return (f"offline {self.target}: {self.end_to_end_per_s:.1f} img/s end to end, "
                f"{self.ratio_to_bound:.2f}x the shared-core bound {self.shared_core_bound_per_s:.1f} "
                f"(decode {self.decode_only_per_s:.1f}, inference {self.infer_only_per_s:.1f} img/s)")


# ----------------------------------------------------------------------------- manifest sections
@dataclass
class ModelSection(Record):
    """manifest.json's ``model``: what the bundle's models are and how to feed them."""

    arch: str
    num_classes: int
    class_names: list[str]
    input_size: int
    preprocessing: dict[str, Any]
    weights: dict[str, Any]

    @classmethod
    def read(cls, bundle: Any) -> "ModelSection":
        """The ``model`` section of a bundle's manifest."""
        return cls.of(bundle.read_manifest(), str(bundle.manifest_path))

    @classmethod
    def of(cls, manifest: dict[str, Any], where: str) -> "ModelSection":
        if "model" not in manifest:
            raise InputError(f"{where} has no model section; run: python -m pipeline export")
        return cls.from_dict(manifest["model"], where=f"{where}: model")

    @property
    def random_weights(self) -> bool:
        return (self.weights or {}).get("source") == "random"


@dataclass(kw_only=True)
class TrainSection(Record):
    """manifest.json's ``stages.train``: how the bundle was trained, so that calibration can
    read the training split and the accuracy gate the validation split of the same data."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"duration_s", "data", "classes", "epochs", "best_val_acc", "skipped_images"})

    config: dict[str, Any]  # TrainOptions as the run recorded them
    duration_s: float | None = None
    data: str | None = None  # where the images came from, in words
    classes: list[str] | None = None
    epochs: int | None = None
    best_val_acc: float | None = None
    skipped_images: list[str] | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any], where: str = "manifest.json") -> "TrainSection | None":
        """The section, or None when ``train`` did not make this bundle."""
        section = (manifest.get("stages") or {}).get("train")
        if not section or "config" not in section:
            return None
        return cls.from_dict(section, where=f"{where}: stages.train")

    @property
    def data_spec(self) -> str:
        """``--data`` as given: a folder, ``cifar10:ROOT`` or ``synthetic``."""
        return self.config["data"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def val_split(self) -> float:
        return self.config["val_split"]

    @property
    def synthetic_per_class(self) -> int | None:
        return self.config.get("synthetic_per_class")

    @property
    def synthetic(self) -> bool:
        return self.data_spec == "synthetic"


# ----------------------------------------------------------------------------- quantize
@dataclass(kw_only=True)
class QuantizedVariant(Record):
    """One file quantize wrote: manifest.json's ``quantize.variants`` entry, and (without the
    source fields) the ``quantization`` metadata stamped into the file itself."""

    INT8: ClassVar[tuple[str, ...]] = (
        "format", "per_channel", "activations", "weights", "why_u8s8", "reduce_range",
        "why_reduce_range", "pre_process", "calibrate_method", "calibration",
        "agreement_on_calibration_images", "repair")
    FP16: ClassVar[tuple[str, ...]] = ("keep_io_types", "cast_nodes", "fp32_ops_kept")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        INT8 + FP16 + ("source", "source_sha256", "duration_s"))
    NESTED: ClassVar[dict[str, type[Record]]] = {"repair": RepairRecord}

    precision: str  # int8 | fp16
    # int8: ONNX Runtime's static QDQ quantization, and why each choice
    format: str | None = None
    per_channel: bool | None = None
    activations: str | None = None
    weights: str | None = None
    why_u8s8: str | None = None
    reduce_range: bool | None = None
    why_reduce_range: str | None = None
    pre_process: str | None = None
    calibrate_method: str | None = None
    calibration: dict[str, object] | None = None  # calibration.json without the file hashes
    agreement_on_calibration_images: float | None = None  # without --repair
    repair: RepairRecord | None = None  # with --repair
    # fp16: onnxruntime's float16 converter
    keep_io_types: bool | None = None
    cast_nodes: int | None = None
    fp32_ops_kept: list[str] | None = None
    # the fp32 file it was made from, and how long it took
    source: str | None = None
    source_sha256: str | None = None
    duration_s: float | None = None

    def stamp(self) -> dict[str, object]:
        """What the file itself says of how it was made (its source is the bundle's business)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("precision", "source", "source_sha256", "duration_s")}


# ----------------------------------------------------------------------------- export
@dataclass(kw_only=True)
class AotiPackage(Record):
    """One AOTInductor package as export compiled it: the toolchain and the CPU features it
    may use (Inductor compiles with -march=native)."""

    device: str
    compile_s: float
    compiler: str
    compiler_version: str
    vector_isa: str | None  # CPU packages only
    isa_flags: list[str] | None
    torch: str
    max_batch: int


@dataclass(kw_only=True)
class Simplification(Record):
    """What onnxsim did: node counts, its own check, and why the raw model was kept if it was."""

    enabled: bool
    nodes_before: int | None = None
    nodes_after: int | None = None
    check_ok: bool | None = None
    warning: str | None = None

    def to_dict(self) -> dict[str, object]:
        return super().to_dict() if self.enabled else {"enabled": False}


@dataclass(kw_only=True)
class Pt2Export(Record):
    """model.pt2: its dynamic batch range, and the reloaded program's distance from eager."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"dynamic_batch", "reload_max_abs_diff"})

    enabled: bool
    dynamic_batch: dict[str, int] | None = None  # {"min": 1, "max": ...}
    reload_max_abs_diff: float | None = None


@dataclass(kw_only=True)
class ExportSection(Record):
    """manifest.json's ``export`` section."""

    exporter: str
    opset: int
    input_name: str
    output_name: str
    dynamic_axes: dict[str, dict[str, str]]
    onnx_nodes: int
    torchscript_reload_max_abs_diff: float
    simplify: Simplification
    pt2: Pt2Export
    aoti: dict[str, AotiPackage]  # by device
    captured_warnings: list[str]


@dataclass(kw_only=True)
class EpochRow(Record):
    """One epoch of training: a row of history.json (and of a training checkpoint's history)."""

    epoch: int  # counted from 1
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # the rate at the epoch's start (onecycle changes it every batch)
    duration_s: float


@dataclass(kw_only=True)
class TrainSummary(Record):
    """What ``fit`` hands back: the bundle it trained, its best validation accuracy, and the
    identity of the final weights (the same on every rank of a distributed run)."""

    bundle: str
    arch: str
    best_val_acc: float
    epochs: int
    classes: list[str]
    weights_sha256: str
    world_size: int
    rank: int
    skipped_images: int


@dataclass(kw_only=True)
class TritonRepository(Record):
    """What ``deploy triton`` wrote: the repository, the model's folder and config, and what
    it serves."""

    repository: str
    model: str
    config: str  # config.pbtxt's path
    onnx: str  # the model file's name inside the version folder
    precision: str
    target: str  # cpu | gpu
    max_batch_size: int
    preferred_batch_size: list[int]
