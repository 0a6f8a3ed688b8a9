import json

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.bundle import Bundle
from pipeline.verify import compare
from tests.conftest import requires_cuda, run_cli, write_images


def _rehash(bundle_dir, name):
    bundle = Bundle(bundle_dir)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, name, stage="export"))


def test_verify_passes_on_a_fresh_bundle(tiny_bundle):
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 0, result.output
    assert "atol 0.002, rtol 0.001" in result.stdout
    assert "onnx-sim-ort-cpu" in result.stdout


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


def test_tolerance_zero_is_reported_as_failure(tiny_bundle):
    result = run_cli("verify", tiny_bundle, "--atol", "0", "--rtol", "0")
    # Different kernels are not bit-identical, so zero tolerance must fail somewhere.
    assert result.exit_code == 1 and "worst:" in result.stderr


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
    assert result["max_abs"] == 0.5 and result["max_rel"] == 0.5
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and not result["passed"]
    swapped = ref[:, ::-1].copy()
    assert compare(swapped, ref, atol=1e-4, rtol=1e-3)["top1"] == 0.0
