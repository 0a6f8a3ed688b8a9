"""One runner per backend with one interface: ``infer(batch: ndarray) -> ndarray``.

Runners say which device and provider they really use. For ONNX Runtime that is read back
from the session with ``get_providers()``: a session that silently fell back to the CPU is
refused with the reason, never reported as CUDA.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def synchronize(self) -> None: ...


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


class TorchRunner:
    """Eager PyTorch or a TorchScript file, on ``cpu`` or ``cuda``."""

    def __init__(self, model: "torch.nn.Module", *, device: str = "cpu", name: str = "torch") -> None:
        import torch

        if device == "cuda":
            problem = cuda_problem()
            if problem:
                raise EnvironmentUnavailable(f"{name}-cuda: {problem}")
            use_strict_fp32()
        self.torch = torch
        self.device = device
        self.name = f"{name}-{device}"
        self.provider = f"torch:{device}"
        self.model = model.eval().to(device)

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
        return cls(module, device=device, name="torchscript")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.model(tensor).float().cpu().numpy()

    def infer_tensor(self, tensor: "torch.Tensor") -> "torch.Tensor":
        with self.torch.inference_mode():
            return self.model(tensor)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _provider_options(provider: str) -> dict[str, Any]:
    if provider == "cuda":
        return {"device_id": 0, "use_tf32": 0}
    if provider == "tensorrt":
        return {"device_id": 0, "trt_fp16_enable": False}
    return {}


def _load_failure_reason(log_text: str) -> str:
    """The useful line from ORT's log when a provider failed to load (e.g. libcudnn missing)."""
    for line in log_text.splitlines():
        if re.search(r"(\.so|Failed|failed|error|Error)", line):
            return re.sub(r"^.*?\] ", "", line).strip()[:300]
    return "the provider failed to initialise (no reason in ONNX Runtime's log)"


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
        problem = cuda_problem()
        if problem:
            return f"{wanted} is listed but cannot run: {problem}"
    return None


class OrtRunner:
    """An ONNX Runtime session on one execution provider, optionally with IO binding."""

    def __init__(self, path: Path | str, *, provider: str = "cpu", threads: int | None = None,
                 iobinding: bool = False) -> None:
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
        providers: list[Any] = [(wanted, _provider_options(provider))]
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
        self._ort = ort

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

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


def _open_session(ort: Any, path: Path | str, options: Any, providers: list[Any]) -> Any:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf classes
        if "Protobuf parsing failed" in str(exc) or "INVALID_PROTOBUF" in str(exc):
            raise InputError(f"{str(path)!r} is not an ONNX model; give a .onnx file "
                             f"written by `python -m pipeline export`") from None
        raise
