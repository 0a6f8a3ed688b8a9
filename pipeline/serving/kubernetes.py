"""``deploy kubernetes``: Triton on a cluster, sized from bench's measurements.

It writes, into one folder:

    model_repository/     deploy triton's repository (ONNX Runtime backend)
    Dockerfile            an image that carries the repository under /models
    kubernetes.yaml       Deployment + Service + HorizontalPodAutoscaler     (default)
    inferenceservice.yaml a KServe InferenceService, Triton runtime          (--kserve)
    README.md             the commands: build and push the image, kubectl apply

How the repository reaches the pod: the model image (``Dockerfile``: busybox plus the
repository). The Deployment's init container copies it into an emptyDir that Triton reads;
KServe pulls the same image as a modelcar (``storageUri: oci://IMAGE``), or any other
``--storage-uri`` KServe's storage initializer reads (s3://, gs://, pvc://). Every cluster
that can pull an image can run it, at any replica count, with no shared volume.

The pods are sized from the latency file (the bundle's latency.json by default):
- CPU request = the threads the configuration ran with; no CPU limit (CFS throttling at a
  limit shows up as p99 spikes);
- memory request = the bench worker's peak resident memory for it (at the largest batch size
  measured within the repository's max_batch_size, as Triton may batch that far) plus tritonserver's own
  (``TRITON_OWN_MIB``, its resident size measured with an empty repository), rounded up to
  64 MiB; the limit is 1.5 times that;
- ``nvidia.com/gpu: 1`` for a GPU target.
The replica count is fixed (``--replicas``), or sized from ``--target-rate`` within
``--p99-ms`` with ``core.capacity`` (the function ``report`` uses, so the two agree), written
into a comment in the manifest, and the autoscaler's floor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.core.bundle import LATENCY, Bundle, atomic_path, ensure_writable_dir
from pipeline.core.capacity import SERVED_BACKEND, CostRow, Rate, cost_table
from pipeline.core.records import LatencyDoc, LatencyRow, Record
from pipeline.errors import InputError
from pipeline.options import KubernetesOptions
from pipeline.serving.repository import triton_repository

# The Triton this project serves with: PyTriton 0.7.0 bundles tritonserver 2.51.0 (the
# serving tests read the version back from its /v2 endpoint), which NGC ships as release 24.10.
TRITON_VERSION = "2.51.0"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
KSERVE_VERSION = "v0.20.0"  # the InferenceService schema the output is validated against
TRITON_OWN_MIB = 64  # tritonserver's resident size with no model: 34 MiB measured, rounded up
HTTP, GRPC, METRICS = 8000, 8001, 8002
MANIFEST_FILE, KSERVE_FILE = "kubernetes.yaml", "inferenceservice.yaml"


@dataclass
class Sizing(Record):
    """How many replicas, and why: the configuration measured, its capacity, the arithmetic."""

    WRITE_NONE = True

    replicas: int
    max_replicas: int | None  # None: a fixed count, no autoscaler
    how: str  # "fixed by --replicas", or the capacity arithmetic
    configuration: str | None = None  # the measured configuration it is sized from
    capacity_per_s: float | None = None
    target_rate: str | None = None
    headroom: float | None = None


@dataclass
class PodSize(Record):
    """The container's resources, and the measurement behind each."""

    cpu: int
    memory_mib: int
    memory_limit_mib: int
    gpu: bool
    basis: str


@dataclass
class KubernetesDeployment(Record):
    """What ``deploy kubernetes`` wrote."""

    NESTED = {"sizing": Sizing, "pod": PodSize}

    out: str
    name: str
    manifests: list[str]
    repository: str
    image: str  # the Triton image
    model_image: str
    sizing: Sizing
    pod: PodSize
    kserve: bool = False
    storage_uri: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.out)

    @property
    def summary(self) -> str:
        kind = "KServe InferenceService" if self.kserve else "Deployment, Service and autoscaler"
        return (f"{kind} for {self.name}: {self.sizing.replicas} replica"
                f"{'s' if self.sizing.replicas != 1 else ''} of {self.pod.cpu} CPU, "
                f"{self.pod.memory_mib} MiB{', 1 GPU' if self.pod.gpu else ''} ({self.sizing.how})")

    @property
    def record(self) -> "KubernetesDeployment":
        return self


