"""deploy triton: the model repository, read back with Triton's own ModelConfig schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import run_cli, run_module


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _with_bench_sweep(bundle: Path, sizes: tuple[int, ...]) -> None:
    """A latency.json whose ORT sweep measured ``sizes`` (and 128, above max_batch_size)."""
    from pipeline.core.records import BenchConfig, BenchedModel, LatencyDoc, LatencyRow, Machine

    rows = [LatencyRow("ort-cpu", n, p50_ms=1.0) for n in (*sizes, 128)]
    LatencyDoc(model=BenchedModel(arch="resnet18_cifar", input_size=32),
               config=BenchConfig(threads=1), machine=Machine(), rows=rows,
               created="2026-12-02T00:00:00+0000").dump(bundle / "latency.json")


def test_cpu_repository_matches_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    _with_bench_sweep(tiny_bundle, (1, 8, 32))
    out = tmp_path / "repo"
    result = run_cli("deploy", "triton", tiny_bundle, "--out", out, "--json", "--threads", "2")
    assert result.exit_code == 0, result.stderr
    written = json.loads(result.stdout)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    name = manifest["model"]["arch"]
    config = _parse(out / name / "config.pbtxt")

    assert config.name == name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    (inp,), (outp,) = config.input, config.output
    size = manifest["model"]["input_size"]
    assert inp.name == "input" and list(inp.dims) == [3, size, size]
    assert outp.name == "logits" and list(outp.dims) == [len(manifest["model"]["class_names"])]
    from tritonclient.grpc import model_config_pb2 as pb

    assert inp.data_type == outp.data_type == pb.TYPE_FP32
    assert outp.label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    (group,) = config.instance_group
    assert group.count == 1 and group.kind == pb.ModelInstanceGroup.KIND_CPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert config.parameters["intra_op_thread_count"].string_value == "2"  # ORT's threads

    labels = (out / name / "labels.txt").read_text().splitlines()
    assert labels == manifest["model"]["class_names"]
    model = out / name / "1" / "model.onnx"
    assert model.read_bytes() == (tiny_bundle / "model.sim.onnx").read_bytes()
    assert written["preferred_batch_size"] == [8, 32]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((5, 3, size, size), np.float32)})[0]
    assert logits.shape == (5, len(labels))  # the batch axis Triton will fill is really dynamic
    readme = (out / "README.md").read_text()
    assert "tritonserver --model-repository" in readme
    # the request bound for a standalone Triton: the largest valid binary request
    limit = config.max_batch_size * 3 * size * size * 4 + (1 << 20)
    assert f"--http-max-input-size={limit}" in readme


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_gpu_repository_asks_tensorrt_for_the_precision(precision: str, tiny_bundle: Path,
                                                         tmp_path: Path) -> None:
    if precision == "int8":  # a stand-in file: the config must point at the int8 variant
        from pipeline.core.bundle import Bundle

        shutil.copy(tiny_bundle / "model.sim.onnx", tiny_bundle / "model.int8.onnx")
        bundle = Bundle.open(tiny_bundle)
        bundle.update_manifest(lambda m: bundle.record_artifact(m, "model.int8.onnx", stage="quantize"))
    out = tmp_path / "repo"
    result = run_cli("deploy", "triton", tiny_bundle, "--out", out, "--target", "gpu",
                     "--precision", precision, "--max-batch-size", "16", "--instances", "2")
    assert result.exit_code == 0, result.stderr
    from tritonclient.grpc import model_config_pb2 as pb

    config = _parse(next(out.glob("*/config.pbtxt")))
    assert config.max_batch_size == 16
    (group,) = config.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_GPU and group.count == 2
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == precision.upper()


def test_bad_input_exits_2_and_writes_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    missing = run_module("deploy", "triton", tmp_path / "nope", "--out", out)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    no_int8 = run_module("deploy", "triton", tiny_bundle, "--out", out, "--target", "gpu",
                         "--precision", "int8")
    assert no_int8.returncode == 2 and "quantize" in no_int8.stderr
    cpu_int8 = run_module("deploy", "triton", tiny_bundle, "--out", out, "--precision", "fp16")
    assert cpu_int8.returncode == 2 and "--target gpu" in cpu_int8.stderr
    assert not any(out.rglob("config.pbtxt"))
    (tiny_bundle / "model.sim.onnx").write_bytes(b"changed")
    changed = run_module("deploy", "triton", tiny_bundle, "--out", out)
    assert changed.returncode == 1 and "integrity" in changed.stderr
    assert not any(out.rglob("config.pbtxt"))


def test_serves_repository_runs_the_bundles_file_in_the_python_backend(tiny_bundle: Path,
                                                                       tmp_path: Path) -> None:
    """serve's own repository: Triton's schema reads it; the Python backend gets the file,
    precision and threads serve was given; model.py imports this checkout's backend."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as pb

    from pipeline.core.bundle import Bundle
    from pipeline.options import ServeOptions
    from pipeline.runtimes.registry import served_model
    from pipeline.serving.backend import parameters
    from pipeline.serving.repository import served_repository

    bundle = Bundle.open(tiny_bundle)
    model = served_model(bundle, "fp32")
    options = ServeOptions(max_batch_size=8, queue_delay_us=0, instances=2, threads=1)
    root = served_repository(tmp_path / "models", model, options, [4, 8])
    config = _parse(root / model.name / "config.pbtxt")
    assert config.backend == "python" and not config.platform
    assert config.max_batch_size == 8
    (inp,), (outp,) = config.input, config.output
    assert (inp.name, list(inp.dims)) == (model.input_name, list(model.input_shape))
    assert (outp.name, list(outp.dims)) == (model.output_name, [model.classes])
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == pb.ModelInstanceGroup.KIND_CPU
    # Triton hands the backend its config as JSON; the backend reads its parameters from it
    given = parameters(json_format.MessageToDict(config, preserving_proto_field_name=True))
    assert given == {"model_file": str((tiny_bundle / model.model_file.name).resolve()),
                     "precision": "fp32", "threads": "1"}
    source = (root / model.name / "1" / "model.py").read_text()
    assert "from pipeline.serving.backend import TritonPythonModel" in source
    assert json.dumps(str(Path(__file__).resolve().parents[2])) in source
