import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.core.bundle import Bundle, sha256_of
from pipeline.options import FLOOR_MULTIPLE, SCALE_TERM
from pipeline.stages.verify import compare, compare_to_floor, floor_tolerance
from tests.conftest import requires_cuda, run_cli, write_images


def _rehash(bundle_dir, name):
    bundle = Bundle(bundle_dir)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, name, stage="export"))


def test_verify_passes_on_a_fresh_bundle(tiny_bundle):
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 0, result.output
    assert "x the fp32 noise floor" in result.stdout
    assert "onnx-sim-ort-cpu" in result.stdout and "onnx-sim-openvino-cpu" in result.stdout
    parity = json.loads((tiny_bundle / "parity.json").read_text())
    assert parity["rule"]["kind"] == "fp32 noise floor"
    for pair in parity["pairs"]:
        # the floor and the tolerance it earned are recorded; every pair has margin to spare
        assert 0 < pair["fp32_floor"] < pair["tolerance"] and pair["margin"] > 1
        assert pair["model_sha256"] == sha256_of(tiny_bundle / pair["model_file"])


def test_the_floor_rule_is_measured_per_model():
    fp64 = np.array([[1.0, -2.0, 3.0]])
    fp32 = fp64 + np.array([[1e-6, 0.0, -2e-6]])
    assert floor_tolerance(fp32, fp64) == pytest.approx((2e-6, FLOOR_MULTIPLE * 2e-6 + SCALE_TERM * 3.0))
    tolerance = floor_tolerance(fp32, fp64)[1]
    assert compare_to_floor(fp64 + 0.9 * tolerance, fp32, fp64).passed
    failed = compare_to_floor(fp64 + 1.1 * tolerance, fp32, fp64)
    assert not failed.passed and failed.margin == pytest.approx(1 / 1.1)
    assert not compare_to_floor(fp64 * np.nan, fp32, fp64).passed


def test_perturbed_initializer_fails_parity(tiny_bundle):
    path = tiny_bundle / "model.onnx"
    model = onnx.load(str(path))
    target = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(target).copy()
    values.flat[: values.size // 10] += 0.5
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    onnx.save(model, str(path))
    _rehash(tiny_bundle, "model.onnx")  # integrity passes; only parity can catch it

    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 1
    assert "parity FAILED" in result.stderr and "onnx-ort-cpu" in result.stderr
    parity = json.loads((tiny_bundle / "parity.json").read_text())
    assert not parity["passed"]
    failed = {p["candidate"] for p in parity["pairs"] if not p["passed"]}
    assert failed == {"onnx-ort-cpu"}


def test_five_percent_on_one_weight_tensor_is_caught(tiny_bundle):
    path = tiny_bundle / "model.sim.onnx"
    model = onnx.load(str(path))
    target = next(t for t in model.graph.initializer if len(t.dims) == 4 and t.dims[0] >= 64)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.05, target.name))
    onnx.save(model, str(path))
    _rehash(tiny_bundle, "model.sim.onnx")
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 1 and "onnx-sim" in result.stderr and "fp32 floor" in result.stderr


def test_a_preprocessing_slip_is_caught(tiny_bundle, tmp_path):
    """An export whose graph expects 0..255 inputs instead of normalised ones."""
    from onnx import helper

    path = tiny_bundle / "model.sim.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(1.02, np.float32), "slip"))
    first = graph.node[0]
    graph.node.insert(0, helper.make_node("Mul", [graph.input[0].name, "slip"], ["slipped"]))
    first.input[0] = "slipped"
    onnx.save(model, str(path))
    _rehash(tiny_bundle, "model.sim.onnx")
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 1 and "onnx-sim-ort-cpu" in result.stderr