def k8s_name(name: str) -> str:
    """A DNS-1035 label (what a Service and an InferenceService need) from a model name."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = label if label[:1].isalpha() else f"m-{label}"
    return label[:63].rstrip("-") or "model"


def _latency(bundle: Bundle, options: KubernetesOptions) -> tuple[LatencyDoc, Path]:
    path = Path(options.latency) if options.latency else bundle.path(LATENCY)
    if not path.is_file():
        raise InputError(f"deploy kubernetes sizes the pods from bench's measurements, and "
                         f"{str(path)!r} does not exist: run python -m pipeline bench "
                         f"{bundle.root} first, or give --latency FILE")
    return LatencyDoc.load(path), path


def _served_rows(doc: LatencyDoc, options: KubernetesOptions) -> list[LatencyRow]:
    """The single-stream rows of what the Triton repository runs, batch 1 first: ONNX Runtime
    on the CPU at fp32; on a GPU TensorRT at the precision, else the CUDA provider at fp32."""
    if options.triton.target == "cpu":
        wanted = [("ort-cpu", "fp32")]
    else:
        wanted = [("ort-tensorrt", options.triton.precision or "fp16"), ("ort-cuda", "fp32")]
    rows = [r for r in doc.rows if r.ok and (r.backend, r.requested) in wanted]
    return sorted(rows, key=lambda r: (wanted.index((r.backend, r.requested)), r.batch))


def pod_size(doc: LatencyDoc, path: Path, options: KubernetesOptions) -> PodSize:
    rows = _served_rows(doc, options)
    if not rows:
        served = "ort-cpu fp32" if options.triton.target == "cpu" else "ort-tensorrt or ort-cuda"
        raise InputError(f"{path} has no {served} row to size the pods from: run python -m "
                         f"pipeline bench BUNDLE --backends "
                         f"{'ort-cpu:fp32' if options.triton.target == 'cpu' else 'ort-cuda:fp32'}")
    # Triton batches requests up to max_batch_size: the memory of the largest batch size bench
    # measured within it (each row's peak covers the batch sizes before it)
    first = rows[0].backend, rows[0].requested
    same = [r for r in rows if (r.backend, r.requested) == first]
    within = [r for r in same if r.batch <= options.triton.max_batch_size]
    row = max(within, key=lambda r: r.batch) if within else same[0]
    threads = row.threads or (doc.server.threads if doc.server else None) or 1
    gpu = options.triton.target == "gpu"
    if row.peak_rss_mib is None:
        raise InputError(f"{path} was written before bench recorded peak memory: run python -m "
                         f"pipeline bench again to size the pods' memory")
    memory = 64 * math.ceil((row.peak_rss_mib + TRITON_OWN_MIB) / 64)
    return PodSize(cpu=max(1, int(threads)), memory_mib=memory,
                   memory_limit_mib=64 * math.ceil(1.5 * memory / 64), gpu=gpu,
                   basis=f"{row.target} batch {row.batch} in {path}: {threads} threads, peak "
                         f"resident memory {row.peak_rss_mib:.0f} MiB (+{TRITON_OWN_MIB} MiB "
                         f"for tritonserver)")


def sizing_row(table_rows: list[CostRow], options: KubernetesOptions) -> CostRow | None:
    """The measured configuration nearest to what the deployment runs, with a capacity: on a
    CPU the served one (the Poisson search, else the best closed-loop level), else the
    single-stream row at batch 1; on a GPU, the TensorRT row, else the CUDA one."""
    usable = [r for r in table_rows if r.capacity_per_s and r.replicas is not None and r.ranked]
    if options.triton.target == "cpu":
        for source in ("server Poisson", "server closed loop"):
            served = [r for r in usable if r.backend == SERVED_BACKEND and r.source == source]
            if served:
                return max(served, key=lambda r: r.capacity_per_s or 0.0)
        wanted = [("ort-cpu", "fp32")]
    else:
        wanted = [("ort-tensorrt", options.triton.precision or "fp16"), ("ort-cuda", "fp32")]
    for pair in wanted:
        rows = [r for r in usable if (r.backend, r.precision) == pair and r.batch == 1]
        if rows:
            return rows[0]
    return None


def size(doc: LatencyDoc, path: Path, options: KubernetesOptions) -> Sizing:
    if options.replicas is not None:
        return Sizing(replicas=options.replicas, max_replicas=None, how="fixed by --replicas")
    if options.target_rate is None:
        return Sizing(replicas=1, max_replicas=options.max_replicas or 4,
                      how="no --target-rate: one replica, the autoscaler adds more on CPU load")
    rate = Rate.parse(options.target_rate)
    assert options.p99_ms is not None  # KubernetesOptions.check
    table = cost_table([doc], {}, bound_ms=options.p99_ms, rate=rate, headroom=options.headroom)
    row = sizing_row(table.rows, options)
    if row is None or row.replicas is None or row.capacity_per_s is None:
        raise InputError(f"{path} has no verified measurement of what this deployment runs with a "
                         f"capacity within p99 {options.p99_ms:g} ms; measure it with: python -m "
                         f"pipeline bench BUNDLE --scenario server --arrival poisson --p99-ms "
                         f"{options.p99_ms:g}")
    how = (f"ceil({rate} / ({row.capacity_per_s:.1f} images/s x {options.headroom:g})) = "
           f"{row.replicas}")
    return Sizing(replicas=row.replicas, max_replicas=options.max_replicas or 2 * row.replicas,
                  how=how, configuration=f"{row.config} ({row.capacity_basis})",
                  capacity_per_s=row.capacity_per_s, target_rate=str(rate),
                  headroom=options.headroom)


def _resources(pod: PodSize) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": str(pod.cpu), "memory": f"{pod.memory_mib}Mi"}
    limits: dict[str, Any] = {"memory": f"{pod.memory_limit_mib}Mi"}
    if pod.gpu:
        requests["nvidia.com/gpu"] = 1
        limits["nvidia.com/gpu"] = 1
    return {"requests": requests, "limits": limits}


def _probe(path: str, **timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, **timing}


def manifests(name: str, model: str, model_image: str, sizing: Sizing, pod: PodSize,
              namespace: str | None, headroom: float) -> list[dict[str, Any]]:
    """The Deployment, the Service and (unless the count is fixed) the autoscaler."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "triton",
              "app.kubernetes.io/managed-by": "pipeline"}
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS),
              "prometheus.io/path": "/metrics"}
    meta = {"name": name, "labels": labels, **({"namespace": namespace} if namespace else {})}
    container = {
        "name": "tritonserver", "image": TRITON_IMAGE,
        "args": ["tritonserver", "--model-repository=/models", "--strict-readiness=true",
                 "--exit-on-error=true", f"--http-port={HTTP}", f"--grpc-port={GRPC}",
                 f"--metrics-port={METRICS}"],
        "ports": [{"name": "http", "containerPort": HTTP}, {"name": "grpc", "containerPort": GRPC},
                  {"name": "metrics", "containerPort": METRICS}],
        # startup: loading (and, on a GPU, building a TensorRT engine) may take minutes
        "startupProbe": _probe("/v2/health/ready", periodSeconds=10, failureThreshold=60),
        "livenessProbe": _probe("/v2/health/live", periodSeconds=10, failureThreshold=3),
        "readinessProbe": _probe("/v2/health/ready", periodSeconds=5, failureThreshold=2),
        "resources": _resources(pod),
        "volumeMounts": [{"name": "model-repository", "mountPath": "/models", "readOnly": True}],
    }
    copier = {"name": "model-repository", "image": model_image, "imagePullPolicy": "IfNotPresent",
              "command": ["sh", "-c", "cp -R /models/. /repository/"],
              "volumeMounts": [{"name": "model-repository", "mountPath": "/repository"}],
              "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"memory": "256Mi"}}}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": sizing.replicas, "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                 "template": {"metadata": {"labels": labels, "annotations": scrape},
                              "spec": {"initContainers": [copier], "containers": [container],
                                       "volumes": [{"name": "model-repository", "emptyDir": {}}]}}}}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {**meta, "annotations": scrape},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": HTTP, "targetPort": "http"},
                           {"name": "grpc", "port": GRPC, "targetPort": "grpc"},
                           {"name": "metrics", "port": METRICS, "targetPort": "metrics"}]}}
    out = [deployment, service]
    if sizing.max_replicas is not None:
        out.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": sizing.replicas,
                     "maxReplicas": max(sizing.max_replicas, sizing.replicas),
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization",
                                                   "averageUtilization": round(100 * headroom)}}}]}})
    return out


