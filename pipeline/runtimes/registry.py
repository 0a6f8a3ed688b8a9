"""The one backend registry: every fact about a backend, and the only place runners are made.

Each entry says what a backend is (runtime, device, precisions), which bundle file it reads at
each precision, which module opens it, and what it can do: be parity-checked at fp32 by
verify, return a layer's output (``verify --localize``), run ``predict``, run ``serve``'s model.
verify, bench, predict, serve and the CLI ask the registry and keep no lists of their own, so
a new runtime is one module (with ``open_runner``) plus one entry: in ``BUILT_IN`` below, or
from another package through the ``pipeline.backends`` entry-point group (each entry point
names a ``Backend``), which every process, bench's workers included, loads alike.

A *target* is a (backend, precision) pair, written ``ort-cpu:int8`` on the command line; a
bare name means every precision that backend supports.

Precisions:

- ``fp32``: the exported model as it is.
- ``int8``: ``model.int8.onnx``, static QDQ quantization written by ``python -m pipeline quantize``.
- ``fp16``: ``model.fp16.onnx`` (fp16 weights and compute, fp32 inputs and outputs) on ONNX
  Runtime; for TensorRT, an fp16 engine built from the fp32 model.
- ``bf16``: a runtime setting, not a file: torch autocast on the fp32 weights.
- ``auto``: OpenVINO's own choice of inference precision (bf16 on AMX/AVX512-BF16 CPUs, f32
  elsewhere), read back from the compiled model and reported as what it really was.

Module import stays light (no numpy, torch or runtimes) so ``--help`` can list the registry.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipeline.core import machine
from pipeline.core.bundle import (
    AOTI_FILES,
    ONNX_FP16,
    ONNX_INT8,
    PRECISION_FILES,
    PT2,
    TORCHSCRIPT,
    WEIGHTS,
    Bundle,
)
from pipeline.core.records import (  # noqa: F401  (target names re-exported)
    ModelSection,
    split_target,
    target_name,
)
from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.runtimes.base import Runner
    from pipeline.runtimes.triton import ServedModel

PRECISIONS = ("fp32", "int8", "fp16", "bf16", "auto")
REDUCED_PRECISIONS = ("int8", "fp16", "bf16", "auto")
ENTRY_POINT_GROUP = "pipeline.backends"

FP32_ONNX = "<fp32 onnx>"  # in ``files``: the bundle's fp32 ONNX (the simplified one, if made)
ONNX_FILES = "onnx-files"  # in ``parity``: each ONNX export (raw and simplified) is compared
MODEL_FILE = "model-file"  # in ``parity``: the one file the backend reads, where the bundle has it
ONNX_READS = {"fp32": FP32_ONNX, "int8": ONNX_INT8, "fp16": ONNX_FP16}


class VariantMissing(InputError):
    """The bundle lacks the model file a precision needs (exit 2: run quantize first)."""


@dataclass(frozen=True)
class Backend:
    name: str
    runtime: str  # torch | torchscript | torch-export | aoti | ort | openvino | a plugin's
    device: str  # cpu | cuda
    precisions: tuple[str, ...]
    summary: str
    module: str  # the runtime module; its ``open_runner(backend, path, precision, ...)`` opens it
    files: Mapping[str, str] = field(default_factory=dict, hash=False)  # precision -> file read
    extra: str | None = None  # the pip extra that installs it
    provider: str | None = None  # ONNX Runtime provider key (cpu, cuda, tensorrt)
    iobinding: bool = False
    gate_as: str | None = None  # a backend whose verify result covers this one
    throughput: bool = False  # OpenVINO's THROUGHPUT hint: streams and an async request queue
    parity: str | None = None  # ONNX_FILES, MODEL_FILE, or None (the reference, or gate_as)
    layers: bool = False  # its runner returns intermediate tensors (verify --localize)
    predict: bool = False  # predict may run it (and --precision auto choose it)
    serve: bool = False  # serve's model runs on it, inside Triton's Python backend

    @property
    def reads_onnx(self) -> bool:
        return self.files.get("fp32") == FP32_ONNX

    @property
    def verified_as(self) -> str:
        """The backend whose verify results stand for this one's."""
        return self.gate_as or self.name

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise InputError(f"{self.name} does not run precision {precision!r}; it runs: "
                             f"{', '.join(self.precisions)}")

    def file_name(self, bundle: Bundle, precision: str) -> str:
        self.check_precision(precision)
        name = self.files[precision]
        return bundle.fp32_onnx() if name == FP32_ONNX else name

    def model_file(self, bundle: Bundle, precision: str) -> Path:
        """The bundle file this backend reads at ``precision``; a missing one is exit 2 with
        the command that makes it."""
        name = self.file_name(bundle, precision)
        path = bundle.path(name)
        if not path.is_file():
            raise VariantMissing(f"{bundle.root} has no {name} for {self.name}:{precision}; "
                                 f"make it with: {_made_by(bundle, name, precision)}")
        return path

    def make(self, bundle: Bundle, precision: str = "fp32", *, threads: int | None = None) -> "Runner":
        """A runner for this backend at ``precision`` on ``bundle``'s model."""
        return self._open(self.model_file(bundle, precision), precision, threads, bundle)

    def make_file(self, path: Path, precision: str = "fp32", *, threads: int | None = None) -> "Runner":
        """A runner for this backend on a given model file (a bare .onnx or .pt2, or one of a
        bundle's files that is not its default, such as the raw ONNX beside the simplified one).
        The runtime module loads here, so listing the registry stays light."""
        self.check_precision(precision)
        return self._open(Path(path), precision, threads, None)

    def _open(self, path: Path, precision: str, threads: int | None, bundle: Bundle | None) -> "Runner":
        runner = importlib.import_module(self.module).open_runner(self, path, precision,
                                                                  threads=threads, bundle=bundle)
        runner.name = self.name
        return runner

    def availability_problem(self, *, with_cuda: bool = True) -> str | None:
        """Why this backend cannot run on this machine at all (an extra not installed, no GPU,
        no such ORT provider), or None; ``with_cuda=False`` rules out every GPU backend."""
        if self.runtime == "openvino":
            from pipeline.runtimes.openvino import openvino_problem

            return openvino_problem()
        if self.device == "cuda":
            if not with_cuda:
                return "--cpu-only"
            if self.runtime == "ort":
                from pipeline.runtimes.ort import ort_provider_problem

                return ort_provider_problem(self.provider or "cuda")
            from pipeline.runtimes.base import cuda_problem

            return cuda_problem()
        return None

    def precision_problem(self, precision: str, *, timed: bool = True) -> str | None:
        """Why this CPU cannot run ``precision`` fast on this backend. bf16 without its units
        is neither timed nor gated (emulation is slow, and nobody deploys it); fp16 on a CPU
        is still gated (it checks the GPU's file) but never timed."""
        if self.device != "cpu":
            return None
        if self.runtime == "torch" and precision == "bf16" and not machine.cpu_has_fast_bf16():
            return ("this CPU has no bf16 units (needs amx_bf16 or avx512_bf16); torch would "
                    "emulate bf16 and run slower than fp32")
        if timed and precision == "fp16" and not machine.cpu_flags().get("avx512_fp16"):
            return ("this CPU has no fp16 arithmetic (avx512_fp16): fp16 is a GPU format here; "
                    "verify still checks model.fp16.onnx on the CPU")
        return None


