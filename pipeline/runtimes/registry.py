"""The one backend registry: name -> runtime, device, precisions, the extra it needs, a factory.

bench, verify, predict and the CLI's ``--help`` all read ``BACKENDS``; nothing else spells a
backend name. A *target* is a (backend, precision) pair, written ``ort-cpu:int8`` on the
command line; a bare name means every precision that backend supports.

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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import machine
from pipeline.core.bundle import (
    AOTI_FILES,
    ONNX,
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


class VariantMissing(InputError):
    """The bundle lacks the model file a precision needs (exit 2: run quantize first)."""


@dataclass(frozen=True)
class Backend:
    name: str
    runtime: str  # torch | torchscript | torch-export | aoti | ort | openvino
    device: str  # cpu | cuda
    precisions: tuple[str, ...]
    summary: str
    extra: str | None = None  # the pip extra that installs it
    provider: str | None = None  # ONNX Runtime provider key (cpu, cuda, tensorrt)
    iobinding: bool = False
    gate_as: str | None = None  # a backend whose verify result covers this one
    throughput: bool = False  # OpenVINO's THROUGHPUT hint: streams and an async request queue

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise InputError(f"{self.name} does not run precision {precision!r}; it runs: "
                             f"{', '.join(self.precisions)}")

    def model_file(self, bundle: Bundle, precision: str) -> Path:
        """The bundle file this backend reads at ``precision``; a missing variant is exit 2."""
        self.check_precision(precision)
        if self.runtime == "torch":
            return bundle.path(WEIGHTS)
        if self.runtime == "torchscript":
            return bundle.path(TORCHSCRIPT)
        if self.runtime in ("torch-export", "aoti"):
            name = PT2 if self.runtime == "torch-export" else AOTI_FILES[self.device]
            if not bundle.path(name).is_file():
                option = " --aoti" if self.runtime == "aoti" else ""
                raise VariantMissing(f"{bundle.root} has no {name} for {self.name}; make it with: "
                                     f"python -m pipeline export --checkpoint "
                                     f"{bundle.root}/weights.pt --out {bundle.root}{option}")
            return bundle.path(name)
        # TensorRT builds its fp16 engine from the fp32 graph; an fp16 ONNX would add casts.
        name = PRECISION_FILES.get(precision) if not (self.provider == "tensorrt" and
                                                      precision == "fp16") else None
        path = bundle.path(name or bundle.fp32_onnx())
        if not path.is_file():
            raise VariantMissing(f"{bundle.root} has no {path.name} for {self.name}:{precision}; "
                                 f"make it with: python -m pipeline quantize {bundle.root} "
                                 f"--precision {precision}")
        return path

    def make(self, bundle: Bundle, precision: str = "fp32", *, threads: int | None = None) -> "Runner":
        """A runner for this backend at ``precision`` on ``bundle``'s model."""
        path = self.model_file(bundle, precision)
        if self.runtime == "aoti":
            from pipeline.runtimes.aoti import AotiRunner

            record = bundle.read_manifest().get("export", {}).get("aoti", {}).get(self.device, {})
            return AotiRunner(path, device=self.device, isa_flags=record.get("isa_flags"))
        return self.make_file(path, precision, threads=threads)

    def make_file(self, path: Path, precision: str = "fp32", *, threads: int | None = None) -> "Runner":
        """A runner for this backend on a given model file (a bare .onnx or .pt2, or one of a
        bundle's files that is not its default, such as the raw ONNX beside the simplified one).
        The runtime modules load here, so listing the registry stays light."""
        self.check_precision(precision)
        if self.runtime in ("torch", "torchscript", "torch-export"):
            from pipeline.runtimes.torch import TorchRunner

            if self.runtime == "torchscript":
                return TorchRunner.from_torchscript(path, device=self.device)
            if self.runtime == "torch-export":
                return TorchRunner.from_program(path, device=self.device)
            return TorchRunner.from_weights(path, device=self.device, precision=precision)
        if self.runtime == "aoti":
            from pipeline.runtimes.aoti import AotiRunner

            return AotiRunner(path, device=self.device)
        if self.runtime == "openvino":
            from pipeline.runtimes.openvino import OpenVinoRunner

            return OpenVinoRunner(path, precision=precision, threads=threads,
                                  throughput=self.throughput)
        from pipeline.runtimes.ort import OrtRunner

        return OrtRunner(path, provider=self.provider or "cpu", threads=threads,
                         iobinding=self.iobinding, precision=precision)

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


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch-cpu", "torch", "cpu", ("fp32", "bf16"), "eager PyTorch; bf16 = autocast"),
    Backend("torchscript-cpu", "torchscript", "cpu", ("fp32",), "the traced, frozen model.ts"),
    Backend("torch-export-cpu", "torch-export", "cpu", ("fp32",),
            "model.pt2, the torch.export ExportedProgram, run by PyTorch"),
    Backend("aoti-cpu", "aoti", "cpu", ("fp32",),
            "model.aoti-cpu.pt2, compiled by AOTInductor (export --aoti)"),
    Backend("ort-cpu", "ort", "cpu", ("fp32", "int8", "fp16"), "ONNX Runtime CPU provider",
            provider="cpu"),
    Backend("openvino-cpu", "openvino", "cpu", ("fp32", "auto", "int8"),
            "OpenVINO CPU plugin; auto = its own precision", extra="openvino"),
    Backend("openvino-cpu-throughput", "openvino", "cpu", ("fp32", "auto", "int8"),
            "OpenVINO CPU plugin in throughput mode: its streams, an async request queue",
            extra="openvino", gate_as="openvino-cpu", throughput=True),
    Backend("torch-cuda", "torch", "cuda", ("fp32",), "eager PyTorch on the GPU"),
    Backend("torchscript-cuda", "torchscript", "cuda", ("fp32",), "model.ts on the GPU"),
    Backend("torch-export-cuda", "torch-export", "cuda", ("fp32",), "model.pt2 on the GPU"),
    Backend("aoti-cuda", "aoti", "cuda", ("fp32",),
            "model.aoti-cuda.pt2, AOTInductor CUDA kernels (export --aoti on a GPU machine)"),
    Backend("ort-cuda", "ort", "cuda", ("fp32", "fp16"), "ONNX Runtime CUDA provider",
            provider="cuda"),
    Backend("ort-cuda-iobinding", "ort", "cuda", ("fp32", "fp16"),
            "CUDA provider, input and output resident on the GPU", provider="cuda",
            iobinding=True, gate_as="ort-cuda"),
    Backend("ort-tensorrt", "ort", "cuda", ("fp32", "fp16", "int8"),
            "ONNX Runtime TensorRT provider (engine cached per model)", extra="tensorrt",
            provider="tensorrt"),
)}

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
             "precisions": list(b.precisions), "extra": b.extra, "summary": b.summary}
            for b in BACKENDS.values()]


def served_model(bundle: Bundle, precision: str) -> "ServedModel":
    """The model a Triton server serves for ``bundle`` at ``precision``: the ONNX Runtime
    backend's file, its integrity checked, and the tensors a client must send."""
    from pipeline.runtimes.triton import ServedModel

    manifest = bundle.read_manifest()
    if ONNX not in manifest.get("artifacts", {}):
        raise InputError(f"{bundle.root} has no exported ONNX model; run: python -m pipeline "
                         f"export --out {bundle.root}")
    path = get_backend("ort-cpu").model_file(bundle, precision)
    bundle.check_integrity([path.name])
    return ServedModel.from_onnx(ModelSection.of(manifest, str(bundle.manifest_path)).arch, path)


def remote(url: str, model: "ServedModel") -> "Runner":
    """A runner that sends each batch to the Triton server at ``url`` serving ``model``."""
    from pipeline.runtimes.triton import TritonHttpRunner

    return TritonHttpRunner(url, model)