def test_verify_never_passes_on_nothing(tiny_bundle, monkeypatch):
    """No CPU ONNX session can be made (both ORT wheels installed): exit 3, never 0."""
    from pipeline.runtimes import ort as runners

    monkeypatch.setattr(runners, "installed_ort_distributions",
                        lambda: ["onnxruntime", "onnxruntime-gpu"])
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 3, result.output
    assert "both onnxruntime and onnxruntime-gpu are installed" in result.stdout
    parity = json.loads((tiny_bundle / "parity.json").read_text())
    ort_pairs = [p for p in parity["pairs"] if p["candidate"].endswith("-ort-cpu")]
    assert ort_pairs and not any(p["passed"] for p in ort_pairs)
    assert all(p["environment"] for p in ort_pairs) and not parity["passed"]


def test_changed_byte_fails_integrity(tiny_bundle):
    path = tiny_bundle / "model.sim.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 1
    assert "model.sim.onnx" in result.stderr and "sha256" in result.stderr


def test_truncated_file_fails_integrity(tiny_bundle):
    path = tiny_bundle / "model.ts"
    path.write_bytes(path.read_bytes()[:1000])
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 1 and "model.ts" in result.stderr and "truncated" in result.stderr


def test_verify_on_real_images(tiny_bundle, tmp_path):
    write_images(tmp_path / "photos", count=4)
    result = run_cli("verify", tiny_bundle, "--images", tmp_path / "photos", "--json")
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["parity"]
    image_rows = [p for p in parity["pairs"] if p["inputs"] == "images"]
    assert image_rows and all(p["batch"] == 4 and p["passed"] for p in image_rows)


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_random_weight_gates_are_not_meaningful_on_every_cpu(tiny_bundle, tmp_path, forced_bf16):
    """On a random-weight bundle a reduced-precision gate reports its figures but no verdict,
    whether or not the CPU has bf16 units: verify's exit code is fp32 parity's alone."""
    assert run_cli("quantize", tiny_bundle, "--calibration", "synthetic", "--count", "16",
                   "--precision", "int8").exit_code == 0
    write_images(tmp_path / "photos", count=4)
    result = run_cli("verify", tiny_bundle, "--images", tmp_path / "photos", "--json")
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["parity"]
    gates = {g["candidate"]: g for g in parity["gates"]}
    assert "ort-cpu:int8" in gates and parity["passed"] is True
    for gate in gates.values():
        assert gate["not_meaningful"] == "not meaningful: random weights" and not gate["passed"]
        assert gate["top1_agreement"] is not None or gate["error"]
    if forced_bf16:
        assert gates["torch-cpu:bf16"]["decides_exit"] is False
    else:
        assert "torch-cpu:bf16" not in gates and "no bf16 units" in parity["skipped"]["torch-cpu:bf16"]
    table = run_cli("verify", tiny_bundle, "--images", tmp_path / "photos")
    assert table.exit_code == 0 and "not meaningful: random weights" in table.stdout


def test_runtime_only_gates_are_advisory_and_variant_gates_decide():
    from pipeline.stages.verify import GateResult, PairResult, ParityReport, ParityRule

    pair = PairResult("onnx-ort-cpu", "random-b1", 1, passed=True, backend="ort-cpu")
    bf16 = GateResult("torch-cpu:bf16", "torch-cpu", "bf16", passed=False, failed_on="top-1",
                      decides_exit=False)
    report = ParityReport(rule=ParityRule(kind=ParityRule.FLOOR), pairs=[pair], gates=[bf16])
    assert report and report.advisories == [bf16] and report.failures == []
    int8 = GateResult("ort-cpu:int8", "ort-cpu", "int8", passed=False, failed_on="top-1")
    report.gates.append(int8)
    assert not report and report.failures == [int8]


def test_tolerance_zero_is_reported_as_failure(tiny_bundle):
    result = run_cli("verify", tiny_bundle, "--atol", "0", "--rtol", "0")
    # Different kernels are not bit-identical, so zero tolerance must fail somewhere.
    assert result.exit_code == 1 and "worst:" in result.stderr
    assert "atol 0, rtol 0" in result.stdout


