"""Open-loop load (``bench --scenario server --arrival poisson --p99-ms BOUND``).

Closed-loop clients send the next request only when the last one returns, so a slow server
slows its own load and the queueing it causes never shows (coordinated omission). Here
requests arrive on a Poisson schedule at a set rate whatever the server does, and each
request's latency counts from its *scheduled* send time, as MLPerf's server scenario and
Triton's perf_analyzer request-rate mode do.

The schedule, the latency accounting and the statistics are MLPerf's own LoadGen
(``mlcommons-loadgen``): ``trial`` hands it a system under test whose ``issue`` sends each
query as a batch-1 binary-tensor request through Triton's asyncio HTTP client on a loop
thread, so a slow answer never delays the next send, and reports completion when the answer
arrives. LoadGen writes its own logs (``mlperf_log_summary.txt``, ``mlperf_log_detail.txt``);
the numbers are read back from the detail log.

``search`` bisects the rate between 0 and the ceiling (the best closed-loop images/s of the
same run, which a stable open-loop rate cannot exceed): a trial passes when its p99 is within
the bound and no request failed. Trials and time are bounded: at most ``max_trials`` runs of
``seconds`` each (LoadGen extends a run to 100 requests, up to 3x ``seconds``).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.records import PoissonSearch, PoissonTrial
from pipeline.errors import EnvironmentUnavailable
from pipeline.stages.bench.breakdown import breakdown, settled_scrape

INSTALL_HINT = 'pip install -e ".[serving]"'
MIN_REQUESTS = 100  # a p99 from fewer requests is one request's latency
MAX_REQUESTS = 50_000
RATE_RESOLUTION = 0.03  # stop bisecting when the bracket is this fraction of the ceiling


def loadgen_problem() -> str | None:
    """Why LoadGen cannot be used here, or None."""
    try:
        import mlperf_loadgen  # noqa: F401
        import tritonclient.http.aio  # noqa: F401
    except ImportError as exc:
        return (f"--arrival poisson needs MLPerf LoadGen and Triton's asyncio client ({exc.name} "
                f"is missing); install them with: {INSTALL_HINT}")
    return None


def loadgen_version() -> str:
    try:
        return f"mlcommons-loadgen {metadata.version('mlcommons-loadgen')}"
    except metadata.PackageNotFoundError:
        return "mlcommons-loadgen"


class _Sender:
    """Sends LoadGen's queries on an asyncio loop of its own, one request per query."""

    def __init__(self, url: str, model: Any, image: np.ndarray) -> None:
        import mlperf_loadgen as lg
        import tritonclient.http.aio as aio

        self.lg, self.model = lg, model
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="poisson-sender", daemon=True)
        self.thread.start()

        async def open_client() -> Any:
            return aio.InferenceServerClient(url, conn_limit=1024)

        self.client = asyncio.run_coroutine_threadsafe(open_client(), self.loop).result()
        self.request = aio.InferInput(model.input_name, list(image.shape), "FP32")
        self.request.set_data_from_numpy(image, binary_data=True)
        self.wanted = aio.InferRequestedOutput(model.output_name, binary_data=True)

    def issue(self, queries: list[Any]) -> None:
        for query in queries:
            asyncio.run_coroutine_threadsafe(self._one(query.id), self.loop)

    async def _one(self, query_id: int) -> None:
        try:
            answer = await self.client.infer(self.model.name, [self.request], outputs=[self.wanted])
            answer.as_numpy(self.model.output_name)
        except Exception as exc:  # counted; LoadGen still gets its completion
            self.errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(query_id, 0, 0)])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def read_detail(log_dir: Path) -> dict[str, Any]:
    """LoadGen's ``:::MLLOG`` records: key -> value."""
    values: dict[str, Any] = {}
    for line in (log_dir / "mlperf_log_detail.txt").read_text(errors="replace").splitlines():
        if line.startswith(":::MLLOG "):
            try:
                record = json.loads(line[len(":::MLLOG "):])
            except ValueError:
                continue
            values[record.get("key")] = record.get("value")
    return values


