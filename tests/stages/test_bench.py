"""The timing protocol, the rows it produces, reason rows, the image loop and the outputs."""

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest

from pipeline.core.bundle import sha256_of
from pipeline.core.records import LatencyRow
from pipeline.options import BenchOptions
from pipeline.stages.bench.timing import (
    MIN_WARMUP_ITERATIONS,
    STABLE_WINDOWS,
    WINDOW_CALLS,
    percentile_stats,
    timed_loop,
    warm_up,
)
from pipeline.stages.recommend import recommend
from tests.conftest import requires_cuda, run_cli, write_images

FAST = ["--iterations", "5", "--seconds", "0", "--warmup-seconds", "0"]


class StubClock:
    """A clock that advances a fixed number of ns per reading."""

    def __init__(self, step_ns: int) -> None:
        self.now, self.step = 0, step_ns

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def test_statistics_on_a_known_sequence():
    samples = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    stats = percentile_stats(samples)
    assert stats.n == 100
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert (stats.min_ms, stats.max_ms) == (1.0, 100.0)
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p95_ms == pytest.approx(95.05)
    assert stats.p99_ms is None and stats.p99_note == "omitted: n=100 < 600"


def test_p99_reported_from_600_samples():
    # 1..600 ms: numpy's linear p99 sits at rank 0.99 * 599 = 593.01 -> 594.01 ms
    stats = percentile_stats([i * 1_000_000 for i in range(1, 601)])
    assert stats.p99_ms == pytest.approx(594.01) and stats.p99_note is None
    assert stats.max_ms == 600.0
    # six slow samples of 600: rank 593.01 lies 1% of the way from the last fast one to a slow one
    tail = percentile_stats([1_000_000] * 594 + [9_000_000] * 6)
    assert tail.p99_ms == pytest.approx(1.08) and tail.max_ms == 9.0


def test_timed_loop_runs_until_both_iterations_and_seconds():
    calls = []
    # each reading advances 1 ms: one iteration costs two readings = 2 ms
    samples = timed_loop(lambda: calls.append(1), iterations=5, seconds=0.1, clock=StubClock(1_000_000))
    assert len(samples) >= 5 and all(s == 1_000_000 for s in samples)
    assert len(samples) >= 0.1e9 / 3e6  # kept going for the full 0.1 s
    few = timed_loop(lambda: None, iterations=50, seconds=0.0, clock=StubClock(1))
    assert len(few) == 50


def test_warm_up_has_a_floor_of_ten_iterations():
    assert warm_up(lambda: None, seconds=0.0, clock=StubClock(1)) == MIN_WARMUP_ITERATIONS


def test_sync_is_called_before_each_stop():
    events = []
    timed_loop(lambda: events.append("step"), iterations=3, seconds=0,
               sync=lambda: events.append("sync"), clock=StubClock(1))
    assert events == ["step", "sync"] * 3


@pytest.fixture(scope="module")
def bench_result(tiny_bundle_master, tmp_path_factory):
    bundle = shutil.copytree(tiny_bundle_master, tmp_path_factory.mktemp("bench") / "b")
    result = run_cli("bench", bundle, "--backends", "torch-cpu:fp32,torchscript-cpu,ort-cpu:fp32,ort-cuda:fp32",
                     "--batch-sizes", "1,2", "--threads", "1", "--budget-ms", "1000", *FAST)
    return bundle, result


