"""The Python API, called the way a notebook or a CI script calls it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import CheckFailed, EnvironmentUnavailable, InputError
from tests.conftest import TINY_ARCH, drift_onnx, write_images

CLASSES = [f"c{i}" for i in range(10)]


def test_import_is_light() -> None:
    code = ("import sys, pipeline; heavy = [m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', "
            "'openvino', 'torchvision') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_api_lists_every_stage() -> None:
    for name in ("train", "export", "verify", "quantize", "bench", "predict", "run", "report"):
        assert callable(getattr(pipeline, name)) and getattr(pipeline, name).__doc__


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_notebook_export_verify_bench_predict(tmp_path: Path) -> None:
    lines: list[str] = []
    result = pipeline.export(TINY_ARCH, out=tmp_path / "b", class_names=CLASSES, simplify=False,
                             verify=False, log=lines.append)
    assert result and result.parity is None and result.bundle == tmp_path / "b"
    assert {"model.onnx", "model.ts", "model.pt2", "weights.pt"} <= set(result.manifest["artifacts"])
    assert "onnx" in result.durations and "pt2" in result.durations
    assert any("exporting" in line for line in lines)

    report = pipeline.verify(result.bundle, cuda=False)
    assert report and not report.failures
    assert {p.candidate for p in report.pairs} >= {"torchscript-cpu", "onnx-ort-cpu", "torch-export-cpu"}

    bench = pipeline.bench(result.bundle, backends=["ort-cpu:fp32", "torch-export-cpu"],
                           batch_sizes=[1], iterations=5, seconds=0, warmup_seconds=0)
    assert {r.backend for r in bench.rows if r.ok} == {"ort-cpu", "torch-export-cpu"}
    assert bench.recommendation.fastest_batch1.backend in {"ort-cpu", "torch-export-cpu"}
    assert json.loads((result.bundle / "latency.json").read_text())["rows"] == \
        [row.to_dict() for row in bench.rows]

    images = write_images(tmp_path / "imgs", count=2)
    by_onnx = pipeline.predict(result.bundle, images, top_k=3)
    by_pt2 = pipeline.predict(result.bundle / "model.pt2", tmp_path / "imgs", top_k=3)
    assert [p.top[0].label for p in by_onnx] == [p.top[0].label for p in by_pt2]
    assert all(len(p.top) == 3 and p.error is None for p in by_pt2)


def test_every_stage_result_has_the_one_shape(tiny_bundle: Path, tmp_path: Path) -> None:
    """path, summary and record, on every stage's result: a StageResult, with typed records
    (no dict where a stage hands something on)."""
    from pipeline.core.records import (
        CalibrationRecord,
        LatencyDoc,
        ParityReport,
        QuantizedVariant,
        Recommendation,
        StageResult,
        TritonRepository,
    )
    from pipeline.serving.kubernetes import KubernetesDeployment

    quantized = pipeline.quantize(tiny_bundle, precisions="int8", calibration="synthetic",
                                  count=16, log=lambda line: None)
    report = pipeline.verify(tiny_bundle, cuda=False)
    bench = pipeline.bench(tiny_bundle, backends="ort-cpu", batch_sizes=[1], iterations=5,
                           seconds=0, warmup_seconds=0, log=lambda line: None)
    merged = pipeline.report([tiny_bundle / "latency.json"], out=tmp_path / "cmp")
    deployed = pipeline.deploy_triton(tiny_bundle, tmp_path / "repo")
    cluster = pipeline.deploy_kubernetes(tiny_bundle, tmp_path / "k8s", replicas=2)
    calibration = CalibrationRecord.load(tiny_bundle / "calibration.json")
    for result, record in ((quantized, dict), (report, ParityReport), (bench, LatencyDoc),
                           (merged, Recommendation), (deployed, TritonRepository),
                           (cluster, KubernetesDeployment), (calibration, CalibrationRecord)):
        assert isinstance(result, StageResult), type(result)
        assert isinstance(result.record, record), (type(result), type(result.record))
        assert result.path is not None and Path(result.path).exists(), (type(result), result.path)
        assert isinstance(result.summary, str) and result.summary
    assert quantized.precisions == ["int8"] and report.path == tiny_bundle / "parity.json"
    assert isinstance(quantized.record["int8"], QuantizedVariant)
    assert quantized.record["int8"].calibration["count"] == 16
    assert isinstance(bench.recommendation, Recommendation)
    assert LatencyDoc.load(bench.path).recommendation == bench.recommendation
    assert not hasattr(merged, "__iter__") and not isinstance(quantized, dict)
    assert cluster.record.sizing.replicas == 2 and merged.costs is None
    costs = pipeline.report([tiny_bundle / "latency.json"], out=tmp_path / "cmp2",
                            prices={bench.doc.machine_label: 0.25}).costs
    assert costs.prices == {bench.doc.machine_label: 0.25} and costs.rows


def test_verify_report_is_falsy_when_a_pair_fails(tiny_bundle: Path) -> None:
    drift_onnx(tiny_bundle)
    report = pipeline.verify(tiny_bundle, cuda=False)
    assert not report and any(f.candidate == "onnx-sim-ort-cpu" for f in report.failures)


def test_typed_errors_never_system_exit(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(InputError, match="resnet19"):
        pipeline.export("resnet19", out=tmp_path / "x")
    with pytest.raises(InputError, match="batch-sizes"):
        pipeline.bench(tiny_bundle, batch_sizes="0")
    with pytest.raises(InputError, match="unknown backend"):
        pipeline.bench(tiny_bundle, backends="ort-gpu")
    with pytest.raises(InputError, match="does not exist"):
        pipeline.predict(tmp_path / "missing.onnx", [tmp_path])
    with pytest.raises(InputError, match="unknown training option"):
        pipeline.train(TINY_ARCH, epochz=3)
    (tiny_bundle / "model.ts").write_bytes(b"changed")
    with pytest.raises(CheckFailed, match="model.ts"):
        pipeline.verify(tiny_bundle)
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    with pytest.raises(EnvironmentUnavailable, match="C\\+\\+ compiler"):
        pipeline.export(TINY_ARCH, out=tmp_path / "y", aoti=True)
    assert not (tmp_path / "y").exists()


def test_train_and_resume_through_the_api(tmp_path: Path) -> None:
    options = dict(out=tmp_path / "t", input_size=32, synthetic_per_class=8, batch_size=8,
                   workers=0, device="cpu", progress=False)
    first = pipeline.train(TINY_ARCH, "synthetic", epochs=1, log=lambda line: None, **options)
    assert first.epochs == 1 and first.classes and (first.bundle / "last.pt").is_file()
    resumed = pipeline.train(resume=first.bundle / "last.pt", epochs=2, log=lambda line: None)
    assert resumed.epochs == 2 and resumed.bundle == first.bundle
    assert resumed.record.arch == TINY_ARCH and TINY_ARCH in resumed.summary
