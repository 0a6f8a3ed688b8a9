"""The server scenario (MLPerf's "server"): throughput and latency of the served model under
N concurrent clients, over loopback, for a bounded time and request count.

``run_server_scenario`` starts ``python -m pipeline serve BUNDLE`` on free loopback ports, as
a user would, waits for readiness, drives it with each concurrency in turn (every client a
thread with its own HTTP connection, sending batch-1 requests back to back), then stops the
server with SIGTERM and checks its port is free again. Rows carry ``scenario: server``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import EnvironmentUnavailable, InputError

READY_TIMEOUT_S = 180.0
MAX_REQUESTS_PER_CLIENT = 100_000


@dataclass(frozen=True)
class ServerScenario:
    concurrency: tuple[int, ...] = (1, 4, 16)
    seconds: float = 10.0
    warmup_s: float = 2.0
    threads: int | None = None
    max_batch_size: int = 32
    queue_delay_us: int = 2000


def check(scenario: ServerScenario) -> None:
    if not scenario.concurrency or any(c < 1 or c > 256 for c in scenario.concurrency):
        raise InputError(f"--concurrency {','.join(map(str, scenario.concurrency))} must be "
                         f"integers from 1 to 256, e.g. 1,4,16")
    if scenario.seconds <= 0 or scenario.seconds > 600:
        raise InputError(f"--seconds {scenario.seconds} must be in (0, 600] for the server scenario")


class Server:
    """``python -m pipeline serve`` in its own process group, stopped by SIGTERM."""

    def __init__(self, bundle: Path, scenario: ServerScenario) -> None:
        from pipeline.serve import free_port

        self.ports = {"--port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port()}
        args = [sys.executable, "-m", "pipeline", "serve", str(bundle),
                "--max-batch-size", str(scenario.max_batch_size),
                "--queue-delay-us", str(scenario.queue_delay_us)]
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        if scenario.threads:
            args += ["--threads", str(scenario.threads)]
        self.url = f"127.0.0.1:{self.ports['--port']}"
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

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then wait; returns how it ended and whether its port is free again."""
        from pipeline.serve import check_ports_free, ServeOptions

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
        return {"exit_code": self.process.returncode, "ports_free": free}


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


def drive(url: str, model: Any, concurrency: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    """``concurrency`` clients for ``warmup_s`` + ``seconds``; stats over the timed part."""
    from pipeline.bench import percentile_stats

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
    for thread in threads:
        thread.join(timeout=seconds + warmup_s + 120)
    elapsed = max((time.perf_counter_ns() - record_after) / 1e9, 1e-9)
    row: dict[str, Any] = {"scenario": "server", "backend": "triton-ort-cpu", "batch": 1,
                           "concurrency": concurrency, "requests": len(latencies),
                           "errors": len(errors), "first_error": errors[0] if errors else None,
                           "seconds": round(elapsed, 3),
                           "images_per_s": len(latencies) / elapsed if latencies else 0.0,
                           "status": "ok" if latencies and not errors else "error"}
    if latencies:
        stats = percentile_stats(latencies)
        row.update({key: stats[key] for key in ("n", "mean_ms", "p50_ms", "p90_ms", "p95_ms",
                                                  "p99_ms", "p99_note", "max_ms")})
        if row["p99_ms"] is None:  # bench's 600-sample rule is for single-stream tables; a
            # server-scenario p99 from fewer samples is still what the budget is checked on
            row["p99_ms"] = float(np.percentile(np.asarray(latencies, dtype=np.float64) / 1e6, 99))
            row["p99_note"] = f"from {len(latencies)} requests"
    return row


def run_server_scenario(bundle: Any, scenario: ServerScenario,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Serve the bundle, drive it at every concurrency, stop it; returns rows and the stop."""
    from pipeline.serve import serving_problem, served_model

    model = served_model(bundle, "fp32")
    problem = serving_problem()
    if problem:
        raise EnvironmentUnavailable(f"--scenario server: {problem}")
    server = Server(bundle.root, scenario)
    rows: list[dict[str, Any]] = []
    try:
        server.wait_ready(model.name)
        log(f"serving on {server.url}; {len(scenario.concurrency)} load levels of "
            f"{scenario.seconds:g} s each")
        for concurrency in scenario.concurrency:
            row = drive(server.url, model, concurrency, scenario.seconds, scenario.warmup_s)
            row.update({"max_batch_size": scenario.max_batch_size,
                        "queue_delay_us": scenario.queue_delay_us, "model_file": model.model_file.name})
            rows.append(row)
            log(f"  concurrency {concurrency:>3}: {row['images_per_s']:.1f} img/s, p50 "
                f"{row.get('p50_ms') or 0:.1f} ms, p99 {row.get('p99_ms') or 0:.1f} ms, "
                f"{row['errors']} errors")
    finally:
        stopped = server.stop()
    return {"rows": rows, "server_stop": stopped, "url": server.url}


def server_bench(bundle: Any, scenario: ServerScenario, *, iterations: int, warmup_seconds: float,
                 budget_ms: float | None, progress: bool, command: str,
                 log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server scenario beside fresh single-stream ORT baselines (batch 1, and the largest
    batch the server could form), into latency.json's ``server`` section and report.md."""
    import datetime

    from pipeline.bench import BenchConfig, run_bench
    from pipeline.bundle import LATENCY
    from pipeline.report import load_latency, record_bench, write_bench_outputs

    check(scenario)
    started = time.perf_counter()
    threads = scenario.threads or os.cpu_count() or 1
    ceiling_batch = min(max(scenario.concurrency), scenario.max_batch_size)
    log(f"single-stream baseline: ort-cpu fp32 at batch 1 (and {ceiling_batch}, what dynamic "
        f"batching could reach at most)")
    base_doc = run_bench(bundle.root, BenchConfig(backends=("ort-cpu:fp32",),
                                                  batch_sizes=tuple(sorted({1, ceiling_batch})),
                                                  iterations=iterations, seconds=scenario.seconds,
                                                  warmup_s=warmup_seconds, threads=threads),
                         progress=progress)
    good = [r for r in base_doc["rows"] if r["status"] == "ok"]
    baseline = next((r for r in good if r["batch"] == 1), None)
    ceiling = next((r for r in good if r["batch"] == ceiling_batch and ceiling_batch > 1), None)
    result = run_server_scenario(bundle, scenario, log)
    try:
        doc = load_latency(bundle.path(LATENCY))  # keep the single-stream rows measured before
    except InputError:
        doc = base_doc
    doc["server"] = {"scenario": "server", "rows": result["rows"], "baseline": baseline,
                     "batched_ceiling": ceiling, "stop": result["server_stop"],
                     "budget_ms": budget_ms, "best": best_within(result["rows"], budget_ms),
                     "seconds": scenario.seconds, "warmup_s": scenario.warmup_s,
                     "max_batch_size": scenario.max_batch_size,
                     "queue_delay_us": scenario.queue_delay_us, "threads": threads,
                     "command": command,
                     "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    advice = write_bench_outputs(doc, bundle.root, budget_ms)
    record_bench(bundle.root, time.perf_counter() - started)
    return doc, advice


def best_within(rows: list[dict[str, Any]], budget_ms: float | None) -> dict[str, Any] | None:
    """The highest-throughput concurrency whose p99 is within the budget (all, without one)."""
    fit = [r for r in rows if r["status"] == "ok" and (budget_ms is None or (r.get("p99_ms") or 1e18) <= budget_ms)]
    return max(fit, key=lambda r: r["images_per_s"]) if fit else None