def inference_service(name: str, storage_uri: str, sizing: Sizing, pod: PodSize,
                      namespace: str | None, headroom: float) -> dict[str, Any]:
    """A KServe InferenceService on the kserve-tritonserver runtime (Standard deployment mode:
    a Deployment and an HPA, no Knative)."""
    predictor: dict[str, Any] = {
        "minReplicas": sizing.replicas,
        "maxReplicas": sizing.max_replicas or sizing.replicas,
        "model": {"modelFormat": {"name": "triton", "version": "2"},
                  "runtime": "kserve-tritonserver", "runtimeVersion": TRITON_IMAGE.split(":")[1],
                  "protocolVersion": "v2", "storageUri": storage_uri,
                  "resources": _resources(pod)}}
    if sizing.max_replicas is not None:
        predictor.update(scaleMetric="cpu", scaleTarget=round(100 * headroom))
    meta = {"name": name, **({"namespace": namespace} if namespace else {}),
            "annotations": {"serving.kserve.io/deploymentMode": "Standard",
                            "serving.kserve.io/autoscalerClass": "hpa"}}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": meta, "spec": {"predictor": predictor}}


def _yaml(documents: list[dict[str, Any]], comment: list[str]) -> str:
    import yaml

    class Plain(yaml.SafeDumper):  # no &anchors / *aliases for a repeated mapping
        def ignore_aliases(self, data: Any) -> bool:
            return True

    head = "".join(f"# {line}\n" for line in comment)
    return head + "---\n".join(yaml.dump(d, Dumper=Plain, sort_keys=False, width=100)
                                for d in documents)