def trial(url: str, model: Any, rate: float, bound_ms: float, seconds: float,
          metrics_url: str | None) -> PoissonTrial:
    """One LoadGen run at ``rate`` requests/s."""
    import mlperf_loadgen as lg

    image = np.random.default_rng(0).standard_normal((1, *model.input_shape), dtype=np.float32)
    sender = _Sender(url, model, image)
    sut = lg.ConstructSUT(sender.issue, lambda: None)
    # One sample: every query sends the same image (LoadGen's sample library is for
    # accuracy runs; speed does not depend on the pixels).
    qsl = lg.ConstructQSL(1, 1, lambda samples: None, lambda samples: None)
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Server
    settings.mode = lg.TestMode.PerformanceOnly
    settings.server_target_qps = rate
    settings.server_target_latency_ns = int(bound_ms * 1e6)
    settings.server_target_latency_percentile = 0.99
    settings.min_duration_ms = int(seconds * 1000)
    settings.max_duration_ms = int(seconds * 3000)
    settings.min_query_count = MIN_REQUESTS
    settings.max_query_count = MAX_REQUESTS
    before = settled_scrape(metrics_url) if metrics_url else None
    try:
        with tempfile.TemporaryDirectory(prefix="loadgen-") as folder:
            log = lg.LogSettings()
            log.log_output.outdir = folder
            log.log_output.copy_summary_to_stdout = False
            log.enable_trace = False
            lg.StartTestWithLogSettings(sut, qsl, settings, log, "")
            result = read_detail(Path(folder))
    finally:
        lg.DestroySUT(sut)
        lg.DestroyQSL(qsl)
        sender.close()
    after = settled_scrape(metrics_url) if metrics_url else None

    def ms(key: str) -> float:
        return float(result.get(key) or 0) / 1e6

    requests = int(result.get("result_query_count") or 0)
    errors = len(sender.errors)
    scheduled = float(result.get("result_scheduled_samples_per_sec") or 0)
    p99 = ms("result_99.00_percentile_latency_ns")
    row = PoissonTrial(
        target_per_s=round(rate, 2), scheduled_per_s=scheduled,
        completed_per_s=float(result.get("result_completed_samples_per_sec") or 0),
        requests=requests, errors=errors, mean_ms=ms("result_mean_latency_ns"),
        p50_ms=ms("result_50.00_percentile_latency_ns"), p90_ms=ms("result_90.00_percentile_latency_ns"),
        p99_ms=p99, max_ms=ms("result_max_latency_ns"),
        within_bound=bool(requests) and p99 <= bound_ms and errors == 0,
        early_stopping_met=bool(result.get("early_stopping_met")),
        seconds=round(requests / scheduled, 2) if scheduled else 0.0,
        first_error=sender.errors[0] if sender.errors else None)
    if before is not None and after is not None:
        row = replace(row, breakdown=breakdown(before, after, model.name, row.mean_ms))
    return row


def search(url: str, model: Any, bound_ms: float, ceiling: float, seconds: float,
           max_trials: int, metrics_url: str | None,
           log: Callable[[str], None]) -> PoissonSearch:
    """The highest rate (requests/s) whose p99 stays within ``bound_ms``, by bisection below
    ``ceiling``."""
    problem = loadgen_problem()
    if problem:
        raise EnvironmentUnavailable(problem)
    low, high = 0.0, ceiling
    trials: list[PoissonTrial] = []
    for _ in range(max_trials):
        rate = (low + high) / 2
        row = trial(url, model, rate, bound_ms, seconds, metrics_url)
        trials.append(row)
        log(f"  poisson {rate:6.1f} req/s: p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms, "
            f"{row.requests} requests, {row.errors} errors: "
            f"{'within' if row.within_bound else 'over'} {bound_ms:g} ms")
        if row.within_bound:
            low = rate
        else:
            high = rate
        if high - low < RATE_RESOLUTION * ceiling:
            break
    passed = [t for t in trials if t.within_bound]
    best = max(passed, key=lambda t: t.target_per_s) if passed else None
    return PoissonSearch(p99_bound_ms=bound_ms, generator=loadgen_version(),
                         ceiling_per_s=round(ceiling, 2), trial_seconds=seconds, trials=trials,
                         best=best)


def verify_capacity(url: str, model: Any, found: PoissonSearch, metrics_url: str | None,
                    log: Callable[[str], None]) -> PoissonSearch:
    """``--verify-capacity``: after the search, a run at ``VERIFY_FRACTION`` x the capacity,
    as long as a search trial, on a fresh schedule rather than trusting the one trial that
    passed (capacity planning runs replicas below their capacity: the p99 must hold there).
    A run that misses lowers the capacity to its own rate, and the next run checks 90% of
    that, up to ``MAX_CHECKS`` runs: the capacity ends where its 90% held, or is marked not
    confirmed."""
    if found.capacity_per_s is None:
        log("  --verify-capacity: the search found no rate within the bound; nothing to verify")
        return found
    checked = found
    for _ in range(found.MAX_CHECKS):
        capacity = checked.capacity_per_s
        assert capacity is not None
        rate = found.VERIFY_FRACTION * capacity
        row = trial(url, model, rate, found.p99_bound_ms, found.trial_seconds, metrics_url)
        checked = replace(checked, checks=[*checked.checks, row])
        over = row.p99_ms - found.p99_bound_ms
        log(f"  verify capacity {capacity:.1f} req/s at {100 * found.VERIFY_FRACTION:.0f}% "
            f"({rate:.1f} req/s): p99 {row.p99_ms:.1f} ms, {row.errors} errors: " + (
                "held" if row.within_bound else
                f"NOT held ({over:+.1f} ms over {found.p99_bound_ms:g} ms)" if row.errors == 0
                else f"NOT held ({row.errors} requests failed)"))
        if row.within_bound:
            break
    return checked
