"""Every option of every stage: one dataclass each, every default written once, every value
checked once (``check()``). The CLI takes its option defaults from here and the Python API its
keyword defaults, so the two cannot drift (as Ultralytics keeps one default config that
overrides replace). What a value needs from the machine (a compiler, a GPU, an extra) is
checked by the stage that uses it; here only the values themselves.

The fp32 parity rule: the tolerance is a property of the model being checked, not a constant
measured on one machine. At verify time eager PyTorch runs the same input in float64 as well;
the model's own fp32 noise floor on that input is ``floor = max |eager fp32 - eager fp64|``. A
candidate passes when, element-wise,

    |candidate - eager fp64| <= FLOOR_MULTIPLE * floor + SCALE_TERM * max |eager fp64|

An export that computes the same function lands within about one floor of float64 (ONNX
Runtime, OpenVINO and TorchScript on all 13 archs at 32, 64 and 224 px: at most 1.8 floors,
benchmarks/results/parity-margin.md), so 8 floors leave a margin of 4 or more while a drift
a few floors large fails. Each machine measures its own floor, so the rule moves with the CPU.
The scale term keeps a model whose floor happens to be tiny from demanding more than fp32 can
promise relative to its logits. ``--atol``/``--rtol`` replace the rule with numpy's
``allclose`` against eager fp32. Reduced precision (int8, fp16, bf16, OpenVINO's own choice)
is not an allclose question: it is gated on predictions, against eager fp32 on evaluation
images.

Nothing here imports numpy or torch: ``--help`` reads these defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable

from pipeline.errors import InputError

# ----------------------------------------------------------------------------- verify
FLOOR_MULTIPLE = 8.0
SCALE_TERM = 1e-5
DEFAULT_MAX_SLOWDOWN = 0.10  # bench --baseline: 10% slower than the baseline is allowed
DEFAULT_MAX_TOP1_DROP = 1.0  # points of top-1 accuracy, when the images carry labels
DEFAULT_MIN_AGREEMENT = 0.99  # share of images whose top-1 class equals eager fp32's
GATED_PRECISIONS = ("int8", "fp16", "bf16", "auto")  # verify --precisions


@dataclass(frozen=True)
class VerifyOptions:
    atol: float | None = None  # with rtol: numpy allclose against eager fp32 instead of the floor rule
    rtol: float | None = None
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    cuda: bool = True  # try the GPU pairs (skipped with a reason where there is no GPU)
    # Reduced precisions whose gates decide the exit code besides the variant files' (a
    # runtime-only precision such as bf16 is otherwise advisory); gated on every CPU.
    precisions: tuple[str, ...] = ()
    localize: bool = False  # layer-by-layer comparison of every candidate, not only failed ones
    # Let a gate whose evaluation set is too small to decide (an inconclusive verdict) through
    # with a warning; it is still never recommended.
    accept_inconclusive: bool = False

    def check(self) -> None:
        unknown = [p for p in self.precisions if p not in GATED_PRECISIONS]
        if unknown:
            raise InputError(f"--precisions {unknown[0]!r} is not a gated precision; choose from: "
                             f"{', '.join(GATED_PRECISIONS)} (fp32 is always checked by parity)")
        if (self.atol is not None and self.atol < 0) or (self.rtol is not None and self.rtol < 0):
            raise InputError(f"tolerances must be >= 0 (got --atol {self.atol}, --rtol {self.rtol})")
        if self.max_top1_drop < 0:
            raise InputError(f"--max-top1-drop {self.max_top1_drop} must be >= 0 points")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise InputError(f"--min-agreement {self.min_agreement} must be a share between 0 "
                             f"and 1, e.g. 0.99")

    @property
    def tolerances(self) -> tuple[float, float] | None:
        """(atol, rtol) when the user replaced the floor rule, else None."""
        if self.atol is None and self.rtol is None:
            return None
        return (self.atol or 0.0, self.rtol or 0.0)


# ----------------------------------------------------------------------------- export
EXPORTERS = ("dynamo", "legacy")
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    pt2: bool = True  # model.pt2, the torch.export ExportedProgram
    aoti: bool = False  # AOTInductor packages: the CPU's, and CUDA's when a GPU is present
    verbose: bool = False

    def check(self) -> None:
        """The values alone; the opset range each exporter supports is read from torch by
        the export stage."""
        if self.aoti and not self.pt2:
            raise InputError("--aoti compiles the torch.export program: drop --no-pt2, or drop --aoti")
        if self.exporter not in EXPORTERS:
            raise InputError(f"unknown --exporter {self.exporter!r}; choose from: "
                             f"{', '.join(EXPORTERS)}")


# ----------------------------------------------------------------------------- quantize
QUANT_PRECISIONS = ("int8", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_COUNT = 300


@dataclass(frozen=True)
class QuantizeOptions:
    precisions: tuple[str, ...] = QUANT_PRECISIONS
    calibration: str | None = None  # a folder, "train" or "synthetic"; None: train when recorded
    count: int = DEFAULT_CALIBRATION_COUNT
    method: str = "minmax"
    seed: int = 0
    reduce_range: bool | None = None  # None: 7-bit weights exactly when this CPU lacks VNNI
    # Repair an int8 model that falls short of the gate's limits on the repair images
    # (equalize, then keep the worst layers in float); they default to the calibration images.
    repair: bool = False
    repair_images: str | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT  # the limit repair aims for
    max_float_share: float = 0.10  # at most this share of the quantized Conv/Gemm kept in float

    def check(self) -> None:
        if self.repair_images is not None and not self.repair:
            raise InputError("--repair-images is for --repair; add --repair, or drop it")
        if self.repair and "int8" not in self.precisions:
            raise InputError("--repair repairs the int8 model; add int8 to --precision")
        unknown = [p for p in self.precisions if p not in QUANT_PRECISIONS]
        if unknown or not self.precisions:
            raise InputError(f"unknown precision {', '.join(unknown) or '(none)'!r} for quantize; "
                             f"choose from: {', '.join(QUANT_PRECISIONS)} (bf16 needs no file: it "
                             f"is a runtime setting that bench and verify apply)")
        if self.method not in CALIBRATION_METHODS:
            raise InputError(f"unknown --method {self.method!r}; choose from: "
                             f"{', '.join(CALIBRATION_METHODS)}")
        if self.count < 1:
            raise InputError(f"--count {self.count} must be at least 1 (default "
                             f"{DEFAULT_CALIBRATION_COUNT})")


# ----------------------------------------------------------------------------- bench
SCENARIOS = ("single-stream", "server", "offline")


@dataclass(frozen=True)
class BenchOptions:
    """``backends`` holds targets, ``backend:precision`` (see ``pipeline.runtimes.registry``);
    empty means every target the registry knows."""

    backends: tuple[str, ...] = ()
    # Empty: sweep 1, 2, 4, ... until throughput stops gaining (``--batch-sizes sweep``).
    batch_sizes: tuple[int, ...] = ()
    iterations: int = 75  # three stability windows of 25 calls; --seconds usually gives more
    seconds: float = 5.0
    warmup_s: float = 1.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch: int = 256  # the sweep's ceiling

    @property
    def sweep(self) -> bool:
        return not self.batch_sizes

    @property
    def reason_batches(self) -> tuple[int, ...]:
        """The batch sizes a target that cannot run gets a reason row for."""
        return self.batch_sizes or (1,)

    def check(self) -> None:
        if self.iterations < 1 or self.seconds < 0 or self.warmup_s < 0:
            raise InputError("--iterations must be >= 1 and --seconds/--warmup-seconds >= 0")
        if self.threads < 1:
            raise InputError(f"--threads {self.threads} must be at least 1")
        if any(b < 1 for b in self.batch_sizes):
            raise InputError(f"--batch-sizes {self.batch_sizes} must be positive integers")


ARRIVALS = ("closed", "poisson")


def check_arrival(scenario: str, arrival: str, p99_ms: float | None) -> None:
    """--arrival and --p99-ms belong to the server scenario."""
    if scenario != "server" and (arrival != "closed" or p99_ms is not None):
        raise InputError("--arrival and --p99-ms load a served model: add --scenario server")
# The largest batch Triton's dynamic batcher forms, for serve and the server scenario alike.
SERVER_MAX_BATCH = 32
# serve's batcher dispatches at once: batches form from the requests that queue while the model
# runs, so a lone request never waits (measured on 2 CPU cores: 2.2 ms less p50 at concurrency
# 1, 2% more images/s at 16; benchmarks/results/queue-delay-cpu.md).
SERVER_QUEUE_DELAY_US = 0
# A standalone Triton from deploy triton, often on a GPU where one image takes about a
# millisecond: without a short wait it would seldom batch.
DEPLOY_QUEUE_DELAY_US = 2000


@dataclass(frozen=True)
class ScenarioOptions:
    """The server scenario (MLPerf's "server"): load levels against ``python -m pipeline serve``."""

    concurrency: tuple[int, ...] = (1, 4, 16)
    seconds: float = 10.0
    warmup_s: float = 2.0
    threads: int | None = None
    max_batch_size: int = SERVER_MAX_BATCH
    queue_delay_us: int = SERVER_QUEUE_DELAY_US
    # closed: the concurrency levels only; poisson: then open-loop Poisson arrivals, searching
    # the highest rate whose p99 stays within p99_ms (in at most poisson_trials runs)
    arrival: str = "closed"
    p99_ms: float | None = None
    poisson_trials: int = 5
    # after the search, Poisson runs at 0.9x the capacity found, as long as a trial: does the
    # p99 hold when the capacity is used? (a miss lowers the capacity; at most 3 runs)
    verify_capacity: bool = False

    def check(self) -> None:
        if not self.concurrency or any(c < 1 or c > 256 for c in self.concurrency):
            raise InputError(f"--concurrency {','.join(map(str, self.concurrency))} must be "
                             f"integers from 1 to 256, e.g. 1,4,16")
        if self.seconds <= 0 or self.seconds > 600:
            raise InputError(f"--seconds {self.seconds} must be in (0, 600] for the server scenario")
        if self.arrival not in ARRIVALS:
            raise InputError(f"unknown --arrival {self.arrival!r}; choose from: {', '.join(ARRIVALS)}")
        if self.arrival == "poisson" and (self.p99_ms is None or self.p99_ms <= 0):
            raise InputError("--arrival poisson searches the highest rate whose p99 stays within a "
                             "bound: give it with --p99-ms, e.g. --p99-ms 100")
        if self.arrival == "closed" and self.p99_ms is not None:
            raise InputError("--p99-ms bounds the Poisson search: add --arrival poisson")
        if not 1 <= self.poisson_trials <= 20:
            raise InputError(f"--poisson-trials {self.poisson_trials} must be from 1 to 20")
        if self.verify_capacity and self.arrival != "poisson":
            raise InputError("--verify-capacity re-runs the capacity a Poisson search found: add "
                             "--arrival poisson --p99-ms BOUND")


# ----------------------------------------------------------------------------- predict
PREDICT_PRECISIONS = ("auto", "fp32", "int8", "fp16")
OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class PredictOptions:
    """``predict``: what runs the model, and how the streaming engine feeds it."""

    top_k: int = 5
    provider: str = "cpu"
    runtime: str | None = None  # None: auto picks it; otherwise ort unless given
    # auto: the fastest (backend, precision) whose gate passed for this bundle on this CPU
    # (OpenVINO's own choice among them), else fp32.
    precision: str = "auto"
    batch: int = 8
    workers: int | None = None  # decode processes; None: measured split of the cores
    threads: int | None = None  # runtime threads; None: measured split of the cores
    max_wait_ms: float = 50.0
    fast_decode: bool = False
    output: str | None = None  # .jsonl or .csv; None: stdout
    resume: bool = False

    def check(self) -> None:
        if self.top_k < 1:
            raise InputError(f"--top-k {self.top_k} must be at least 1")
        if self.precision not in PREDICT_PRECISIONS:
            raise InputError(f"unknown --precision {self.precision!r}; choose from: "
                             f"{', '.join(PREDICT_PRECISIONS)}")
        if self.batch < 1:
            raise InputError(f"--batch-size {self.batch} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers {self.workers} must be >= 0 (0 decodes in this process)")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads} must be at least 1")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms {self.max_wait_ms} must be >= 0")
        if self.output is not None and output_format(self.output) is None:
            raise InputError(f"--output {self.output!r}: the suffix chooses the format; use "
                             f"{' or '.join(OUTPUT_FORMATS)}")
        if self.resume and self.output is None:
            raise InputError("--resume needs --output FILE (the results so far are read from it)")


