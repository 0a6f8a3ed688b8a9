"""The typed documents: round trips, strict keys, schema versions, and the previous version's
files (committed as that version wrote them, in tests/fixtures/previous/) still reading back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.core.records import (
    PARITY_SCHEMA_VERSION,
    BenchConfig,
    BenchedModel,
    CalibrationRecord,
    GateResult,
    ImageLoop,
    LatencyDoc,
    LatencyRow,
    Machine,
    ModelSection,
    PairResult,
    Percentiles,
    ParityReport,
    ParityRule,
    PipelinedLoop,
    PoissonSearch,
    PoissonTrial,
    SequentialLoop,
    ServerRow,
    ServerSection,
    ServerStop,
    StageBreakdown,
)
from pipeline.errors import InputError
from tests.conftest import run_cli

PREVIOUS = Path(__file__).resolve().parents[1] / "fixtures" / "previous"


def _stats(p50: float) -> Percentiles:
    return Percentiles(n=2, mean_ms=p50, std_ms=0.1, min_ms=p50, p50_ms=p50, p90_ms=p50,
                       p95_ms=p50, p99_ms=None, p99_note="omitted: n=2 < 600", max_ms=p50)


def _doc() -> LatencyDoc:
    rows = [LatencyRow("ort-cpu", 1, precision="fp32", precision_requested="fp32", p50_ms=1.5,
                       p90_ms=1.7, images_per_s=666.7, verified="parity passed"),
            LatencyRow("openvino-cpu", 1, precision="bf16", precision_requested="auto",
                       status="unavailable", reason="not installed")]
    stages = StageBreakdown(requests=10, queue_ms=0.1, compute_input_ms=0.1, compute_output_ms=0.1,
                            triton_other_ms=0.0, triton_request_ms=2.0, model_ms=1.5, handoff_ms=0.2,
                            triton_p99_ms=2.5)
    trial = PoissonTrial(target_per_s=5.0, scheduled_per_s=5.1, completed_per_s=5.1, requests=100,
                         errors=0, mean_ms=2.0, p50_ms=2.0, p90_ms=2.5, p99_ms=3.0, max_ms=3.5,
                         within_bound=True, early_stopping_met=False, seconds=19.6, breakdown=stages)
    server = ServerSection(scenario="server", rows=[ServerRow("server", "triton-ort-cpu", 1, 4, 10, 0,
                                                              None, 1.0, 10.0, "ok", p99_ms=3.0,
                                                              breakdown=stages,
                                                              cpu_ms_per_request={"other": 0.1})],
                           baseline=rows[0], batched_ceiling=None, stop=ServerStop(exit_code=0),
                           budget_ms=None, best=None, seconds=1.0, warmup_s=1.0, max_batch_size=8,
                           queue_delay_us=100, threads=2, command="bench", created="now",
                           poisson=PoissonSearch(p99_bound_ms=10.0, generator="mlcommons-loadgen",
                                                 ceiling_per_s=10.0, trial_seconds=1.0,
                                                 trials=[trial], best=trial))
    loop = ImageLoop(backend="ort-cpu", device="cpu (x)", files=2, summary="device:cpu ...",
                     sequential=SequentialLoop(n=2, wall_s=0.1, images_per_s=20.0,
                                               decode=_stats(1.0), infer=_stats(2.0),
                                               total_s=0.006, lines=["1/2: a.png 0.003s"],
                                               skipped=[]),
                     pipelined=PipelinedLoop(n=2, workers=2, wall_s=0.05, images_per_s=40.0))
    return LatencyDoc(model=BenchedModel(arch="resnet18", input_size=224),
                      config=BenchConfig(threads=2), machine=Machine(cpu="x"),
                      rows=rows, created="2026-12-02", command="python -m pipeline bench b",
                      server=server, images=[loop])


def test_latency_doc_round_trips(tmp_path):
    doc = _doc()
    doc.dump(tmp_path / "latency.json")
    back = LatencyDoc.load(tmp_path / "latency.json")
    assert back == doc
    assert isinstance(back.rows[0], LatencyRow) and isinstance(back.server.rows[0], ServerRow)
    assert isinstance(back.images[0].pipelined, PipelinedLoop)
    assert isinstance(back.server.rows[0].breakdown, StageBreakdown)
    assert isinstance(back.server.poisson.best.breakdown, StageBreakdown)
    assert back.server.baseline == doc.rows[0]
    assert back.rows[1].precision_label == "auto=bf16" and not back.rows[1].ok


def test_optional_keys_are_left_out_and_may_be_absent(tmp_path):
    data = _doc().to_dict()
    assert "machine" not in data["rows"][0] and "arch" not in data["rows"][0]
    assert "n" not in data["server"]["rows"][0]  # a level without latencies has no stats
    del data["server"]
    (tmp_path / "latency.json").write_text(json.dumps(data))
    assert LatencyDoc.load(tmp_path / "latency.json").server is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rows"][0].update(p50=1.0), "rows[0]: unknown key 'p50'"),
    (lambda d: d["rows"][1].pop("status"), "rows[1]: missing key 'status'"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["server"]["rows"][0].pop("concurrency"), "server.rows[0]: missing key 'concurrency'"),
])
def test_a_wrong_key_names_the_file_and_the_key(tmp_path, change, message):
    data = _doc().to_dict()
    change(data)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        LatencyDoc.load(path)
    assert str(path) in str(caught.value) and caught.value.exit_code == 2


def test_another_schema_version_is_refused_with_the_fix(tmp_path):
    data = {**_doc().to_dict(), "schema_version": 1}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="schema_version 1; this pipeline reads 4. Make a new "
                                         "one with python -m pipeline bench"):
        LatencyDoc.load(path)


def test_the_cli_maps_a_bad_key_to_exit_2(tmp_path):
    data = _doc().to_dict()
    data["rows"][0]["p50"] = 1.0
    (tmp_path / "latency.json").write_text(json.dumps(data))
    result = run_cli("report", tmp_path / "latency.json", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "unknown key 'p50'" in result.stderr
    assert "Traceback" not in result.output


def test_parity_report_round_trips_and_stays_truthy(tmp_path):
    report = ParityReport(rule=ParityRule(kind=ParityRule.FLOOR),
                          pairs=[PairResult("onnx-ort-cpu", "random-b1", 1, passed=True,
                                            backend="ort-cpu")],
                          gates=[GateResult("torch-cpu:bf16", "torch-cpu", "bf16", passed=False,
                                            decides_exit=False)])
    report.dump(tmp_path / "parity.json")
    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["schema_version"] == PARITY_SCHEMA_VERSION and data["passed"] is True
    back = ParityReport.load(tmp_path / "parity.json")
    assert back == report and back and back.advisories == back.gates


def test_calibration_record_round_trips(tmp_path):
    record = CalibrationRecord(source="image folder x", split=None, count=3, requested=300,
                               method="minmax", files_sha256=["a", "b", "c"])
    record.dump(tmp_path / "calibration.json")
    assert CalibrationRecord.load(tmp_path / "calibration.json") == record


def test_model_section_says_which_weights():
    manifest = {"model": {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"],
                          "input_size": 64, "preprocessing": {}, "weights": {"source": "random"}}}
    assert ModelSection.of(manifest, "m.json").random_weights
    with pytest.raises(InputError, match="m.json has no model section"):
        ModelSection.of({}, "m.json")


# ----------------------------------------------------------------------------- the previous version
def test_the_previous_versions_files_read_back(tmp_path):
    """parity.json, latency.json, calibration.json and manifest.json exactly as the version
    before the layered package wrote them (a random-weight resnet18_cifar bundle, quantized on
    16 synthetic images, verified with 4 --images on an AVX512-BF16 CPU, benched): they load,
    and the old parity.json is upgraded, not refused, keeping its verdict."""
    import shutil

    from pipeline.core.bundle import Bundle

    parity = ParityReport.load(PREVIOUS / "parity.json")
    assert {p.backend for p in parity.pairs} >= {"ort-cpu", "torchscript-cpu", "torch-export-cpu"}
    assert all(p.passed for p in parity.pairs)
    # That version gated bf16 and int8 on random weights, and they failed: the verdict stands
    # (int8 decides), bf16 becomes advisory.
    assert not parity and {g.candidate for g in parity.failures} == {"ort-cpu:int8",
                                                                      "openvino-cpu:int8"}
    assert [g.candidate for g in parity.advisories] == ["torch-cpu:bf16"]
    latency = LatencyDoc.load(PREVIOUS / "latency.json")
    assert {r.backend for r in latency.rows} == {"ort-cpu", "torch-cpu"}
    calibration = CalibrationRecord.load(PREVIOUS / "calibration.json")
    assert calibration.count == 16 and calibration.files_sha256 is None  # synthetic images
    shutil.copy(PREVIOUS / "manifest.json", tmp_path / "manifest.json")
    bundle = Bundle.open(tmp_path)
    assert ModelSection.read(bundle).random_weights and ModelSection.read(bundle).input_size == 32


def _as_previous_version(bundle: Path) -> None:
    """Rewrite the bundle's JSON files in the previous version's format: parity.json without
    schema_version, pairs without ``backend``, gates without the verdict fields;
    calibration.json without schema_version."""
    parity = json.loads((bundle / "parity.json").read_text())
    del parity["schema_version"]
    for pair in parity["pairs"]:
        del pair["backend"]
    for gate in parity["gates"]:
        del gate["decides_exit"], gate["not_meaningful"]
    (bundle / "parity.json").write_text(json.dumps(parity))
    calibration = json.loads((bundle / "calibration.json").read_text())
    del calibration["schema_version"]
    (bundle / "calibration.json").write_text(json.dumps(calibration))
    from pipeline.core.bundle import Bundle

    opened = Bundle(bundle)  # as that version recorded it: its own sha256 in the manifest
    opened.update_manifest(lambda m: opened.record_artifact(m, "calibration.json", stage="quantize"))


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_a_previous_version_bundle_benchmarks_and_verifies(tiny_bundle):
    assert run_cli("quantize", tiny_bundle, "--calibration", "synthetic", "--count", "16",
                   "--precision", "int8").exit_code == 0
    assert run_cli("verify", tiny_bundle).exit_code == 0
    _as_previous_version(tiny_bundle)
    bench = run_cli("bench", tiny_bundle, "--backends", "ort-cpu:fp32", "--batch-sizes", "1",
                    "--iterations", "3", "--seconds", "0", "--warmup-seconds", "0", "--json")
    assert bench.exit_code == 0, bench.output
    (row,) = json.loads(bench.stdout)["rows"]
    assert row["verified"] == "parity passed"  # read from the previous version's parity.json
    verify = run_cli("verify", tiny_bundle)
    assert verify.exit_code == 0, verify.output
    assert json.loads((tiny_bundle / "parity.json").read_text())["schema_version"] == PARITY_SCHEMA_VERSION


def test_a_version_2_parity_file_is_read_and_gains_an_empty_localization(tmp_path):
    """parity.json as the version before --localize wrote it: schema 2, no "localized"."""
    report = ParityReport(rule=ParityRule(kind=ParityRule.FLOOR),
                          pairs=[PairResult("onnx-ort-cpu", "random-b1", 1, passed=True,
                                            backend="ort-cpu")])
    data = report.to_dict()
    del data["localized"]
    data["schema_version"] = 2
    (tmp_path / "parity.json").write_text(json.dumps(data))
    back = ParityReport.load(tmp_path / "parity.json")
    assert back.localized == [] and back.schema_version == PARITY_SCHEMA_VERSION and back
