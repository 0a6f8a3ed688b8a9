"""Where a served request's time goes, from the server's own counters.

``scrape`` reads the metrics port of ``python -m pipeline serve``: Triton's Prometheus metrics
(``nv_inference_*``) and the ones ``serve`` adds (``pipeline_front_*``, see
``pipeline.serving.stats``; ``pipeline_model_*``, see ``pipeline.serving.backend``). All are
cumulative, so a load level's breakdown is the difference of two scrapes, one as its timed
part starts and one as it ends, divided by the requests in between. The stages, outermost
first, add up to the mean latency the clients saw:

    client          the client library and loopback: client mean minus the front's time
    front           serve's front (body read, contract check, forwarding), minus its wait on Triton
    triton_http     Triton's HTTP handling: the front's wait minus Triton's request time
    queue           Triton's scheduling queue (nv_inference_queue_duration_us)
    compute_input   Triton preparing the inputs (nv_inference_compute_input_duration_us)
    handoff         Triton's Python backend passing the batch to the model's stub process and
                    back: Triton's compute time minus the model function's own time
    batching        the model function around the runtime: joining and splitting the batch
    model           the runtime's infer
    compute_output  Triton taking the outputs (nv_inference_compute_output_duration_us)
    triton_other    the rest of Triton's request time (scheduling, the response's release)

Triton charges each request of a batch the batch's whole compute time, and the model does the
same for its function, so under load the stages are each request's experience, not the
machine's work divided by requests.
"""

from __future__ import annotations

import re
import time
import urllib.request

from pipeline.core.records import MODEL_ROLE, StageBreakdown
from pipeline.serving.backend import FLUSH_S

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
SCRAPE_TIMEOUT_S = 10.0


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str) -> Samples:
    """Prometheus' text format: {(name, labels): value}; comments and bad lines skipped."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = frozenset(LABEL.findall(match.group(3) or ""))
        samples[(match.group(1), labels)] = value
    return samples


def scrape(url: str) -> Samples:
    """The metrics at ``url`` (``http://HOST:PORT/metrics``)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as answer:  # noqa: S310 (loopback)
        return parse_prometheus(answer.read().decode("utf-8", errors="replace"))


def settled_scrape(url: str) -> Samples:
    """``scrape`` once the server is quiet: after the model's counters have reached Triton
    (each instance sends them every ``FLUSH_S``), so they count every request answered."""
    time.sleep(2 * FLUSH_S)
    return scrape(url)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def breakdown(before: Samples, after: Samples, model: str, client_mean_ms: float | None,
              protocol: str = "http") -> StageBreakdown | None:
    """The stages of a mean request between two scrapes; None when no request completed."""
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = delta("nv_inference_request_success", model=model)
    if requests <= 0:
        return None

    def per_request(name: str) -> float:
        return delta(name, model=model) / requests / 1e3

    triton = per_request("nv_inference_request_duration_us")
    queue = per_request("nv_inference_queue_duration_us")
    compute_input = per_request("nv_inference_compute_input_duration_us")
    compute = per_request("nv_inference_compute_infer_duration_us")
    compute_output = per_request("nv_inference_compute_output_duration_us")
    executions = delta("nv_inference_exec_count", model=model)
    images = delta("nv_inference_count", model=model)

    fronted = delta("pipeline_front_request_count", protocol=protocol)
    front_total = delta("pipeline_front_duration_us", protocol=protocol) / fronted / 1e3 if fronted else None
    upstream = (delta("pipeline_front_upstream_duration_us", protocol=protocol) / fronted / 1e3
                if fronted else None)
    ran = delta("pipeline_model_request_count", model=model)
    function = delta("pipeline_model_function_duration_us", model=model) / ran / 1e3 if ran else None
    infer = delta("pipeline_model_infer_duration_us", model=model) / ran / 1e3 if ran else None

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    p99 = value(after, "nv_inference_request_summary_us", model=model, quantile="0.99")
    p50 = value(after, "nv_inference_request_summary_us", model=model, quantile="0.5")
    return StageBreakdown(
        requests=int(requests), mean_batch=images / executions if executions else None,
        total_ms=client_mean_ms, client_ms=minus(client_mean_ms, front_total),
        front_ms=minus(front_total, upstream), triton_http_ms=minus(upstream, triton),
        queue_ms=queue, compute_input_ms=compute_input, handoff_ms=minus(compute, function),
        batching_ms=minus(function, infer), model_ms=infer, compute_output_ms=compute_output,
        triton_other_ms=triton - queue - compute_input - compute - compute_output,
        triton_request_ms=triton,
        triton_p50_ms=p50 / 1e3 if p50 else None, triton_p99_ms=p99 / 1e3 if p99 else None)


# Who uses the machine's CPU during a load level, by role: the clients (this process), serve's
# own process (its fronts), Triton, the Python backend's stub (which runs the model), and
# anything else the server started. On a machine whose cores the clients share, this is where
# throughput goes that the model does not get.
CPU_ROLES = ("load generator", "serve process", "tritonserver", MODEL_ROLE, "other")


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and the server's process tree."""
    import os

    import psutil

    totals = dict.fromkeys(CPU_ROLES, 0.0)
    try:
        root = psutil.Process(server_pid)
        processes = [psutil.Process(os.getpid()), root, *root.children(recursive=True)]
    except psutil.Error:
        return totals
    for process in processes:
        try:
            times = process.cpu_times()
            name = process.name()
        except psutil.Error:  # gone in between
            continue
        if process.pid == os.getpid():
            role = "load generator"
        elif process.pid == server_pid:
            role = "serve process"
        elif name == "tritonserver":
            role = "tritonserver"
        elif name.startswith("triton_python"):
            role = MODEL_ROLE
        else:
            role = "other"
        totals[role] += times.user + times.system
    return totals