def output_format(path: str) -> str | None:
    from pathlib import PurePath

    return OUTPUT_FORMATS.get(PurePath(path).suffix.lower())


# ----------------------------------------------------------------------------- serving
@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = SERVER_MAX_BATCH
    queue_delay_us: int = SERVER_QUEUE_DELAY_US
    instances: int = 1
    threads: int | None = None
    precision: str = "fp32"
    max_request_mb: float | None = None  # None: fits the largest batch (serving.guard.default_limit)

    def check(self) -> None:
        for flag, port in (("--port", self.port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise InputError(f"{flag} {port} is not a TCP port (1..65535)")
        if len({self.port, self.grpc_port, self.metrics_port}) != 3:
            raise InputError(f"--port, --grpc-port and --metrics-port must differ (got {self.port}, "
                             f"{self.grpc_port}, {self.metrics_port})")
        if self.max_batch_size < 1 or self.instances < 1 or self.queue_delay_us < 0:
            raise InputError("--max-batch-size and --instances must be >= 1 and --queue-delay-us >= 0")
        if self.max_request_mb is not None and not self.max_request_mb > 0:
            raise InputError(f"--max-request-mb {self.max_request_mb:g} must be > 0")


TRITON_TARGETS = ("cpu", "gpu")
TRITON_GPU_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TritonOptions:
    """``deploy triton``: the model repository for a standalone Triton."""

    name: str | None = None
    target: str = "cpu"  # cpu: KIND_CPU instances; gpu: KIND_GPU + the TensorRT accelerator
    precision: str | None = None  # gpu: fp32, fp16 or int8 (default fp16)
    max_batch_size: int = 64
    instances: int = 1
    queue_delay_us: int = DEPLOY_QUEUE_DELAY_US
    # ONNX Runtime's intra-op threads per instance (None: ORT's default, every core it sees,
    # which in a container is the node's, not the pod's)
    threads: int | None = None

    def check(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads} must be at least 1")
        if self.target not in TRITON_TARGETS:
            raise InputError(f"unknown --target {self.target!r}; choose from: "
                             f"{', '.join(TRITON_TARGETS)}")
        if self.precision is not None and self.precision not in TRITON_GPU_PRECISIONS:
            raise InputError(f"--precision {self.precision!r} is not one of "
                             f"{', '.join(TRITON_GPU_PRECISIONS)}")
        if self.precision not in (None, "fp32") and self.target != "gpu":
            raise InputError(f"--precision {self.precision} picks the TensorRT precision of a GPU "
                             f"target; add --target gpu (CPU instances run the fp32 model)")
        if self.max_batch_size < 1:
            raise InputError(f"--max-batch-size {self.max_batch_size} must be at least 1")
        if self.instances < 1:
            raise InputError(f"--instances {self.instances} must be at least 1")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise InputError(f"--name {self.name!r} must use letters, digits, '_', '.' and '-' only")


# The share of its measured capacity each replica is planned to carry (report --target-rate,
# deploy kubernetes): below the 90% that bench --verify-capacity confirms, with room to lose a
# replica in a rolling update while the autoscaler reacts (README, "Choosing a device").
HEADROOM = 0.8


@dataclass(frozen=True)
class KubernetesOptions:
    """``deploy kubernetes``: the Triton repository (``triton``) and how the cluster runs it."""

    triton: TritonOptions = TritonOptions()
    latency: str | None = None  # the latency.json sizing the pods (default: the bundle's)
    replicas: int | None = None  # a fixed count: no autoscaler
    target_rate: str | None = None  # "400 images/s": size the count from the capacity
    p99_ms: float | None = None
    headroom: float = HEADROOM
    max_replicas: int | None = None  # the autoscaler's ceiling (default: twice the minimum)
    kserve: bool = False  # a KServe InferenceService instead of the Deployment and Service
    model_image: str | None = None  # the image that carries the repository
    storage_uri: str | None = None  # --kserve: where KServe fetches the repository from
    namespace: str | None = None

    def check(self) -> None:
        self.triton.check()
        if self.replicas is not None and self.target_rate is not None:
            raise InputError("--replicas fixes the count and --target-rate sizes it: give one")
        if self.replicas is not None and not 1 <= self.replicas <= 1000:
            raise InputError(f"--replicas {self.replicas} must be from 1 to 1000")
        if self.target_rate is not None and self.p99_ms is None:
            raise InputError("--target-rate sizes the replicas from the capacity measured within "
                             "a p99 bound: give it with --p99-ms, e.g. --p99-ms 100")
        if self.p99_ms is not None and not self.p99_ms > 0:
            raise InputError(f"--p99-ms {self.p99_ms:g} must be more than 0")
        if not 0 < self.headroom <= 1:
            raise InputError(f"--headroom {self.headroom:g} must be in (0, 1]: the share of the "
                             f"measured capacity each replica is planned to carry")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise InputError(f"--max-replicas {self.max_replicas} must be at least 1")
        if self.storage_uri is not None and not self.kserve:
            raise InputError("--storage-uri tells KServe where the repository is: add --kserve "
                             "(the plain Deployment copies it from --model-image)")
        if self.namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
                                                           self.namespace):
            raise InputError(f"--namespace {self.namespace!r} is not a Kubernetes namespace name "
                             f"(lowercase letters, digits and '-', at most 63)")


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelOptions:
    """Which model a stage builds and where its bundle goes: the choice export, train and run
    share. The CLI's options, the API's keyword defaults and TrainOptions all read these
    defaults, so each is written once."""

    arch: str = "resnet18"
    weights: str = "random"  # random (seeded) | imagenet
    seed: int = 0
    classes: tuple[str, ...] | None = None  # class names; None: the arch's or the data's
    out: str | None = None  # None: bundle_root/<arch>

    BUNDLE_ROOT = "exported"  # where bundles go when no --out is given

    def bundle_dir(self, arch: str | None = None) -> str:
        """``out``, or ``exported/<arch>`` for the model actually built."""
        return self.out or os.path.join(self.BUNDLE_ROOT, arch or self.arch)


MODEL = ModelOptions()

# ----------------------------------------------------------------------------- train and run
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "plateau", "none")