def test_atol_rtol_override_the_floor_rule(tiny_bundle):
    result = run_cli("verify", tiny_bundle, "--atol", "2e-3", "--rtol", "1e-3", "--json")
    assert result.exit_code == 0
    rule = json.loads(result.stdout)["parity"]["rule"]
    assert rule == {"kind": "allclose vs eager fp32", "atol": 2e-3, "rtol": 1e-3,
                    "formula": "|candidate - fp32| <= atol + rtol * |fp32|"}


def test_json_output_is_clean(tiny_bundle):
    result = run_cli("verify", tiny_bundle, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["parity"]["passed"] is True


def test_cuda_pairs_are_skipped_with_a_reason_without_gpu(tiny_bundle, cuda_available):
    parity = json.loads(run_cli("verify", tiny_bundle, "--json").stdout)["parity"]
    cuda_rows = [p for p in parity["pairs"] if "cuda" in p["candidate"]]
    if cuda_available:
        assert cuda_rows and all(p["provider"] == "CUDAExecutionProvider" for p in cuda_rows)
    else:
        assert not cuda_rows
        assert "no CUDA GPU" in parity["skipped"]["onnx-ort-cuda"]


@requires_cuda()
def test_cuda_provider_parity(tiny_bundle):
    parity = json.loads(run_cli("verify", tiny_bundle, "--json").stdout)["parity"]
    cuda_rows = [p for p in parity["pairs"] if p["candidate"].endswith("ort-cuda")]
    assert cuda_rows and all(p["passed"] for p in cuda_rows)


def test_compare_reports_errors_and_topk():
    ref = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    cand = ref.copy()
    cand[0, 0] = 1.5
    result = compare(cand, ref, atol=1e-4, rtol=1e-3)
    assert result.max_abs == 0.5 and result.max_rel == 0.5
    assert result.top1 == 1.0 and result.top5 == 1.0 and not result.passed
    swapped = ref[:, ::-1].copy()
    assert compare(swapped, ref, atol=1e-4, rtol=1e-3).top1 == 0.0


def test_a_named_precision_is_gated_on_every_cpu(tiny_bundle, tmp_path, forced_bf16):
    """--precisions bf16 gates bf16 whether or not the CPU has bf16 units (emulated where it
    has none), and makes it decide the exit code; on random weights it is still not
    meaningful, so the verdict is fp32 parity's on every CPU."""
    write_images(tmp_path / "photos", count=4)
    result = run_cli("verify", tiny_bundle, "--cpu-only", "--images", tmp_path / "photos",
                     "--precisions", "bf16", "--json")
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["parity"]
    gates = {g["candidate"]: g for g in parity["gates"]}
    bf16 = gates["torch-cpu:bf16"]
    assert bf16["decides_exit"] is True and bf16["not_meaningful"] and bf16["precision"] == "bf16"
    assert parity["gate_rule"]["named"] == ["bf16"] and "torch-cpu:bf16" not in parity["skipped"]


@pytest.mark.parametrize("args,code,message", [
    (["--precisions", "int9"], 2, "'int9' is not a gated precision"),
    (["--precisions", "int8"], 2, "(no model.int8.onnx); run: python -m pipeline quantize"),
    (["--precisions", "bf16"], 2, "needs evaluation images"),
])
def test_named_precisions_that_cannot_be_gated_are_refused(tiny_bundle, args, code, message):
    result = run_cli("verify", tiny_bundle, "--cpu-only", *args)
    assert result.exit_code == code and message in result.stderr, result.output
    assert "Traceback" not in result.output


def test_a_named_runtime_precision_that_fails_decides_the_exit_code():
    from pipeline.stages.verify import GateResult, PairResult, ParityReport, ParityRule

    pair = PairResult("onnx-ort-cpu", "random-b1", 1, passed=True, backend="ort-cpu")
    named = GateResult("torch-cpu:bf16", "torch-cpu", "bf16", passed=False, failed_on="top-1",
                       decides_exit=True)
    report = ParityReport(rule=ParityRule(kind=ParityRule.FLOOR), pairs=[pair], gates=[named])
    assert not report and report.failures == [named] and report.advisories == []
    assert "accuracy gate FAILED for torch-cpu:bf16" in report.failure_summary()
