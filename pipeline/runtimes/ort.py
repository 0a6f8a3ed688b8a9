"""ONNX Runtime: one session on one execution provider (CPU, CUDA, TensorRT), optionally with
IO binding. The provider is read back from the session with ``get_providers()``: a session
that silently fell back to the CPU is refused with the reason, never reported as CUDA."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.bundle import sha256_of
from pipeline.core.console import captured
from pipeline.core.machine import installed_ort_distributions, library_versions
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.formats.onnx import graph_input
from pipeline.runtimes.base import Runner, cuda_problem

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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
        no_gpu = cuda_problem()
        if no_gpu:  # the same words as every other GPU backend's, so reports group them
            return no_gpu
        problem = tensorrt_problem() if provider == "tensorrt" else None
        if problem:
            return f"{wanted} is listed but cannot run: {problem}"
    return None


class OrtRunner(Runner):
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
        self.name = "ort"  # the registry names it after its backend
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.iobinding = iobinding and provider != "cpu"
        self.precision = precision
        self.model_path = Path(path)
        self._ort = ort
        self._options, self._providers = options, providers

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def intermediates(self, batch: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
        """Run a copy of the model that also returns ``tensors``, on the same provider and
        options. Marking a tensor as an output keeps ORT from fusing it away, so a layer's
        value is its own, not a fused neighbour's."""
        import onnx

        from pipeline.formats.layers import with_outputs

        proto = with_outputs(onnx.load(str(self.model_path)), tensors)
        session = self._ort.InferenceSession(proto.SerializeToString(), sess_options=self._options,
                                             providers=self._providers)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        values = session.run(tensors, {self.input_name: batch})
        return dict(zip(tensors, values))

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

    def close(self) -> None:
        self.session = None


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

def _open_session(ort: Any, path: Path | str, options: Any, providers: list[Any]) -> Any:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf classes
        if "Protobuf parsing failed" in str(exc) or "INVALID_PROTOBUF" in str(exc):
            raise InputError(f"{str(path)!r} is not an ONNX model; give a .onnx file "
                             f"written by `python -m pipeline export`") from None
        raise


def open_runner(backend: Any, path: Path, precision: str, *, threads: int | None = None,
                bundle: Any = None) -> OrtRunner:
    """The registry's way in: a session as ``backend`` (its provider, IO binding) says."""
    return OrtRunner(path, provider=backend.provider or "cpu", threads=threads,
                     iobinding=backend.iobinding, precision=precision)
