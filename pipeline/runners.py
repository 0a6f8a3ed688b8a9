"""One runner per runtime with one interface: ``infer(batch: ndarray) -> ndarray``.

Runners say which device, provider and precision they really use. For ONNX Runtime the
provider is read back from the session with ``get_providers()``: a session that silently fell
back to the CPU is refused with the reason, never reported as CUDA. For OpenVINO the inference
precision is read back from the compiled model (``INFERENCE_PRECISION_HINT``), never assumed.

Which runner serves which backend name and precision is decided in ``pipeline.backends``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from pipeline.console import captured
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.machine import installed_ort_distributions

if TYPE_CHECKING:
    import torch

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class Runner(Protocol):
    name: str
    device: str
    provider: str
    precision: str
    model_path: Path | None

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def timed_step(self, batch: np.ndarray) -> tuple[Callable[[], None], str]:
        """The call to time for ``batch`` and where its input and output live (host/device)."""
        ...

    def metadata(self) -> dict[str, str]:
        """The model file's metadata_props (class names, preprocessing ...), if it has any."""
        ...

    def synchronize(self) -> None: ...


class HostStep:
    """``timed_step`` for runners whose input and output live in host memory."""

    def timed_step(self, batch: np.ndarray) -> tuple[Callable[[], None], str]:
        return (lambda: self.infer(batch)), "host"  # type: ignore[attr-defined]

    def metadata(self) -> dict[str, str]:
        return {}


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can."""
    import torch

    if not torch.backends.cuda.is_built():
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def use_strict_fp32() -> None:
    """Turn TF32 off so GPU numbers are fp32 like the CPU's (parity and fair timing)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class TorchRunner(HostStep):
    """Eager PyTorch or a TorchScript file, on ``cpu`` or ``cuda``; fp32, or bf16 autocast."""

    def __init__(self, model: "torch.nn.Module", *, device: str = "cpu", name: str = "torch",
                 precision: str = "fp32", model_path: Path | None = None) -> None:
        import torch

        if precision not in ("fp32", "bf16"):
            raise InputError(f"{name}-{device} runs fp32 or bf16, not {precision!r}")
        if device == "cuda":
            problem = cuda_problem()
            if problem:
                raise EnvironmentUnavailable(f"{name}-cuda: {problem}")
            use_strict_fp32()
        self.torch = torch
        self.device = device
        self.name = f"{name}-{device}"
        self.provider = f"torch:{device}"
        self.precision = precision
        self.model_path = model_path
        self._metadata: dict[str, str] = {}
        self.model = _in_eval_mode(model).to(device)
        if precision == "bf16":
            # autocast runs convolutions and matmuls in bf16 (oneDNN picks AMX/AVX512-BF16 where
            # present); channels_last is the layout those kernels want.
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_torchscript(cls, path: Path | str, *, device: str = "cpu") -> "TorchRunner":
        import warnings

        import torch

        problem = cuda_problem() if device == "cuda" else None
        if problem:
            raise EnvironmentUnavailable(f"torchscript-cuda: {problem}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation notice
            # map_location moves the constants that freezing folded into the graph as well;
            # a later .to(device) would move only parameters, and a frozen module has none.
            module = torch.jit.load(str(path), map_location=device)
        return cls(module, device=device, name="torchscript", model_path=Path(path))

    @classmethod
    def from_program(cls, path: Path | str, *, device: str = "cpu") -> "TorchRunner":
        """``model.pt2`` (a torch.export ExportedProgram), loaded the safe way, run eagerly."""
        from pipeline.pt2 import open_program

        problem = cuda_problem() if device == "cuda" else None
        if problem:
            raise EnvironmentUnavailable(f"torch-export-cuda: {problem}")
        program, metadata = open_program(path)
        if device == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        runner = cls(program.module(), device=device, name="torch-export", model_path=Path(path))
        runner._metadata = metadata
        return runner

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.precision == "bf16":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device, dtype=torch.bfloat16):
                    return self.model(tensor).float().cpu().numpy()
            return self.model(tensor).float().cpu().numpy()

    def infer_tensor(self, tensor: "torch.Tensor") -> "torch.Tensor":
        with self.torch.inference_mode():
            return self.model(tensor)

    def metadata(self) -> dict[str, str]:
        return self._metadata

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _in_eval_mode(model: "torch.nn.Module") -> "torch.nn.Module":
    try:
        return model.eval()
    except NotImplementedError:  # an ExportedProgram's module: exported in eval, it has no modes
        return model


