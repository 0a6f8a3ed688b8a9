"""The server scenario (MLPerf's "server"): throughput and latency of the served model under
N concurrent clients, over loopback, for a bounded time and request count.

``run_server_scenario`` starts ``python -m pipeline serve BUNDLE`` on free loopback ports, as
a user would, waits for readiness, drives it with each concurrency in turn (every client a
thread with its own HTTP connection, sending batch-1 binary-tensor requests back to back),
then, with ``--arrival poisson``, searches the highest open-loop Poisson rate within a p99
bound (``poisson``), stops the server with SIGTERM and checks its port is free again. Each
level's time is broken down by stage from the server's metrics (``breakdown``), scraped as its
timed part starts and ends. Rows carry ``scenario: server``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.bundle import LATENCY
from pipeline.core.records import (
    LatencyDoc,
    PoissonSearch,
    Recommendation,
    ServerRow,
    ServerSection,
    ServerStop,
    ok_rows,
)
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.options import BenchOptions, ScenarioOptions, ServeOptions
from pipeline.runtimes.registry import served_model
from pipeline.serving.serve import check_ports_free, free_port, serving_problem
from pipeline.stages.bench import poisson
from pipeline.stages.bench.breakdown import Samples, breakdown, cpu_seconds, scrape
from pipeline.stages.bench.protocol import run_bench
from pipeline.stages.bench.timing import percentile_stats
from pipeline.stages.bench.writeup import save_bench

READY_TIMEOUT_S = 180.0
MAX_REQUESTS_PER_CLIENT = 100_000


class Server:
    """``python -m pipeline serve`` in its own process group, stopped by SIGTERM."""

    def __init__(self, bundle: Path, scenario: ScenarioOptions) -> None:
        self.ports = {"--port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port()}
        args = [sys.executable, "-m", "pipeline", "serve", str(bundle),
                "--max-batch-size", str(scenario.max_batch_size),
                "--queue-delay-us", str(scenario.queue_delay_us)]
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        if scenario.threads:
            args += ["--threads", str(scenario.threads)]
        self.url = f"127.0.0.1:{self.ports['--port']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['--metrics-port']}/metrics"
        self.log_path = bundle / ".serve.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, model: str) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(self.url, connection_timeout=2, network_timeout=2)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvironmentUnavailable(f"the server exited ({self.process.returncode}) before it "
                                             f"was ready: {self.tail()}")
            try:
                if client.is_server_ready() and client.is_model_ready(model):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise EnvironmentUnavailable(f"the server was not ready within {READY_TIMEOUT_S:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-5:])[-600:]

    def stop(self) -> ServerStop:
        """SIGTERM, then wait; returns how it ended and whether its port is free again."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # whatever Triton started in its session must be gone too
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log_file.close()
        try:
            check_ports_free(ServeOptions(port=self.ports["--port"], grpc_port=self.ports["--grpc-port"],
                                          metrics_port=self.ports["--metrics-port"]))
            free = True
        except EnvironmentUnavailable:
            free = False
        return ServerStop(exit_code=self.process.returncode, ports_free=free)


