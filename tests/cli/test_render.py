"""The terminal tables: what a person reads after verify and bench."""

from __future__ import annotations

import pytest

from pipeline.cli import render
from pipeline.core.bundle import Bundle
from pipeline.core.records import (
    GateResult,
    LatencyRow,
    PairResult,
    GateRule,
    ParityReport,
    ParityRule,
    ServerSection,
    ServerStop,
)


def _report() -> ParityReport:
    rule = ParityRule(kind=ParityRule.FLOOR, floor_multiple=8.0, scale_term=1e-5)
    pairs = [PairResult("onnx-sim-ort-cpu", "random-b1", 1, max_abs=1e-6, max_abs_vs_fp64=2e-6,
                        fp32_floor=1e-6, tolerance=8e-6, margin=4.0, top1=1.0, passed=True,
                        backend="ort-cpu"),
             PairResult("onnx-ort-cuda", "random-b1", 1, error="no GPU", backend="ort-cuda")]
    gates = [GateResult("ort-cpu:int8", "ort-cpu", "int8", precision="int8", top1_agreement=1.0,
                        top5_agreement=1.0, cosine_mean=0.9999, passed=True),
             GateResult("torch-cpu:bf16", "torch-cpu", "bf16", precision="bf16", top1_agreement=0.75,
                        top5_agreement=1.0, cosine_mean=0.99, failed_on="top-1 agreement 75.00% < 99%",
                        decides_exit=False),
             GateResult("openvino-cpu:int8", "openvino-cpu", "int8", precision="int8",
                         top1_agreement=0.5, top5_agreement=1.0, cosine_mean=0.9,
                         not_meaningful="not meaningful: random weights")]
    return ParityReport(rule=rule, pairs=pairs, gates=gates,
                        gate_rule=GateRule(max_top1_drop_points=1.0, min_top1_agreement=0.99),
                        skipped={"aoti-cpu": "no compiler"})


def test_parity_table_shows_each_pair_gate_and_verdict():
    text = render.parity_table(_report())
    assert "tolerance 8 x the fp32 noise floor + 1e-05 x max|logit|" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "4.0x" in lines["onnx-sim-ort-cpu"] and lines["onnx-sim-ort-cpu"].endswith("ok")
    assert "FAIL  no GPU" in lines["onnx-ort-cuda"]
    assert lines["aoti-cpu"].endswith("skipped: no compiler")
    assert lines["ort-cpu:int8"].endswith("pass")
    assert "advisory FAIL (not recommended): top-1 agreement 75.00%" in lines["torch-cpu:bf16"]
    assert lines["openvino-cpu:int8"].endswith("not meaningful: random weights")


def test_latency_table_shows_numbers_and_reasons():
    rows = [LatencyRow("ort-cpu", 1, precision="fp32", precision_requested="fp32", p50_ms=1.25,
                       p90_ms=1.5, ms_per_image=1.25, images_per_s=800.0, gflops=2.0,
                       verified="parity passed", provider="CPUExecutionProvider"),
            LatencyRow("openvino-cpu", 1, precision="bf16", precision_requested="auto",
                       status="error", reason="the session crashed"),
            LatencyRow("openvino-cpu", 1, precision="fp32", precision_requested="fp32",
                       status="unavailable", reason="OpenVINO is not installed")]
    text = render.latency_table(rows).splitlines()
    assert text[1].split()[:5] == ["ort-cpu", "fp32", "1", "1.25", "1.50"]
    assert "parity passed" in text[1] and text[1].endswith("CPUExecutionProvider")
    assert "auto=bf16" in text[2] and "error: the session crashed" in text[2]  # failures stay rows
    assert text[3] == "not run: OpenVINO is not installed: 1 target not run (openvino-cpu:fp32)"