class AotiRunner(TorchRunner):
    """An AOTInductor package: compiled kernels behind one call, no Python model code. It is
    called like a module, so TorchRunner's infer, metadata and synchronize serve it."""

    def __init__(self, path: Path | str, *, device: str = "cpu",
                 isa_flags: list[str] | None = None) -> None:
        # Not TorchRunner.__init__: there is no nn.Module to switch to eval or move.
        import torch

        from pipeline.pt2 import isa_problem, load_aoti

        if device == "cuda":
            problem = cuda_problem()
            if problem:
                raise EnvironmentUnavailable(f"aoti-cuda: {problem}")
            use_strict_fp32()
            # The package's kernels are loaded through the driver API, which needs a current
            # context; in a fresh process (bench's worker) nothing has made one yet, and the
            # load crashed there (SIGSEGV on an H200) while it ran after other CUDA work.
            torch.cuda.init()
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
        else:
            problem = isa_problem(isa_flags)
            if problem:
                raise EnvironmentUnavailable(f"aoti-cpu: {Path(path).name}: {problem}")
        self.torch = torch
        self.device = device
        self.name = f"aoti-{device}"
        self.provider = f"aoti:{device}"
        self.precision = "fp32"
        self.model_path = Path(path)
        self._metadata = {}
        self.model = load_aoti(self.model_path, device)


def _provider_options(provider: str, precision: str, model_path: Path) -> dict[str, Any]:
    if provider == "cuda":
        return {"device_id": 0, "use_tf32": 0}
    if provider == "tensorrt":
        return tensorrt_options(precision, model_path)
    return {}


def tensorrt_options(precision: str, model_path: Path) -> dict[str, Any]:
    """TensorRT EP options: fp16 from the fp32 graph, int8 from the QDQ model's own scales.

    Engines are cached per model sha256 and library versions, so a rebuilt model or an upgraded
    TensorRT never reuses a stale engine; the first session pays the build, later ones load it.
    """
    from pipeline.bundle import sha256_of
    from pipeline.machine import library_versions

    versions = library_versions()
    key = "-".join([sha256_of(model_path)[:16], precision,
                    str(versions.get("onnxruntime-gpu") or versions.get("onnxruntime")),
                    str(_trt_version())])
    cache = Path(model_path).parent / ".trt_cache" / key
    cache.mkdir(parents=True, exist_ok=True)
    options = {"device_id": 0, "trt_fp16_enable": precision == "fp16",
               "trt_int8_enable": precision == "int8", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(cache)}
    return {**options, **tensorrt_profile(model_path)}


TRT_MAX_BATCH = 64


def tensorrt_profile(model_path: Path) -> dict[str, str]:
    """One optimisation profile over batch 1..TRT_MAX_BATCH, so a batch sweep builds one
    engine instead of rebuilding whenever a larger batch arrives."""
    import onnx

    from pipeline.export import graph_input

    first = graph_input(onnx.load(str(model_path), load_external_data=False).graph)
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim][1:]
    if not dims or not all(dims):
        return {}
    shape = "x".join(map(str, dims))
    return {"trt_profile_min_shapes": f"{first.name}:1x{shape}",
            "trt_profile_opt_shapes": f"{first.name}:8x{shape}",
            "trt_profile_max_shapes": f"{first.name}:{TRT_MAX_BATCH}x{shape}"}


def _trt_version() -> str | None:
    from importlib import metadata

    for name in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt", "tensorrt-cu13-libs"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _load_failure_reason(log_text: str) -> str:
    """The useful line from ORT's log when a provider failed to load (e.g. libcudnn missing).

    A provider library that cannot be loaded is reported as ``Failed to load library
    .../libonnxruntime_providers_X.so with error: libY.so.N: cannot open shared object file``
    after a long source-location prefix; only the library and the loader's error are kept.
    """
    for line in log_text.splitlines():
        failed = re.search(r"Failed to load library \S*?([^/\s]+\.so[.\d]*) with error: (.*)", line)
        if failed:
            return f"cannot load {failed.group(1)}: {failed.group(2).strip()[:200]}"
        if re.search(r"(\.so|Failed|failed|error|Error)", line):
            return re.sub(r"^.*?\] ", "", line).strip()[:300]
    return "the provider failed to initialise (no reason in ONNX Runtime's log)"


# What onnxruntime-gpu 1.31's libonnxruntime_providers_tensorrt.so links (readelf -d).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")


def tensorrt_problem() -> str | None:
    """Why TensorRT's own libraries cannot be loaded, or None.

    ORT's TensorRT provider links libnvinfer and libnvonnxparser, which the ``tensorrt`` extra
    installs under site-packages/tensorrt_libs, off the loader's path: importing
    ``tensorrt_libs`` loads them into the process first (as ``import tensorrt`` does), after
    which the provider finds them.
    """
    import ctypes

    try:
        import tensorrt_libs  # noqa: F401  loads libnvinfer and its siblings
    except ImportError:
        pass
    missing = []
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    if not missing:
        return None
    return (f"TensorRT 10 is not installed ({', '.join(missing)} not found); install it with: "
            f"pip install -e \".[tensorrt]\" (or put a system TensorRT 10 on the loader's path)")


def ort_provider_problem(provider: str) -> str | None:
    """Why ``provider`` cannot be used before any session is made, or None."""
    import onnxruntime as ort

    installed = installed_ort_distributions()
    if len(installed) > 1:
        return (f"both {' and '.join(installed)} are installed and overwrite each other; "
                f"pip uninstall both, then install only onnxruntime-gpu")
    wanted = ORT_PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        return f"{wanted} is not in this onnxruntime build ({', '.join(installed) or 'unknown'})"
    if provider != "cpu":
        problem = cuda_problem() or (tensorrt_problem() if provider == "tensorrt" else None)
        if problem:
            return f"{wanted} is listed but cannot run: {problem}"
    return None


