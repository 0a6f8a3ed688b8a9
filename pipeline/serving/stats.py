"""What ``serve`` adds to Triton's own metrics: the time its fronts and the model function take.

Triton's Prometheus metrics (``nv_inference_*``) cover a request from the moment Triton has
parsed it to its response. Two parts of a served request lie outside them, and ``serve``
measures both in its own process:

- the fronts (``pipeline.serving.guard``): from the handler's first line, before the body is
  read, to the answer built; and, inside that, the wait for Triton's answer;
- the model function that PyTriton calls with each batch Triton's dynamic batcher forms: the
  whole call, and inside it the runtime's own ``infer``.

They are exposed on the metrics port beside Triton's own, in the same text format, as
cumulative counters (so a scraper takes differences, as with Triton's):

    pipeline_front_request_count{protocol="http"}           inference requests answered
    pipeline_front_duration_us{protocol="http"}             their time in the front
    pipeline_front_upstream_duration_us{protocol="http"}    of which waiting on Triton
    pipeline_model_request_count{model="resnet18"}          requests the model function ran
    pipeline_model_function_duration_us{model="resnet18"}   its time, once per request
    pipeline_model_infer_duration_us{model="resnet18"}      of which the runtime's infer

The model counters follow Triton's convention for batches: each request of a batch is charged
the batch's whole time, so they compare with ``nv_inference_compute_infer_duration_us``.
"""

from __future__ import annotations

import threading
from collections import defaultdict

HELP = {
    "pipeline_front_request_count": "Inference requests answered by serve's front",
    "pipeline_front_duration_us": "Cumulative time inference requests spent in serve's front, "
                                  "body read to answer built",
    "pipeline_front_upstream_duration_us": "Cumulative time serve's front waited on Triton's answer",
    "pipeline_model_request_count": "Requests the model function ran (each request of a batch once)",
    "pipeline_model_function_duration_us": "Cumulative time of the model function PyTriton calls, "
                                           "charged to each request of the batch",
    "pipeline_model_infer_duration_us": "Cumulative time of the runtime's infer inside the model "
                                        "function, charged to each request of the batch",
}


class ServeStats:
    """Thread-safe cumulative counters, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = defaultdict(float)

    def front(self, protocol: str, total_s: float, upstream_s: float) -> None:
        label = f'protocol="{protocol}"'
        with self._lock:
            self._values[("pipeline_front_request_count", label)] += 1
            self._values[("pipeline_front_duration_us", label)] += total_s * 1e6
            self._values[("pipeline_front_upstream_duration_us", label)] += upstream_s * 1e6

    def model(self, model: str, requests: int, function_s: float, infer_s: float) -> None:
        label = f'model="{model}"'
        with self._lock:
            self._values[("pipeline_model_request_count", label)] += requests
            self._values[("pipeline_model_function_duration_us", label)] += function_s * 1e6 * requests
            self._values[("pipeline_model_infer_duration_us", label)] += infer_s * 1e6 * requests

    def prometheus(self) -> str:
        with self._lock:
            values = sorted(self._values.items())
        lines: list[str] = []
        for name in HELP:
            series = [(label, value) for (metric, label), value in values if metric == name]
            if not series:
                continue
            lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{label}}} {value:.0f}" for label, value in series]
        return "".join(line + "\n" for line in lines)