def _made_by(bundle: Bundle, name: str, precision: str) -> str:
    """The command that writes bundle file ``name``."""
    if name in PRECISION_FILES.values():
        return f"python -m pipeline quantize {bundle.root} --precision {precision}"
    aoti = " --aoti" if name in AOTI_FILES.values() else ""
    return f"python -m pipeline export --checkpoint {bundle.root}/{WEIGHTS} --out {bundle.root}{aoti}"


TORCH = "pipeline.runtimes.torch"
ORT = "pipeline.runtimes.ort"
OPENVINO = "pipeline.runtimes.openvino"
AOTI = "pipeline.runtimes.aoti"

BUILT_IN: tuple[Backend, ...] = (
    Backend("torch-cpu", "torch", "cpu", ("fp32", "bf16"), "eager PyTorch; bf16 = autocast",
            TORCH, {"fp32": WEIGHTS, "bf16": WEIGHTS}),
    Backend("torchscript-cpu", "torchscript", "cpu", ("fp32",), "the traced, frozen model.ts",
            TORCH, {"fp32": TORCHSCRIPT}, parity=MODEL_FILE),
    Backend("torch-export-cpu", "torch-export", "cpu", ("fp32",),
            "model.pt2, the torch.export ExportedProgram, run by PyTorch", TORCH, {"fp32": PT2},
            parity=MODEL_FILE, layers=True, predict=True),
    Backend("aoti-cpu", "aoti", "cpu", ("fp32",),
            "model.aoti-cpu.pt2, compiled by AOTInductor (export --aoti)", AOTI,
            {"fp32": AOTI_FILES["cpu"]}, parity=MODEL_FILE),
    Backend("ort-cpu", "ort", "cpu", ("fp32", "int8", "fp16"), "ONNX Runtime CPU provider",
            ORT, ONNX_READS, provider="cpu", parity=ONNX_FILES, layers=True, predict=True,
            serve=True),
    Backend("openvino-cpu", "openvino", "cpu", ("fp32", "auto", "int8"),
            "OpenVINO CPU plugin; auto = its own precision", OPENVINO,
            {"fp32": FP32_ONNX, "auto": FP32_ONNX, "int8": ONNX_INT8}, extra="openvino",
            parity=MODEL_FILE, predict=True),
    Backend("openvino-cpu-throughput", "openvino", "cpu", ("fp32", "auto", "int8"),
            "OpenVINO CPU plugin in throughput mode: its streams, an async request queue",
            OPENVINO, {"fp32": FP32_ONNX, "auto": FP32_ONNX, "int8": ONNX_INT8},
            extra="openvino", gate_as="openvino-cpu", throughput=True),
    Backend("torch-cuda", "torch", "cuda", ("fp32",), "eager PyTorch on the GPU", TORCH,
            {"fp32": WEIGHTS}),
    Backend("torchscript-cuda", "torchscript", "cuda", ("fp32",), "model.ts on the GPU", TORCH,
            {"fp32": TORCHSCRIPT}, parity=MODEL_FILE),
    Backend("torch-export-cuda", "torch-export", "cuda", ("fp32",), "model.pt2 on the GPU",
            TORCH, {"fp32": PT2}, parity=MODEL_FILE, predict=True),
    Backend("aoti-cuda", "aoti", "cuda", ("fp32",),
            "model.aoti-cuda.pt2, AOTInductor CUDA kernels (export --aoti on a GPU machine)",
            AOTI, {"fp32": AOTI_FILES["cuda"]}, parity=MODEL_FILE),
    Backend("ort-cuda", "ort", "cuda", ("fp32", "fp16"), "ONNX Runtime CUDA provider", ORT,
            {"fp32": FP32_ONNX, "fp16": ONNX_FP16}, provider="cuda", parity=ONNX_FILES,
            predict=True),
    Backend("ort-cuda-iobinding", "ort", "cuda", ("fp32", "fp16"),
            "CUDA provider, input and output resident on the GPU", ORT,
            {"fp32": FP32_ONNX, "fp16": ONNX_FP16}, provider="cuda", iobinding=True,
            gate_as="ort-cuda"),
    # TensorRT builds its fp16 engine from the fp32 graph; an fp16 ONNX would add casts.
    Backend("ort-tensorrt", "ort", "cuda", ("fp32", "fp16", "int8"),
            "ONNX Runtime TensorRT provider (engine cached per model)", ORT,
            {"fp32": FP32_ONNX, "fp16": FP32_ONNX, "int8": ONNX_INT8}, extra="tensorrt",
            provider="tensorrt"),
)


