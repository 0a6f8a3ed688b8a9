"""OpenVINO's CPU plugin on an ONNX model: fp32 pinned to f32, ``auto`` (OpenVINO's own choice:
bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere) and the int8 QDQ model. The precision
OpenVINO really uses is read back from the compiled model (``INFERENCE_PRECISION_HINT``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.console import captured
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.runtimes.base import Runner

OPENVINO_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def openvino_problem() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed; install it with: pip install -e \".[openvino]\""
    return None


class OpenVinoRunner(Runner):
    """An ONNX model compiled by OpenVINO for its CPU plugin.

    ``precision``: ``fp32`` pins the inference precision to f32; ``auto`` leaves the choice to
    OpenVINO (bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere); ``int8`` compiles the QDQ
    model. The precision OpenVINO really uses is read back from the compiled model.

    Each batch size gets its own compilation with a static input shape, as OpenVINO's own
    ``benchmark_app`` compiles (a dynamic batch axis costs shape inference and memory planning
    on every call); up to ``MAX_SHAPES`` are kept.

    ``throughput``: OpenVINO's THROUGHPUT hint instead of LATENCY: it picks a number of
    streams (parallel inferences, each on a share of the cores) and of infer requests, read
    back from the compiled model; ``timed_step`` keeps every request busy through an
    ``AsyncInferQueue`` (one batch per request per step), as ``benchmark_app -hint throughput``
    measures.
    """

    MAX_SHAPES = 4

    def __init__(self, path: Path | str, *, precision: str = "fp32", threads: int | None = None,
                 throughput: bool = False) -> None:
        problem = openvino_problem()
        if problem:
            raise EnvironmentUnavailable(f"openvino-cpu: {problem}")
        import openvino as ov

        self._ov = ov
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if precision == "fp32":
            self.config["INFERENCE_PRECISION_HINT"] = "f32"
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses on bad files
            raise InputError(f"{str(path)!r} cannot be read by OpenVINO "
                             f"({str(exc).strip().splitlines()[0][:200]})") from None
        self._metadata = _openvino_metadata(self.model)
        self._compiled: dict[int, Any] = {}
        self._requests: dict[int, Any] = {}
        compiled = self._compiled_for(1)
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.inference_precision = OPENVINO_PRECISIONS.get(chosen, chosen)
        self.requested_precision = precision
        # An int8 model runs int8 where it has quantize/dequantize pairs, the rest in
        # inference_precision; both are reported.
        self.precision = "int8" if precision == "int8" else self.inference_precision
        self.device = "cpu"
        self.throughput = throughput
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.name = "openvino"  # the registry names it after its backend
        mode = (f", THROUGHPUT: {self.streams} streams, {self.requests} requests" if throughput
                else "")
        self.provider = f"openvino:CPU ({self.inference_precision}{mode})"
        self.model_path = Path(path)

    def _compiled_for(self, batch: int) -> Any:
        """The model compiled for a static batch of ``batch`` (cached)."""
        if batch not in self._compiled:
            if len(self._compiled) >= self.MAX_SHAPES:
                oldest = next(iter(self._compiled))
                del self._compiled[oldest]
                self._requests.pop(oldest, None)
            shaped = self.model.clone()
            shape = list(shaped.inputs[0].partial_shape)
            shaped.reshape({0: [batch, *shape[1:]]})
            with captured():
                self._compiled[batch] = self.core.compile_model(shaped, "CPU", self.config)
        return self._compiled[batch]

    def _request_for(self, batch: int) -> Any:
        if batch not in self._requests:
            self._requests[batch] = self._compiled_for(batch).create_infer_request()
        return self._requests[batch]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = self._request_for(len(batch))
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    def timed_step(self, batch: np.ndarray) -> tuple[Callable[[], None], str]:
        """The compiled call on a prepared tensor; in throughput mode one batch on every
        infer request at once (``images_per_step`` says how many images that is)."""
        compiled = self._compiled_for(len(batch))
        tensor = self._ov.Tensor(np.ascontiguousarray(batch, dtype=np.float32), shared_memory=True)
        if not self.throughput:
            request = self._request_for(len(batch))
            return (lambda: request.infer({0: tensor}, share_inputs=True)), "host"
        queue = self._ov.AsyncInferQueue(compiled, self.requests)

        def step() -> None:
            for _ in range(self.requests):
                queue.start_async({0: tensor}, share_inputs=True)
            queue.wait_all()

        return step, "host"

    def images_per_step(self, batch: int) -> int:
        return batch * self.requests if self.throughput else batch

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        """Release requests, compiled models and the Core now, not at garbage collection:
        OpenVINO's CPU threads outliving their models have crashed a later signal handler."""
        self._requests.clear()
        self._compiled.clear()
        self.model = None
        self.core = None
        import gc

        gc.collect()


def _openvino_metadata(model: Any) -> dict[str, str]:
    """ONNX metadata_props as OpenVINO keeps them, under rt_info['framework']."""
    try:
        framework = model.get_rt_info()["framework"]  # an RTMap: [] but no .get()
        return {key: value.astype(str) for key, value in framework.items()}
    except Exception:  # a model without the section (not from ONNX): no metadata
        return {}


def open_runner(backend: Any, path: Path, precision: str, *, threads: int | None = None,
                bundle: Any = None) -> OpenVinoRunner:
    """The registry's way in: latency or throughput mode as ``backend`` says."""
    return OpenVinoRunner(path, precision=precision, threads=threads, throughput=backend.throughput)