def test_targets_that_cannot_run_here_collapse_into_one_line_per_reason():
    """A CPU machine's bench: every GPU target at every batch size is one line, not 8 rows,
    in the terminal and in report.md; latency.json keeps the rows."""
    from pipeline.core.records import BenchConfig, BenchedModel, LatencyDoc, Machine, reason_rows
    from pipeline.stages.bench.writeup import rows_table

    no_gpu = "no CUDA GPU visible (torch.cuda.is_available() is False)"
    rows = [LatencyRow("ort-cpu", 1, precision="fp32", precision_requested="fp32", p50_ms=1.0,
                       p90_ms=1.1, p95_ms=1.2, mean_ms=1.0, std_ms=0.1, n=50, ms_per_image=1.0,
                       images_per_s=1000.0, provider="CPU")]
    for backend, precision in [("torch-cuda", "fp32"), ("ort-cuda", "fp32"), ("ort-cuda", "fp16"),
                               ("aoti-cuda", "fp32")]:
        rows += reason_rows(backend, precision, (1, 8), no_gpu)
    terminal = render.latency_table(rows).splitlines()
    assert len(terminal) == 3  # header, the row that ran, one line for the GPU targets
    assert terminal[2] == (f"not run: {no_gpu}: 4 targets not run (torch-cuda:fp32, "
                           f"ort-cuda:fp32, ort-cuda:fp16, aoti-cuda:fp32)")
    markdown = rows_table(rows, with_machine=False)
    assert sum(line.startswith("| ort-cpu") for line in markdown) == 1
    assert not any("cuda" in line for line in markdown if line.startswith("|"))
    assert f"- {no_gpu}: 4 targets not run" in "\n".join(markdown)
    doc = LatencyDoc.from_dict(LatencyDoc(model=BenchedModel(arch="r", input_size=32), config=BenchConfig(threads=1), machine=Machine(), rows=rows,
                                          created="now").to_dict(), where="test")
    assert len(doc.rows) == 9  # every row is still recorded


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_every_gpu_target_gives_one_reason_on_a_machine_without_one(tiny_bundle):
    """The real bench and verify on this CPU machine: torch, ORT (fp32 and fp16, whose file
    this bundle lacks) and TensorRT targets all say "no CUDA GPU", decided before any worker
    starts, so the terminal shows one line for them, not one per runtime's wording."""
    from pipeline.options import BenchOptions
    from pipeline.stages.bench.protocol import run_worker
    from pipeline.stages.verify import parity_candidates

    config = BenchOptions(batch_sizes=(1, 8))
    rows = [row for target in ("torch-cuda:fp32", "ort-cuda:fp32", "ort-cuda:fp16",
                               "ort-tensorrt:fp16")
            for row in run_worker(tiny_bundle, target, config, gmacs=None).rows]
    assert len(rows) == 8 and {row.status for row in rows} == {"unavailable"}
    lines = render.latency_table(rows).splitlines()[1:]
    assert lines == ["not run: no CUDA GPU visible (torch.cuda.is_available() is False): "
                     "4 targets not run (torch-cuda:fp32, ort-cuda:fp32, ort-cuda:fp16, "
                     "ort-tensorrt:fp16)"]
    _, skipped = parity_candidates(Bundle.open(tiny_bundle), with_cuda=True)
    gpu = {key for key in skipped if "cuda" in key}
    assert gpu and {skipped[key] for key in gpu} == {"no CUDA GPU visible (torch.cuda."
                                                     "is_available() is False)"}
    report = _report()
    report.skipped = skipped
    text = render.parity_table(report)
    assert sum("no CUDA GPU" in line for line in text.splitlines()) == 1


def test_server_table_compares_with_single_stream():
    baseline = LatencyRow("ort-cpu", 1, p50_ms=10.0, images_per_s=100.0)
    from pipeline.core.records import ServerRow

    section = ServerSection(scenario="server",
                            rows=[ServerRow("server", "triton-ort-cpu", 1, 4, 500, 0, None, 2.0,
                                            150.0, "ok", p50_ms=20.0, p90_ms=25.0, p99_ms=30.0)],
                            baseline=baseline, batched_ceiling=None,
                            stop=ServerStop(exit_code=0, ports_free=True), budget_ms=None, best=None,
                            seconds=2.0, warmup_s=1.0, max_batch_size=32, queue_delay_us=2000,
                            threads=2, command="bench b --scenario server", created="now")
    text = render.server_table(section)
    assert "| 4 | 150.0 | 1.50x | — | 20.00 | 25.00 | 30.00 | — | — | 500 | 0 |" in text
    assert "exit code 0, ports free again: True" in text


