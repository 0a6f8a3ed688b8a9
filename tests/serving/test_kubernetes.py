"""``deploy kubernetes`` (issue 27): the manifests validate against the Kubernetes schemas
(kubernetes-validate, offline, strict) and KServe's own InferenceService CRD (v0.20.0, a
fixture); the pods are sized from a real bench's latency.json; the replica count equals
report's for the same inputs; bad input is exit 2 with nothing written."""

from __future__ import annotations

import functools
import gzip
import json
import math
import shutil
from pathlib import Path

import pytest

from pipeline.core.records import (
    LatencyDoc,
    PoissonSearch,
    PoissonTrial,
    ServerSection,
    ServerStop,
)
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
KSERVE_CRD = ROOT / "tests" / "fixtures" / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz"
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
FAST = ["--iterations", "30", "--seconds", "0", "--warmup-seconds", "0"]


@pytest.fixture(scope="module")
def benched(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a real bench of ort-cpu fp32 (1 thread) in its latency.json."""
    bundle = Path(shutil.copytree(tiny_bundle_master, tmp_path_factory.mktemp("k8s") / "bundle"))
    result = run_cli("bench", bundle, "--backends", "ort-cpu:fp32", "--batch-sizes", "1",
                     "--threads", "1", "--machine", "c7i.large", *FAST)
    assert result.exit_code == 0, result.output
    return bundle


@pytest.fixture(scope="module")
def with_capacity(benched: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That latency.json plus a Poisson search at p99 100 ms (as bench --scenario server
    --arrival poisson writes it), so that a target rate can be sized."""
    doc = LatencyDoc.load(benched / "latency.json")
    best = PoissonTrial(target_per_s=37.5, scheduled_per_s=37.4, completed_per_s=37.4,
                        requests=400, errors=0, mean_ms=12.0, p50_ms=10.0, p90_ms=30.0,
                        p99_ms=70.0, max_ms=90.0, within_bound=True, early_stopping_met=True,
                        seconds=10.7)
    baseline = next(r for r in doc.rows if r.ok)
    doc.server = ServerSection(
        scenario="server", rows=[], baseline=baseline, batched_ceiling=None, stop=ServerStop(),
        budget_ms=None, best=None, seconds=10.0, warmup_s=2.0, max_batch_size=32,
        queue_delay_us=0, threads=1, command="python -m pipeline bench", created=doc.created,
        poisson=PoissonSearch(p99_bound_ms=100.0, generator="mlcommons-loadgen 6.0.17",
                              ceiling_per_s=60.0, trial_seconds=10.0, trials=[best], best=best))
    path = tmp_path_factory.mktemp("sized") / "latency.json"
    doc.dump(path)
    return path


def documents(path: Path) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_valid(document: dict) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


@functools.lru_cache(maxsize=1)
def kserve_crd() -> dict:
    """KServe's CRD (2 MB of YAML: parsed once, with libyaml where PyYAML has it)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(gzip.decompress(KSERVE_CRD.read_bytes()), Loader=loader)


def kserve_valid(document: dict) -> None:
    """Against the CRD's openAPIV3Schema. OpenAPI 3.0's schema objects follow JSON Schema
    draft 4 (a boolean exclusiveMaximum ...); the schema itself is KServe's, so it is not
    re-checked against the metaschema (3 s for 2 MB)."""
    import jsonschema

    crd = kserve_crd()
    version = next(v for v in crd["spec"]["versions"] if v["name"] == document["apiVersion"].split("/")[1])
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(document)
    assert document["kind"] == crd["spec"]["names"]["kind"]
    assert document["apiVersion"].split("/")[0] == crd["spec"]["group"]


def test_the_default_manifests_validate_and_are_sized_from_bench(benched, tmp_path):
    out = tmp_path / "k8s"
    result = run_cli("deploy", "kubernetes", benched, "--out", out)
    assert result.exit_code == 0, result.output
    docs = documents(out / "kubernetes.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for document in docs:
        k8s_valid(document)
    deployment, service, hpa = docs
    pod = deployment["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    row = next(r for r in LatencyDoc.load(benched / "latency.json").rows if r.ok)
    assert triton["resources"]["requests"]["cpu"] == "1" == str(row.threads)
    assert row.peak_rss_mib and row.peak_rss_mib > 50
    memory = 64 * math.ceil((row.peak_rss_mib + 64) / 64)
    assert triton["resources"]["requests"]["memory"] == f"{memory}Mi"
    assert "nvidia.com/gpu" not in triton["resources"]["requests"]
    assert pod["initContainers"][0]["image"].startswith("resnet18-cifar-model-repository:")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 1
    config = (out / "model_repository" / "resnet18_cifar" / "config.pbtxt").read_text()
    # ONNX Runtime runs the pod's CPUs as threads, not the node's cores
    assert 'key: "intra_op_thread_count" value: { string_value: "1" }' in config
    assert "COPY model_repository /models" in (out / "Dockerfile").read_text()
    assert "kubectl apply -f" in (out / "README.md").read_text()


def test_target_rate_replicas_equal_the_reports(benched, with_capacity, tmp_path):
    sizing = ["--p99-ms", "100", "--target-rate", "200 requests/s"]
    report = run_cli("report", with_capacity, "--out", tmp_path / "cmp", "--json", *sizing)
    assert report.exit_code == 0, report.output
    rows = {r["config"]: r for r in json.loads(report.stdout)["costs"]["rows"]}
    expected = rows["triton-ort-cpu fp32 Poisson"]["replicas"]
    assert expected == math.ceil(200 / (37.5 * 0.8)) == 7
    out = tmp_path / "k8s"
    result = run_cli("deploy", "kubernetes", benched, "--out", out, "--latency", with_capacity,
                     *sizing)
    assert result.exit_code == 0, result.output
    text = (out / "kubernetes.yaml").read_text()
    assert "# replicas: 7: ceil(200 requests/s / (37.5 images/s x 0.8)) = 7" in text
    deployment, _, hpa = documents(out / "kubernetes.yaml")
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"] == expected
    assert hpa["spec"]["maxReplicas"] == 2 * expected
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 80


def test_kserve_inference_service_validates_against_the_crd(benched, with_capacity, tmp_path):
    out = tmp_path / "kserve"
    result = run_cli("deploy", "kubernetes", benched, "--out", out, "--kserve", "--latency",
                     with_capacity, "--p99-ms", "100", "--target-rate", "100 images/s",
                     "--model-image", "registry.example.com/ml/resnet18-repo:1")
    assert result.exit_code == 0, result.output
    (service,) = documents(out / "inferenceservice.yaml")
    kserve_valid(service)
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["runtime"] == "kserve-tritonserver"
    assert predictor["model"]["storageUri"] == "oci://registry.example.com/ml/resnet18-repo:1"
    assert predictor["minReplicas"] == math.ceil(100 / (37.5 * 0.8))
    assert predictor["scaleMetric"] == "cpu"
    assert not (out / "kubernetes.yaml").exists()
    # the schema is really checked: a wrong type fails it
    import jsonschema

    broken = json.loads(json.dumps(service))
    broken["spec"]["predictor"]["minReplicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        kserve_valid(broken)


def test_fixed_replicas_write_no_autoscaler(benched, tmp_path):
    result = run_cli("deploy", "kubernetes", benched, "--out", tmp_path / "k8s", "--replicas", "3",
                     "--namespace", "vision")
    assert result.exit_code == 0, result.output
    docs = documents(tmp_path / "k8s" / "kubernetes.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert docs[0]["spec"]["replicas"] == 3 and docs[0]["metadata"]["namespace"] == "vision"
    for document in docs:
        k8s_valid(document)


def test_a_gpu_target_requests_a_gpu(benched, tmp_path):
    """A bench with a CUDA row is needed to size a GPU pod; this machine's has none."""
    result = run_cli("deploy", "kubernetes", benched, "--out", tmp_path / "k8s", "--target", "gpu")
    assert result.exit_code == 2 and "ort-tensorrt or ort-cuda row" in result.stderr
    doc = LatencyDoc.load(benched / "latency.json")
    row = next(r for r in doc.rows if r.ok)
    gpu_row = type(row)(**{**row.to_dict(), "backend": "ort-cuda", "device": "cuda"})
    doc.rows.append(gpu_row)
    doc.dump(tmp_path / "gpu.json")
    result = run_cli("deploy", "kubernetes", benched, "--out", tmp_path / "k8s", "--target", "gpu",
                     "--latency", tmp_path / "gpu.json")
    assert result.exit_code == 0, result.output
    deployment = documents(tmp_path / "k8s" / "kubernetes.yaml")[0]
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    k8s_valid(deployment)


@pytest.mark.parametrize("args, message", [
    (["--target-rate", "100 images/s"], "give it with --p99-ms"),
    (["--replicas", "2", "--target-rate", "100 images/s", "--p99-ms", "100"], "give one"),
    (["--storage-uri", "s3://bucket/repo"], "add --kserve"),
    (["--p99-ms", "1", "--target-rate", "100 images/s"], "has a capacity within p99 1 ms"),
    (["--namespace", "Bad_Name"], "is not a Kubernetes namespace name"),
    (["--latency", "missing.json"], "does not exist"),
])
def test_bad_input_is_exit_2_and_writes_nothing(benched, tmp_path, args, message):
    out = tmp_path / "k8s"
    result = run_cli("deploy", "kubernetes", benched, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_a_bundle_without_a_bench_is_refused(tiny_bundle, tmp_path):
    result = run_cli("deploy", "kubernetes", tiny_bundle, "--out", tmp_path / "k8s")
    assert result.exit_code == 2
    assert "sizes the pods from bench's measurements" in result.stderr
    assert "python -m pipeline bench" in result.stderr and not (tmp_path / "k8s").exists()


def test_readmes_kubernetes_snippets_are_valid():
    """README's adapter rule parses and its queue-based autoscaler validates."""
    import re

    import yaml

    text = (ROOT / "README.md").read_text()
    section = text.split("## Deploying on Kubernetes", 1)[1].split("\n## ", 1)[0]
    rules, hpa = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert rules["rules"][0]["name"]["as"] == "triton_queue_compute_ratio"
    assert "nv_inference_queue_duration_us" in rules["rules"][0]["metricsQuery"]
    k8s_valid(hpa)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_compute_ratio"