def test_bench_rows_and_schema(bench_result, cuda_available):
    bundle, result = bench_result
    assert result.exit_code == 0, result.output
    doc = json.loads((bundle / "latency.json").read_text())
    assert doc["schema_version"] == 4 and doc["kind"] == "pipeline.latency"
    assert {"cpu", "cpu_flags", "cpu_count", "gpu", "versions"} <= set(doc["machine"])
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"} \
        <= set(doc["machine"]["cpu_flags"])
    assert doc["config"]["threads"] == 1
    rows = doc["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        (b, n) for b in ("torch-cpu", "torchscript-cpu", "ort-cpu", "ort-cuda") for n in (1, 2)]
    for row in rows:
        # every key the record declares, and no other (machine/arch only in comparisons; the
        # worker's peak memory on rows that ran)
        measured = {"peak_rss_mib"} if row["status"] == "ok" else set()
        assert set(row) == {f.name for f in fields(LatencyRow)} - LatencyRow.OPTIONAL | measured
    for row in rows[:6]:
        assert row["status"] == "ok" and row["threads"] == 1
        assert 50 < row["peak_rss_mib"] < 24 * 1024  # MiB: the worker with its runtime loaded
        assert row["n"] >= 5 and row["warmup_iterations"] >= MIN_WARMUP_ITERATIONS
        assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["max_ms"]
        assert row["p99_ms"] is None and "omitted" in row["p99_note"]
        assert row["ms_per_image"] == pytest.approx(row["p50_ms"] / row["batch"])
        assert row["images_per_s"] == pytest.approx(1000 * row["batch"] / row["p50_ms"])
        assert row["gflops"] > 0 and row["cold_create_ms"] > 0 and row["cold_first_infer_ms"] > 0
        assert row["precision"] == row["precision_requested"] == "fp32"
        assert row["model_sha256"] == sha256_of(bundle / row["model_file"])
    assert [r["model_file"] for r in rows[:6:2]] == ["weights.pt", "model.ts", "model.sim.onnx"]
    assert rows[4]["provider"] == "CPUExecutionProvider"
    # the export verified the ONNX and TorchScript files bench timed; eager torch is the reference
    assert [r["verified"] for r in rows[:6:2]] == ["reference", "parity passed", "parity passed"]
    if not cuda_available:
        for row in rows[6:]:
            assert row["status"] == "unavailable" and "no CUDA GPU" in row["reason"]
            assert row["p50_ms"] is None and row["provider"] is None and row["device"] is None


def test_bench_outputs_and_recommendation(bench_result):
    bundle, result = bench_result
    report = (bundle / "report.md").read_text()
    assert "## Recommendation" in report and "the fastest verified model at batch 1" in report
    assert "Meets the 1000 ms budget at p90" in report
    assert "Threads for every CPU backend: 1" in report and "python -m pipeline bench" in report
    assert (bundle / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best latency, fastest verified at batch 1:" in result.stdout


def test_strict_turns_reason_rows_into_exit_3(tiny_bundle, cuda_available):
    if cuda_available:
        pytest.skip("ort-cuda can run here, so there is no reason row to be strict about")
    result = run_cli("bench", tiny_bundle, "--backends", "ort-cuda", "--batch-sizes", "1",
                     "--strict", *FAST)
    assert result.exit_code == 3 and "ort-cuda" in result.stderr


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_images_loop_prints_the_familiar_summary(tiny_bundle, tmp_path):
    write_images(tmp_path / "photos", count=5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run_cli("bench", tiny_bundle, "--backends", "ort-cpu", "--batch-sizes", "1",
                     "--images", tmp_path / "photos", "--verbose", *FAST)
    assert result.exit_code == 0, result.output
    assert "1/6: broken.jpg" not in result.stdout and "2/6: img0.png" in result.stdout
    summary = [line for line in result.stdout.splitlines() if "total time:" in line]
    assert summary and summary[0].startswith("[ort-cpu] device:cpu (")
    assert "mean:" in summary[0] and "pipelined" in result.stdout
    assert "broken.jpg" in result.stderr
    loop = json.loads((tiny_bundle / "latency.json").read_text())["images"][0]
    assert loop["sequential"]["n"] == 5 and loop["pipelined"]["n"] == 5


def test_report_merges_two_machines(bench_result, tmp_path):
    bundle, _ = bench_result
    doc = json.loads((bundle / "latency.json").read_text())
    other = json.loads(json.dumps(doc))
    other["machine"]["hostname"] = other["machine"]["label"] = "other-box"
    for row in other["rows"]:
        if row["status"] == "ok":
            row["p50_ms"] /= 2
            row["p90_ms"] /= 2
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json").write_text(json.dumps(other))
    result = run_cli("report", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "other-box" in text and doc["machine"]["hostname"] in text
    assert (tmp_path / "cmp" / "report.png").stat().st_size > 1000
    assert "on other-box" in result.stdout


def test_report_rejects_a_file_that_is_not_latency(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    result = run_cli("report", tmp_path / "x.json")
    assert result.exit_code == 2 and "not a latency.json" in result.stderr


def test_recommendation_finds_gpu_crossover():
    def row(backend, device, batch, p50):
        return LatencyRow(backend, batch, device=device, status="ok", precision="fp32",
                          precision_requested="fp32", verified="parity passed", p50_ms=p50,
                          p90_ms=p50 * 1.1, images_per_s=1000 * batch / p50)
    rows = [row("ort-cpu", "cpu", 1, 5.0), row("ort-cuda", "cuda", 1, 6.0),
            row("ort-cpu", "cpu", 8, 40.0), row("ort-cuda", "cuda", 8, 10.0)]
    advice = recommend(rows, budget_ms=6.0)
    assert advice.fastest_batch1.backend == "ort-cpu"
    assert advice.gpu_overtakes_cpu_at_batch == 8
    assert [m.backend for m in advice.meets_budget] == ["ort-cpu"]


def test_unknown_backend_is_a_usage_error(tiny_bundle):
    result = run_cli("bench", tiny_bundle, "--backends", "ort-gpu")
    assert result.exit_code == 2 and "choose from: torch-cpu" in result.stderr


@requires_cuda()
def test_cuda_backends_report_the_gpu(tiny_bundle):
    result = run_cli("bench", tiny_bundle, "--backends", "torch-cuda,ort-cuda,ort-cuda-iobinding",
                     "--batch-sizes", "1", *FAST)
    rows = json.loads((tiny_bundle / "latency.json").read_text())["rows"]
    assert result.exit_code == 0
    assert all(r["status"] == "ok" and r["device"] == "cuda" for r in rows)
    assert rows[1]["provider"] == "CUDAExecutionProvider" and rows[2]["io"] == "device"


def test_bench_on_a_bundle_without_an_export(tmp_path):
    from pipeline.core.bundle import Bundle, new_manifest

    Bundle(tmp_path).write_manifest(new_manifest())  # e.g. a bundle that only holds training files
    result = run_cli("bench", tmp_path, *FAST)
    assert result.exit_code == 2 and "has no exported ONNX model" in result.stderr


def test_report_refuses_different_models_unless_forced(bench_result, tmp_path):
    bundle, _ = bench_result
    doc = json.loads((bundle / "latency.json").read_text())
    other = json.loads(json.dumps(doc))
    other["model"]["input_size"] = 64
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json").write_text(json.dumps(other))
    refused = run_cli("report", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "cmp")
    assert refused.exit_code == 2
    assert "different models" in refused.stderr and "--force" in refused.stderr
    assert "at 32 px" in refused.stderr and "at 64 px" in refused.stderr
    forced = run_cli("report", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "cmp",
                     "--force")
    assert forced.exit_code == 0 and "merged different models" in forced.stderr


def test_report_warns_when_the_bundle_model_changed(bench_result, tmp_path):
    bundle, _ = bench_result
    copy = shutil.copytree(bundle, tmp_path / "copy")
    from pipeline.core.bundle import Bundle

    data = bytearray((copy / "model.ts").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.ts").write_bytes(bytes(data))
    Bundle(copy).update_manifest(lambda m: Bundle(copy).record_artifact(m, "model.ts", stage="export"))
    result = run_cli("report", copy / "latency.json", "--out", tmp_path / "cmp")
    assert result.exit_code == 0
    assert "torchscript-cpu:fp32 (model.ts) measured a model file that has since changed" in result.stderr
    fresh = run_cli("report", bundle / "latency.json", "--out", tmp_path / "cmp2")
    assert "has since changed" not in fresh.stderr


def test_worker_crash_and_timeout_become_error_rows(tiny_bundle, monkeypatch, tmp_path):
    import importlib

    bench = importlib.import_module("pipeline.stages.bench.protocol")

    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    config = BenchOptions(backends=("ort-cpu:fp32",), batch_sizes=(1, 2), iterations=1,
                               seconds=0, warmup_s=0, threads=1)
    # a worker that hangs: the bench gives up after the timeout and says so
    monkeypatch.setattr(bench.sys, "executable", str(hang))
    hung = bench.run_worker(tiny_bundle, "ort-cpu:fp32", config, gmacs=None, timeout_s=0.5)
    assert [r.status for r in hung.rows] == ["error", "error"]
    assert "timed out after 0.5s" in hung.rows[0].reason
    # a worker that dies without writing its result: exit status and last line in the reason
    monkeypatch.setattr(bench.sys, "executable", "/bin/false")
    crashed = bench.run_worker(tiny_bundle, "ort-cpu:fp32", config, gmacs=None)
    assert [r.batch for r in crashed.rows] == [1, 2]
    assert all(r.status == "error" and "worker exited 1" in r.reason for r in crashed.rows)
    assert crashed.rows[0].precision == "fp32" and crashed.rows[0].p50_ms is None


def test_a_worker_killed_by_a_signal_names_it_and_the_frame(tiny_bundle, monkeypatch, tmp_path):
    """A native crash (the aoti-cuda loader's SIGSEGV on an H200) becomes error rows naming the
    signal and the Python frame it happened in, from the worker's faulthandler dump."""
    import importlib
    import sys

    bench = importlib.import_module("pipeline.stages.bench.protocol")
    crash = tmp_path / "crash.sh"
    crash.write_text(f"#!/bin/sh\nexec {sys.executable} -X faulthandler -c '"
                     "import os, signal\ndef load_package():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
                     "load_package()'\n")
    crash.chmod(0o755)
    monkeypatch.setattr(bench.sys, "executable", str(crash))
    config = BenchOptions(backends=("ort-cpu:fp32",), batch_sizes=(1,), iterations=1,
                               seconds=0, warmup_s=0, threads=1)
    rows = bench.run_worker(tiny_bundle, "ort-cpu:fp32", config, gmacs=None).rows
    assert rows[0].status == "error"
    assert rows[0].reason.startswith("worker killed by SIGSEGV in File ")
    assert "in load_package" in rows[0].reason


def test_a_provider_that_cannot_load_is_named_with_the_missing_library():
    """ORT's message when the TensorRT provider's libraries are missing (seen on an H200), cut
    to the library and the loader's error; and the TensorRT check names the extra."""
    from pipeline.runtimes.ort import (
        TENSORRT_LIBRARIES,
        _load_failure_reason,
        tensorrt_problem,
    )

    log = ("2026-11-26 22:21:40 [E:onnxruntime:Default, provider_bridge_ort.cc:2043 Get] "
           "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 "
           "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : "
           "FAIL : Failed to load library /venv/lib/python3.12/site-packages/onnxruntime/capi/"
           "libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open "
           "shared object file: No such file or directory")
    assert _load_failure_reason(log) == (
        "cannot load libonnxruntime_providers_tensorrt.so: libnvinfer.so.10: cannot open shared "
        "object file: No such file or directory")
    problem = tensorrt_problem()
    if problem is not None:  # no TensorRT here: the message names what is missing and the fix
        assert TENSORRT_LIBRARIES[0] in problem and 'pip install -e ".[tensorrt]"' in problem


# ----------------------------------------------------------------------------- the throughput peak
def test_sweep_stops_after_two_back_off_steps_past_the_peak():
    from pipeline.stages.bench.timing import sweep

    plateau = {1: 100, 2: 180, 4: 250, 8: 300, 16: 305, 32: 302, 64: 290, 128: 280}
    assert sweep(lambda b: plateau[b]) == [1, 2, 4, 8, 16, 32, 64]  # 16, 32, 64: < 5% gain
    late = {1: 100, 2: 102, 4: 103, 8: 200, 16: 400, 32: 401, 64: 402, 128: 403, 256: 404}
    assert sweep(lambda b: late[b]) == [1, 2, 4, 8, 16, 32, 64, 128]  # a plateau before the peak
    assert sweep(lambda b: None if b > 4 else b * 10.0) == [1, 2, 4, 8]  # memory ran out at 8
    assert sweep(lambda b: float(b), max_batch=16) == [1, 2, 4, 8, 16]


def test_stability_windows_agree_within_ten_percent():
    from pipeline.stages.bench.timing import stable_loop, window_spread

    steady = [1_000_000] * 75
    assert window_spread(steady) == pytest.approx(0.0)
    assert window_spread(steady[:74]) is None
    noisy = [1_000_000] * 25 + [1_500_000] * 25 + [1_000_000] * 25
    assert window_spread(noisy) == pytest.approx((1 / 1.0 - 1 / 1.5) / (1 / 1.0))
    # a step that settles: the loop adds windows until the last three agree
    durations = iter([3_000_000] * 60 + [1_000_000] * 1000)
    clock = StubClock(0)

    def step():
        clock.now += next(durations)

    samples, stable, spread = stable_loop(step, iterations=10, seconds=0.0, max_seconds=10.0,
                                          clock=clock)
    assert stable is True and spread <= 0.10 and len(samples) >= 60 + 75
    never, calls = StubClock(0), [0]

    def jittery():  # 25 calls at 3 ms, 25 at 1 ms, ...: windows never agree
        calls[0] += 1
        never.now += 1_000_000 if (calls[0] // 25) % 2 else 3_000_000

    _, stable, spread = stable_loop(jittery, iterations=10, seconds=0.0, max_seconds=0.5,
                                    clock=never)
    assert stable is False and spread > 0.10
    assert stable_loop(lambda: None, iterations=5, seconds=0.0, max_seconds=0.0)[1:] == (None, None)


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_bench_sweeps_and_recommends_best_throughput(tiny_bundle):
    result = run_cli("bench", tiny_bundle, "--backends", "ort-cpu:fp32", "--iterations", "5",
                     "--seconds", "0.2", "--warmup-seconds", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    doc = json.loads((tiny_bundle / "latency.json").read_text())
    batches = [r["batch"] for r in doc["rows"]]
    assert doc["config"]["sweep"] is True and batches[:3] == [1, 2, 4] and len(batches) >= 4
    assert batches == [2 ** k for k in range(len(batches))]
    # Stability is judged once a row has three windows of calls; a row that ran out of time
    # before that (a slow or busy machine, a big batch within 3 x 0.2 s) leaves it unknown.
    windows = STABLE_WINDOWS * WINDOW_CALLS
    for row in doc["rows"]:
        if row["n"] >= windows:
            assert row["stable"] in (True, False) and row["window_spread"] >= 0, row
        else:
            assert "stable" not in row and "window_spread" not in row, row
    best = doc["recommendation"]["best_throughput"]
    assert best["images_per_s"] == max(r["images_per_s"] for r in doc["rows"])
    assert "best throughput, verified: ort-cpu fp32 at batch" in result.stdout
    assert "Best throughput (verified)" in (tiny_bundle / "report.md").read_text()


def test_openvino_throughput_mode_reports_its_streams(tiny_bundle):
    """OpenVINO's THROUGHPUT hint: the streams and infer requests it chose are read back;
    one timed step is one batch on every request, and images/s counts them all."""
    import re

    result = run_cli("bench", tiny_bundle, "--backends", "openvino-cpu-throughput:fp32",
                     "--batch-sizes", "2", "--threads", "2", *FAST)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tiny_bundle / "latency.json").read_text())["rows"]
    match = re.search(r"THROUGHPUT: (\d+) streams, (\d+) requests", row["provider"])
    assert row["status"] == "ok" and match, row
    requests = int(match.group(2))
    assert int(match.group(1)) >= 1 and requests >= 1
    assert row["images_per_s"] == pytest.approx(1000 * 2 * requests / row["p50_ms"])
    assert row["verified"] == "parity passed"  # the file openvino-cpu's parity pairs checked