def _breakdown(**values: float):
    from pipeline.core.records import StageBreakdown

    stages = dict(client_ms=0.5, front_ms=0.25, triton_http_ms=0.5, queue_ms=0.0,
                  compute_input_ms=0.1, handoff_ms=2.0, batching_ms=0.05, model_ms=9.5,
                  compute_output_ms=0.1, triton_other_ms=0.0)
    stages.update(values)
    return StageBreakdown(requests=100, mean_batch=1.0, total_ms=sum(stages.values()),
                          triton_request_ms=11.75, triton_p50_ms=11.5, triton_p99_ms=14.0, **stages)


def test_server_table_breaks_down_each_level_and_checks_the_targets():
    from pipeline.core.records import PoissonSearch, PoissonTrial, ServerRow

    baseline = LatencyRow("ort-cpu", 1, p50_ms=9.0, images_per_s=110.0)
    ceiling = LatencyRow("ort-cpu", 16, images_per_s=115.0)
    one = ServerRow("server", "triton-ort-cpu", 1, 1, 700, 0, None, 10.0, 70.0, "ok", p50_ms=13.0,
                    p90_ms=14.0, p99_ms=18.0, breakdown=_breakdown(),
                    cpu_ms_per_request={"load generator": 0.5, "serve process": 24.0,
                                        "tritonserver": 0.6, "python backend stub": 1.0,
                                        "other": 0.2})
    many = ServerRow("server", "triton-ort-cpu", 1, 16, 1000, 0, None, 10.0, 105.0, "ok",
                     p50_ms=150.0, p90_ms=160.0, p99_ms=180.0, breakdown=_breakdown(queue_ms=50.0),
                     cpu_ms_per_request={"load generator": 0.6, "serve process": 17.0,
                                         "tritonserver": 0.6, "python backend stub": 0.6,
                                         "other": 0.2})
    trial = PoissonTrial(target_per_s=50.0, scheduled_per_s=49.5, completed_per_s=49.4,
                         requests=500, errors=0, mean_ms=30.0, p50_ms=25.0, p90_ms=60.0,
                         p99_ms=90.0, max_ms=99.0, within_bound=True, early_stopping_met=True,
                         seconds=10.1, breakdown=_breakdown(queue_ms=10.0))
    over = PoissonTrial(target_per_s=75.0, scheduled_per_s=74.0, completed_per_s=73.0,
                        requests=740, errors=0, mean_ms=60.0, p50_ms=45.0, p90_ms=110.0,
                        p99_ms=150.0, max_ms=170.0, within_bound=False, early_stopping_met=True,
                        seconds=10.0)
    section = ServerSection(scenario="server", rows=[one, many], baseline=baseline,
                            batched_ceiling=ceiling, stop=ServerStop(exit_code=0, ports_free=True),
                            budget_ms=None, best=many, seconds=10.0, warmup_s=2.0,
                            max_batch_size=32, queue_delay_us=0, threads=2, command="bench b",
                            created="now",
                            poisson=PoissonSearch(p99_bound_ms=100.0, generator="mlcommons-loadgen 6",
                                                  ceiling_per_s=105.0, trial_seconds=10.0,
                                                  trials=[trial, over], best=trial))
    text = render.server_table(section)
    assert "| stage | c=1 | c=16 | poisson 50/s | measured as |" in text
    assert "| handoff | 2.00 | 2.00 | 2.00 |" in text and "| queue | 0.00 | 50.00 | 10.00 |" in text
    assert "| **total** | **13.00** | **63.00** | **23.00** |" in text
    # 13.00 ms against 9.00 + 0 ms queue delay + 3 ms = 12.00: missed by 1 ms, handoff first
    assert "= 12.00 ms: **MISSED by 1.00 ms**" in text
    assert "the time goes to: handoff 2.00 ms" in text
    assert "105.0 images/s at concurrency 16 is 0.91x the batching ceiling" in text and "**met**" in text
    assert "| serve process | 24.00 | 17.00 |" in text
    assert "| 50 | 49.5 | 49.4 | 25.00 | 60.00 | 90.00 | 99.00 | 500 | 0 | yes | met |" in text
    assert "| 75 | 74.0 | 73.0 |" in text and "| no |" in text
    assert "Highest Poisson rate within p99 100 ms: 50 requests/s" in text