def kubernetes_deployment(bundle_dir: Path | str, out: Path | str,
                          options: KubernetesOptions = KubernetesOptions()) -> KubernetesDeployment:
    """Write the repository, the model image's Dockerfile and the manifests into ``out``.
    Everything is checked, and the pods sized, before a file is written."""
    options.check()
    bundle = Bundle.open(Path(bundle_dir))
    bundle.require_export()
    doc, latency_path = _latency(bundle, options)
    pod = pod_size(doc, latency_path, options)
    sizing = size(doc, latency_path, options)
    root = ensure_writable_dir(Path(out))
    # ONNX Runtime in the pod runs as many threads as it has CPUs requested (its default would
    # be the node's core count), as bench measured it
    triton = replace(options.triton, threads=options.triton.threads or pod.cpu)
    repository = triton_repository(bundle.root, root / "model_repository", triton)
    name = k8s_name(repository.model)
    recorded = bundle.artifacts().get(repository.onnx)
    sha = (recorded.sha256 if recorded and recorded.sha256 else "latest")[:12]
    model_image = options.model_image or f"{name}-model-repository:{sha}"
    storage_uri = options.storage_uri or f"oci://{model_image}"
    comment = [f"Written by python -m pipeline deploy kubernetes {bundle.root} --out {root}",
               f"Triton {TRITON_VERSION} ({TRITON_IMAGE}) serving {repository.model} "
               f"({repository.onnx}, {repository.target} {repository.precision})",
               f"replicas: {sizing.replicas}: {sizing.how}"]
    if sizing.configuration:
        comment.append(f"  measured: {sizing.configuration} in {latency_path}")
    comment.append(f"pod: {pod.cpu} CPU, {pod.memory_mib} MiB (limit {pod.memory_limit_mib} MiB)"
                   f"{', 1 GPU' if pod.gpu else ''}: {pod.basis}")
    with atomic_path(root / "Dockerfile") as tmp:
        tmp.write_text("# The model image: the Triton repository under /models (a KServe modelcar,\n"
                       "# and what the Deployment's init container copies). Build it from this folder:\n"
                       f"#   docker build -t {model_image} .\n"
                       "FROM busybox:1.36\nCOPY model_repository /models\n", encoding="utf-8")
    if options.kserve:
        documents, manifest = [inference_service(name, storage_uri, sizing, pod, options.namespace,
                                                 options.headroom)], KSERVE_FILE
        comment.append(f"KServe {KSERVE_VERSION} schema; the repository from {storage_uri}")
    else:
        documents, manifest = manifests(name, repository.model, model_image, sizing, pod,
                                        options.namespace, options.headroom), MANIFEST_FILE
        comment.append(f"the repository from the image {model_image} (Dockerfile beside this file)")
    with atomic_path(root / manifest) as tmp:
        tmp.write_text(_yaml(documents, comment), encoding="utf-8")
    readme = _readme(root, name, manifest, model_image, storage_uri, options)
    with atomic_path(root / "README.md") as tmp:
        tmp.write_text(readme, encoding="utf-8")
    return KubernetesDeployment(out=str(root), name=name, manifests=[str(root / manifest)],
                                repository=repository.repository, image=TRITON_IMAGE,
                                model_image=model_image, sizing=sizing, pod=pod,
                                kserve=options.kserve,
                                storage_uri=storage_uri if options.kserve else None,
                                files=[str(root / n) for n in ("Dockerfile", manifest, "README.md")])


def _readme(root: Path, name: str, manifest: str, model_image: str, storage_uri: str,
            options: KubernetesOptions) -> str:
    lines = [f"# {name} on Kubernetes", "",
             "Made by `python -m pipeline deploy kubernetes`. Build and push the model image "
             "(the Triton repository under /models), then apply the manifest:", "",
             f"    docker build -t {model_image} {root}",
             f"    docker push {model_image}        # or: kind load docker-image {model_image}",
             f"    kubectl apply -f {root / manifest}", ""]
    if options.kserve:
        lines += [f"KServe ({KSERVE_VERSION}) fetches the repository from `{storage_uri}` "
                  "(an `oci://` URI is a modelcar: `storageInitializer.enableModelcar` in KServe's "
                  "inferenceservice-config, on by default in v0.20.0; `--storage-uri` takes s3://, "
                  "gs:// or pvc:// instead).", ""]
    else:
        lines += [f"Check it: `kubectl rollout status deployment/{name}`, then "
                  f"`kubectl port-forward service/{name} {HTTP}:{HTTP}` and "
                  f"`curl localhost:{HTTP}/v2/health/ready`.", ""]
    return "\n".join(lines)
