"""What ``serve``'s fronts add to Triton's metrics: the time a request spends in them.

Triton's Prometheus metrics (``nv_inference_*``) cover a request from the moment Triton has
parsed it to its response, and the model's own counters (``pipeline_model_*``, see
``pipeline.serving.backend``) come through Triton's custom metrics. The fronts
(``pipeline.serving.guard``) lie outside both, so ``serve`` measures them in its own process:
from the handler's first line, before the body is read, to the answer built; and, inside that,
the wait for Triton's answer. They are exposed on the metrics port beside Triton's, in the same
text format, as cumulative counters (so a scraper takes differences, as with Triton's):

    pipeline_front_request_count{protocol="http"}           inference requests answered
    pipeline_front_duration_us{protocol="http"}             their time in the front
    pipeline_front_upstream_duration_us{protocol="http"}    of which waiting on Triton
"""

from __future__ import annotations

import threading
from collections import defaultdict

HELP = {
    "pipeline_front_request_count": "Inference requests answered by serve's front",
    "pipeline_front_duration_us": "Cumulative time inference requests spent in serve's front, "
                                  "body read to answer built",
    "pipeline_front_upstream_duration_us": "Cumulative time serve's front waited on Triton's answer",
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
