"""OpenVINO's CPU plugin on an ONNX model: fp32 pinned to f32, ``auto`` (OpenVINO's own choice:
bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere) and the int8 QDQ model. The precision
OpenVINO really uses is read back from the compiled model (``INFERENCE_PRECISION_HINT``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

    def close(self) -> None:
        self.request = None
        self.compiled = None


def _openvino_metadata(model: Any) -> dict[str, str]:
    """ONNX metadata_props as OpenVINO keeps them, under rt_info['framework']."""
    try:
        framework = model.get_rt_info()["framework"]  # an RTMap: [] but no .get()
        return {key: value.astype(str) for key, value in framework.items()}
    except Exception:  # a model without the section (not from ONNX): no metadata
        return {}