class OrtRunner:
    """An ONNX Runtime session on one execution provider, optionally with IO binding.

    ``precision`` names the model file's precision (fp32, int8 QDQ, fp16 with fp32 IO); for
    TensorRT it also switches the engine's fp16/int8 mode.
    """

    def __init__(self, path: Path | str, *, provider: str = "cpu", threads: int | None = None,
                 iobinding: bool = False, precision: str = "fp32") -> None:
        import onnxruntime as ort

        if provider not in ORT_PROVIDERS:
            raise InputError(f"unknown provider {provider!r}; choose from: {', '.join(ORT_PROVIDERS)}")
        problem = ort_provider_problem(provider)
        if problem:
            raise EnvironmentUnavailable(f"ort-{provider}: {problem}")
        if provider != "cpu":
            _preload_cuda_libraries()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = ORT_PROVIDERS[provider]
        providers: list[Any] = [(wanted, _provider_options(provider, precision, Path(path)))]
        if provider != "cpu":
            providers.append("CPUExecutionProvider")
        with captured() as chatter:
            self.session = _open_session(ort, path, options, providers)
        actual = self.session.get_providers()
        if actual[0] != wanted:
            raise EnvironmentUnavailable(
                f"ort-{provider}: {wanted} was requested but the session runs on {actual[0]}: "
                f"{_load_failure_reason(chatter.text)}")
        self.provider = actual[0]
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.name = f"ort-{provider}" + ("-iobinding" if iobinding else "")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.iobinding = iobinding and provider != "cpu"
        self.precision = precision
        self.model_path = Path(path)
        self._ort = ort

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def timed_step(self, batch: np.ndarray) -> tuple[Callable[[], None], str]:
        """With IO binding, input and output stay on the GPU: only the model is timed."""
        if self.iobinding:
            binding = self.bind_on_device(batch)
            return (lambda: self.run_bound(binding)), "device"
        return (lambda: self.infer(batch)), "host"

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def bind_on_device(self, batch: np.ndarray) -> Any:
        """Copy ``batch`` to the GPU once and bind input and output there (for timing)."""
        ortvalue = self._ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(batch, dtype=np.float32), "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ortvalue)
        binding.bind_output(self.output_name, "cuda", 0)
        return binding

    def run_bound(self, binding: Any) -> None:
        self.session.run_with_iobinding(binding)

    def synchronize(self) -> None:
        """ORT's ``run`` returns after the device work is done; nothing to wait for."""


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the pip-installed NVIDIA wheels that torch brought along."""
    import onnxruntime as ort

    try:
        import torch  # noqa: F401  torch's import puts its CUDA libraries in the process
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            with captured():
                preload(cuda=True, cudnn=True, msvc=False)
    except Exception:  # a failed preload shows up as a provider fallback, read back later
        pass


OPENVINO_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def openvino_problem() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed; install it with: pip install -e \".[openvino]\""
    return None


class OpenVinoRunner(HostStep):
    """An ONNX model compiled by OpenVINO for its CPU plugin.

    ``precision``: ``fp32`` pins the inference precision to f32; ``auto`` leaves the choice to
    OpenVINO (bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere); ``int8`` compiles the QDQ
    model. The precision OpenVINO really uses is read back from the compiled model.
    """

    def __init__(self, path: Path | str, *, precision: str = "fp32", threads: int | None = None) -> None:
        problem = openvino_problem()
        if problem:
            raise EnvironmentUnavailable(f"openvino-cpu: {problem}")
        import openvino as ov

        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses on bad files
            raise InputError(f"{str(path)!r} cannot be read by OpenVINO "
                             f"({str(exc).strip().splitlines()[0][:200]})") from None
        self._metadata = _openvino_metadata(model)
        with captured():
            self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.inference_precision = OPENVINO_PRECISIONS.get(chosen, chosen)
        self.requested_precision = precision
        # An int8 model runs int8 where it has quantize/dequantize pairs, the rest in
        # inference_precision; both are reported.
        self.precision = "int8" if precision == "int8" else self.inference_precision
        self.device = "cpu"
        self.name = "openvino-cpu"
        self.provider = f"openvino:CPU ({self.inference_precision})"
        self.model_path = Path(path)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def synchronize(self) -> None:
        """``infer`` is synchronous."""


def _openvino_metadata(model: Any) -> dict[str, str]:
    """ONNX metadata_props as OpenVINO keeps them, under rt_info['framework']."""
    try:
        framework = model.get_rt_info()["framework"]  # an RTMap: [] but no .get()
        return {key: value.astype(str) for key, value in framework.items()}
    except Exception:  # a model without the section (not from ONNX): no metadata
        return {}


def _open_session(ort: Any, path: Path | str, options: Any, providers: list[Any]) -> Any:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf classes
        if "Protobuf parsing failed" in str(exc) or "INVALID_PROTOBUF" in str(exc):
            raise InputError(f"{str(path)!r} is not an ONNX model; give a .onnx file "
                             f"written by `python -m pipeline export`") from None
        raise