@dataclass
class TrainOptions:
    arch: str = MODEL.arch
    data: str = "synthetic"
    out: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: 0.05 for SGD, 1e-3 for Adam and AdamW
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    weights: str = MODEL.weights
    freeze_backbone: bool = False
    input_size: int | None = None
    val_split: float = 0.2
    seed: int = MODEL.seed
    # DataLoader worker processes; None: none for the synthetic shapes (in memory already:
    # workers would only take cores from training), 2 for files to decode
    workers: int | None = None
    device: str = "auto"
    resume: str | None = None
    synthetic_per_class: int = 500
    progress: bool = True

    def check(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs {self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size} must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose from: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose from: {', '.join(SCHEDULES)}")
        if not 0.0 < self.val_split < 1.0:
            raise InputError(f"--val-split {self.val_split} must be between 0 and 1 (exclusive), e.g. 0.2")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"--label-smoothing {self.label_smoothing} must be in [0, 1)")
        if self.lr is not None and self.lr <= 0:
            raise InputError(f"--lr {self.lr} must be positive")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers {self.workers} must be >= 0")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 1e-3)

    @property
    def loader_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if self.data == "synthetic" else 2


@dataclass(frozen=True)
class RunOptions:
    """What ``run`` does differently from the stages' own defaults: a smaller training batch
    and fewer epochs (the fewest that still reach 100% validation accuracy on the synthetic
    shapes, measured in benchmarks/results/run.md), and a shorter bench over the backends a
    first look needs."""

    batch_size: int = 16
    epochs: int = 8
    backends: tuple[str, ...] = ("torch-cpu", "torchscript-cpu", "ort-cpu", "openvino-cpu",
                                 "torch-cuda", "ort-cuda")
    batch_sizes: tuple[int, ...] = (1, 8)
    bench_seconds: float = 2.0
    bench_iterations: int = 100


# ----------------------------------------------------------------------------- parsing
SWEEP = "sweep"


def batch_list(value: str | Iterable[int]) -> tuple[int, ...]:
    """``--batch-sizes``: ``sweep`` (an empty tuple: find the throughput peak) or a list."""
    if isinstance(value, str) and value.strip().lower() == SWEEP:
        return ()
    return int_list(value, "--batch-sizes")


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


def names(value: str | Iterable[str] | None) -> str | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``"a,b"`` (the CLI's spelling, parsed in one place)."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(v) for v in value)


def joined(values: Iterable[object]) -> str:
    """A tuple default as the CLI shows and parses it: (1, 8, 32) -> "1,8,32"."""
    return ",".join(str(v) for v in values)
