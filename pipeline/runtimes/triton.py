"""A Triton server as a runtime: ``infer`` sends the batch over HTTP (KServe v2, binary
tensors) to the server that serves a bundle's ONNX model, and returns its logits. predict uses
it with ``--server URL``; ``pipeline.serving`` is the server side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import EnvironmentUnavailable
from pipeline.formats.onnx import io_spec, read_onnx_metadata
from pipeline.runtimes.base import Runner

INSTALL_HINT = 'pip install -e ".[serving]"'


@dataclass
class ServedModel:
    """What a client and the server agree on: the model's name and its tensors."""

    name: str
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]
    classes: int
    model_file: Path

    @classmethod
    def from_onnx(cls, name: str, path: Path) -> "ServedModel":
        spec = io_spec(path)
        return cls(name=name, input_name=spec["input"], output_name=spec["output"],
                   input_shape=tuple(spec["input_dims"]), classes=int(spec["output_dims"][0]),
                   model_file=path)


def client_problem() -> str | None:
    """Why Triton's HTTP client cannot be used here, or None."""
    try:
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return f"the serving extra is not installed ({exc.name}); install it with: {INSTALL_HINT}"
    return None


class TritonHttpRunner(Runner):
    """The runner interface over a served model."""

    def __init__(self, url: str, model: ServedModel, *, timeout_s: float = 60.0) -> None:
        problem = client_problem()
        if problem:
            raise EnvironmentUnavailable(f"--server: {problem}")
        import tritonclient.http as http

        self.http = http
        self.model = model
        self.url = url.removeprefix("http://").rstrip("/")
        self.name = "triton-http"
        self.device = "server"
        self.provider = f"triton:{self.url}"
        self.precision = "fp32"
        self.model_path = model.model_file
        self.client = http.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                 network_timeout=timeout_s)
        try:
            ready = self.client.is_model_ready(model.name)
        except Exception as exc:  # connection refused, DNS, timeout: the server is not there
            raise EnvironmentUnavailable(f"no Triton server answers at {url} ({type(exc).__name__}: "
                                         f"{str(exc)[:120]}); start one with python -m pipeline "
                                         f"serve BUNDLE") from None
        if not ready:
            raise EnvironmentUnavailable(f"the server at {url} has no ready model {model.name!r}")

    def infer(self, batch: Any) -> Any:
        import numpy as np

        request = self.http.InferInput(self.model.input_name, list(batch.shape), "FP32")
        request.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        wanted = self.http.InferRequestedOutput(self.model.output_name, binary_data=True)
        result = self.client.infer(self.model.name, [request], outputs=[wanted])
        return result.as_numpy(self.model.output_name)

    def metadata(self) -> dict[str, str]:
        return read_onnx_metadata(self.model.model_file)

    def close(self) -> None:
        self.client.close()