def _client_loop(url: str, model: Any, image: np.ndarray, stop_at: int, record_after: int,
                 latencies: list[int], errors: list[str]) -> None:
    """Back-to-back batch-1 requests until ``stop_at`` (perf_counter_ns); latencies in ns."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
    request = http.InferInput(model.input_name, list(image.shape), "FP32")
    request.set_data_from_numpy(image, binary_data=True)
    wanted = http.InferRequestedOutput(model.output_name, binary_data=True)
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        started = time.perf_counter_ns()
        if started >= stop_at:
            break
        try:
            client.infer(model.name, [request], outputs=[wanted])
        except Exception as exc:  # a failed request is counted, and the load goes on
            if started >= record_after:
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            continue
        if started >= record_after:
            latencies.append(time.perf_counter_ns() - started)
    client.close()


def drive(url: str, model: Any, concurrency: int, seconds: float, warmup_s: float,
          metrics_url: str | None = None, server_pid: int | None = None) -> ServerRow:
    """``concurrency`` clients for ``warmup_s`` + ``seconds``; stats over the timed part, its
    stage breakdown when ``metrics_url`` is given, and the CPU each process used per request
    when ``server_pid`` is."""
    shape = (1, *model.input_shape)
    latencies: list[int] = []
    errors: list[str] = []
    start = time.perf_counter_ns()
    record_after = start + int(warmup_s * 1e9)
    stop_at = record_after + int(seconds * 1e9)
    threads = []
    for index in range(concurrency):
        image = np.random.default_rng(index).standard_normal(shape, dtype=np.float32)
        threads.append(threading.Thread(target=_client_loop, daemon=True,
                                        args=(url, model, image, stop_at, record_after, latencies, errors)))
    for thread in threads:
        thread.start()
    scrapes: list[Samples] = []
    clocks: list[dict[str, float]] = []
    for moment in (record_after, stop_at):
        time.sleep(max(0.0, (moment - time.perf_counter_ns()) / 1e9))
        if server_pid is not None:
            clocks.append(cpu_seconds(server_pid))
        if metrics_url:
            scrapes.append(scrape(metrics_url))
    for thread in threads:
        thread.join(timeout=seconds + warmup_s + 120)
    elapsed = max((time.perf_counter_ns() - record_after) / 1e9, 1e-9)
    row = ServerRow(scenario="server", backend="triton-ort-cpu", batch=1, concurrency=concurrency,
                    requests=len(latencies), errors=len(errors),
                    first_error=errors[0] if errors else None, seconds=round(elapsed, 3),
                    images_per_s=len(latencies) / elapsed if latencies else 0.0,
                    status="ok" if latencies and not errors else "error")
    if latencies:
        stats = percentile_stats(latencies)
        row = replace(row, n=stats.n, mean_ms=stats.mean_ms, p50_ms=stats.p50_ms,
                      p90_ms=stats.p90_ms, p95_ms=stats.p95_ms, p99_ms=stats.p99_ms,
                      p99_note=stats.p99_note, max_ms=stats.max_ms)
        if row.p99_ms is None:  # bench's 600-sample rule is for single-stream tables; a
            # server-scenario p99 from fewer samples is still what the budget is checked on
            row.p99_ms = float(np.percentile(np.asarray(latencies, dtype=np.float64) / 1e6, 99))
            row.p99_note = f"from {len(latencies)} requests"
    if len(scrapes) == 2:
        row = replace(row, breakdown=breakdown(scrapes[0], scrapes[1], model.name, row.mean_ms))
    if len(clocks) == 2 and latencies:
        row = replace(row, cpu_ms_per_request={
            role: round((clocks[1][role] - clocks[0][role]) * 1e3 / len(latencies), 3)
            for role in clocks[0]})
    return row


def run_server_scenario(bundle: Any, scenario: ScenarioOptions, log: Callable[[str], None]
                        ) -> tuple[list[ServerRow], PoissonSearch | None, ServerStop, str]:
    """Serve the bundle, drive it at every concurrency (then the Poisson search, if asked),
    stop it; returns the rows, the search, how the server stopped, and its URL."""
    model = served_model(bundle, "fp32")
    problem = serving_problem()
    if problem:
        raise EnvironmentUnavailable(f"--scenario server: {problem}")
    if scenario.arrival == "poisson":
        problem = poisson.loadgen_problem()
        if problem:
            raise EnvironmentUnavailable(problem)
    server = Server(bundle.root, scenario)
    rows: list[ServerRow] = []
    search = None
    try:
        server.wait_ready(model.name)
        log(f"serving on {server.url}; {len(scenario.concurrency)} load levels of "
            f"{scenario.seconds:g} s each")
        for concurrency in scenario.concurrency:
            row = replace(drive(server.url, model, concurrency, scenario.seconds, scenario.warmup_s,
                                server.metrics_url, server.process.pid),
                          max_batch_size=scenario.max_batch_size,
                          queue_delay_us=scenario.queue_delay_us, model_file=model.model_file.name)
            rows.append(row)
            log(f"  concurrency {concurrency:>3}: {row.images_per_s:.1f} img/s, p50 "
                f"{row.p50_ms or 0:.1f} ms, p99 {row.p99_ms or 0:.1f} ms, {row.errors} errors")
        if scenario.arrival == "poisson" and scenario.p99_ms is not None:
            ceiling = max((r.images_per_s for r in rows if r.status == "ok"), default=0.0)
            if ceiling <= 0:
                raise EnvironmentUnavailable("no closed-loop level completed, so the Poisson "
                                             "search has no rate to start from")
            log(f"poisson arrivals: the highest rate below {ceiling:.1f} req/s with p99 within "
                f"{scenario.p99_ms:g} ms (at most {scenario.poisson_trials} runs)")
            search = poisson.search(server.url, model, scenario.p99_ms, ceiling, scenario.seconds,
                                    scenario.poisson_trials, server.metrics_url, log)
            if scenario.verify_capacity:
                search = poisson.verify_capacity(server.url, model, search, server.metrics_url, log)
    finally:
        stopped = server.stop()
    return rows, search, stopped, server.url


def server_bench(bundle: Any, scenario: ScenarioOptions, *, iterations: int, warmup_seconds: float,
                 budget_ms: float | None, progress: bool, command: str,
                 log: Callable[[str], None], label: str | None = None
                 ) -> tuple[LatencyDoc, Recommendation]:
    """The server scenario beside fresh in-process ORT baselines (batch 1, and powers of two up
    to the largest batch the server could form: the best of them is the batching ceiling), into
    latency.json's ``server`` section and report.md."""
    import datetime

    scenario.check()
    started = time.perf_counter()
    threads = scenario.threads or os.cpu_count() or 1
    largest = min(max(scenario.concurrency), scenario.max_batch_size)
    batches = tuple(sorted({1, largest} | {2 ** k for k in range(1, 9) if 2 ** k < largest}))
    log(f"in-process baseline: ort-cpu fp32 at batch {', '.join(map(str, batches))} (the best "
        f"batched images/s is the most dynamic batching could give)")
    base_doc = run_bench(bundle.root, BenchOptions(backends=("ort-cpu:fp32",), batch_sizes=batches,
                                                  iterations=iterations, seconds=scenario.seconds,
                                                  warmup_s=warmup_seconds, threads=threads),
                         progress=progress, label=label)
    good = ok_rows(base_doc.rows)
    baseline = next((r for r in good if r.batch == 1), None)
    ceiling = max((r for r in good if r.batch > 1), key=lambda r: r.images_per_s or 0.0,
                  default=None)
    rows, search, stopped, _ = run_server_scenario(bundle, scenario, log)
    try:
        doc = LatencyDoc.load(bundle.path(LATENCY))  # keep the single-stream rows measured before
        if label is not None:  # otherwise the label the single-stream run recorded stays
            doc.machine.label = label
    except InputError:
        doc = base_doc
    doc.server = ServerSection(
        scenario="server", rows=rows, baseline=baseline, batched_ceiling=ceiling, stop=stopped,
        budget_ms=budget_ms, best=best_within(rows, budget_ms), seconds=scenario.seconds,
        warmup_s=scenario.warmup_s, max_batch_size=scenario.max_batch_size,
        queue_delay_us=scenario.queue_delay_us, threads=threads, command=command,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), poisson=search)
    return doc, save_bench(doc, bundle.root, budget_ms, started=started)


def best_within(rows: list[ServerRow], budget_ms: float | None) -> ServerRow | None:
    """The highest-throughput concurrency whose p99 is within the budget (all, without one)."""
    fit = [r for r in rows if r.status == "ok" and (budget_ms is None or (r.p99_ms or 1e18) <= budget_ms)]
    return max(fit, key=lambda r: r.images_per_s) if fit else None