def _plugins() -> list[Backend]:
    """Backends other packages add through the ``pipeline.backends`` entry-point group."""
    from importlib.metadata import entry_points

    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            backend = point.load()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop every command
            print(f"warning: backend plugin {point.name!r} ({point.value}) cannot be loaded: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if not isinstance(backend, Backend):
            print(f"warning: backend plugin {point.name!r} ({point.value}) is not a "
                  f"pipeline.runtimes.registry.Backend; ignored", file=sys.stderr)
            continue
        found.append(backend)
    return found


def _table(backends: list[Backend]) -> dict[str, Backend]:
    table: dict[str, Backend] = {}
    for backend in backends:
        if backend.name in table:
            print(f"warning: backend {backend.name!r} is registered twice; the first one is "
                  f"used", file=sys.stderr)
            continue
        table[backend.name] = backend
    return table


BACKENDS: dict[str, Backend] = _table([*BUILT_IN, *_plugins()])


# Not timed by default: fp16 on a CPU is a correctness check of the file, not a deployment.
UNTIMED_BY_DEFAULT = {("ort-cpu", "fp16")}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}") from None


def check_precision_name(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    return precision


def parse_targets(text: str | None, precisions: str | None = None) -> tuple[tuple[str, str], ...]:
    """``ort-cpu,openvino-cpu:auto`` -> ((ort-cpu, fp32), (ort-cpu, int8), (openvino-cpu, auto)).

    A bare name expands to every precision it runs (less the untimed ones), filtered by
    ``precisions`` (comma-separated) when given.
    """
    wanted = None
    if precisions:
        wanted = {check_precision_name(p.strip()) for p in precisions.split(",") if p.strip()}
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(BACKENDS)
    if not names:
        raise InputError(f"--backends {text!r} names no backend; choose from: {', '.join(BACKENDS)}")
    targets: list[tuple[str, str]] = []
    for item in names:
        name, _, precision = item.partition(":")
        backend = get_backend(name)
        if precision:
            backend.check_precision(check_precision_name(precision))
            chosen = [precision]
        else:
            chosen = [p for p in backend.precisions if (name, p) not in UNTIMED_BY_DEFAULT]
        chosen = [p for p in chosen if wanted is None or p in wanted]
        targets += [(name, p) for p in chosen if (name, p) not in targets]
    if not targets:
        raise InputError(f"--backends {text!r} with --precisions {precisions!r} leaves nothing "
                         f"to run; each backend's precisions: {registry_help()}")
    return tuple(targets)


def registry_help() -> str:
    """One line per backend for ``--help``: name (precisions) [extra]."""
    return "; ".join(f"{b.name} ({', '.join(b.precisions)})" + (f" [extra {b.extra}]" if b.extra else "")
                     for b in BACKENDS.values())


def describe_registry() -> list[dict[str, Any]]:
    return [{"name": b.name, "runtime": b.runtime, "device": b.device,
             "precisions": list(b.precisions), "extra": b.extra, "summary": b.summary,
             "module": b.module, "parity": b.parity, "layers": b.layers, "predict": b.predict,
             "serve": b.serve}
            for b in BACKENDS.values()]


# ----------------------------------------------------------------------------- what can do what
def parity_backends(*, with_cuda: bool) -> list[Backend]:
    """The backends verify compares at fp32 against the float64 floor."""
    return [b for b in BACKENDS.values() if b.parity and (with_cuda or b.device == "cpu")]


def layer_backends() -> list[Backend]:
    """The backends whose runners return intermediate tensors (``verify --localize``)."""
    return [b for b in BACKENDS.values() if b.layers]


def int8_layer_backend() -> Backend:
    """The backend that localizes int8's error layer by layer: a CPU one with layers and int8."""
    return next(b for b in layer_backends() if "int8" in b.precisions and b.device == "cpu")


def predict_backends() -> list[Backend]:
    return [b for b in BACKENDS.values() if b.predict]


def predict_backend(runtime: str, provider: str) -> Backend:
    """The backend predict runs for ``--runtime``/``--provider``."""
    device = "cuda" if provider != "cpu" else "cpu"
    for backend in predict_backends():
        if backend.runtime == runtime and backend.device == device and \
                backend.provider in (None, provider):
            return backend
    offers = sorted({f"--runtime {b.runtime} --provider {b.provider or b.device}"
                     for b in predict_backends()})
    raise InputError(f"predict has no backend for --runtime {runtime} --provider {provider}; "
                     f"it runs: {'; '.join(offers)}")


def served_backend() -> Backend:
    """The backend serve's model runs on, inside Triton's Python backend."""
    return next(b for b in BACKENDS.values() if b.serve)


def served_model(bundle: Bundle, precision: str) -> "ServedModel":
    """The model a Triton server serves for ``bundle`` at ``precision``: the ONNX Runtime
    backend's file, its integrity checked, and the tensors a client must send."""
    from pipeline.runtimes.triton import ServedModel

    manifest = bundle.read_manifest()
    bundle.require_export(manifest)
    path = served_backend().model_file(bundle, precision)
    bundle.check_integrity([path.name])
    return ServedModel.from_onnx(ModelSection.of(manifest, str(bundle.manifest_path)).arch, path)


def remote(url: str, model: "ServedModel") -> "Runner":
    """A runner that sends each batch to the Triton server at ``url`` serving ``model``."""
    from pipeline.runtimes.triton import TritonHttpRunner

    return TritonHttpRunner(url, model)
