"""The latency protocol, in the spirit of ONNX Runtime's perf_test, trtexec and MLPerf single-stream.

- Each backend runs in its own subprocess (``pipeline.bench_worker``), so one runtime's thread
  pool never slows another's; every CPU backend gets the same explicit thread count.
- Cold start is timed apart: model or session creation, then the first inference.
- Warm-up: at least 10 iterations and at least ``warmup_s`` seconds.
- Timed run: until both ``iterations`` and ``seconds`` are reached, each iteration timed with
  ``perf_counter_ns``; on CUDA the runner synchronises before each stop.
- Results are flat rows: one per backend x batch size. A backend that cannot run is a row with
  a reason and no numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import InputError

SCHEMA_VERSION = 2
MIN_WARMUP_ITERATIONS = 10
P99_MIN_SAMPLES = 600
WORKER_TIMEOUT_S = 1800


def _all_targets() -> tuple[str, ...]:
    from pipeline.backends import parse_targets, target_name

    return tuple(target_name(b, p) for b, p in parse_targets(None))


@dataclass(frozen=True)
class BenchConfig:
    """``backends`` holds targets, ``backend:precision`` (see ``pipeline.backends``)."""

    backends: tuple[str, ...] = field(default_factory=_all_targets)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    iterations: int = 200
    seconds: float = 5.0
    warmup_s: float = 1.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def percentile_stats(samples_ns: list[int]) -> dict[str, Any]:
    """n, mean, std, min, p50, p90, p95, p99, max in milliseconds.

    Percentiles use numpy's linear interpolation. p99 needs at least 600 samples (six beyond
    the 99th percentile); below that it is None and ``p99_note`` says why.
    """
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    n = int(values.size)
    if n == 0:
        raise ValueError("no samples")
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    stats = {"n": n, "mean_ms": float(values.mean()), "std_ms": float(values.std(ddof=1)) if n > 1 else 0.0,
             "min_ms": float(values.min()), "p50_ms": float(p50), "p90_ms": float(p90),
             "p95_ms": float(p95), "p99_ms": float(p99), "p99_note": None, "max_ms": float(values.max())}
    if n < P99_MIN_SAMPLES:
        stats["p99_ms"] = None
        stats["p99_note"] = f"omitted: n={n} < {P99_MIN_SAMPLES}"
    return stats


def timed_loop(step: Callable[[], None], *, iterations: int, seconds: float,
               sync: Callable[[], None] = lambda: None,
               clock: Callable[[], int] = time.perf_counter_ns) -> list[int]:
    """Run ``step`` until both ``iterations`` and ``seconds`` are reached; per-iteration ns."""
    samples: list[int] = []
    deadline = clock() + int(seconds * 1e9)
    while len(samples) < iterations or clock() < deadline:
        start = clock()
        step()
        sync()
        samples.append(clock() - start)
    return samples


def warm_up(step: Callable[[], None], *, seconds: float, sync: Callable[[], None] = lambda: None,
            clock: Callable[[], int] = time.perf_counter_ns) -> int:
    """At least ``MIN_WARMUP_ITERATIONS`` and at least ``seconds``; returns the count."""
    return len(timed_loop(step, iterations=MIN_WARMUP_ITERATIONS, seconds=seconds, sync=sync,
                          clock=clock))


def throughput_fields(stats: dict[str, Any], batch: int, gmacs: float | None) -> dict[str, Any]:
    """ms per image, images/s and achieved GFLOP/s (2 x MACs per image / p50)."""
    p50_s = stats["p50_ms"] / 1e3
    return {"ms_per_image": stats["p50_ms"] / batch,
            "images_per_s": batch / p50_s,
            "gflops": (2 * gmacs * batch / p50_s) if gmacs else None}


@dataclass
class Row:
    backend: str
    batch: int
    precision: str | None = None  # what really ran (OpenVINO's auto reads back its choice)
    precision_requested: str | None = None
    status: str = "ok"
    reason: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    device: str | None = None
    provider: str | None = None
    threads: int | None = None
    io: str | None = None
    cold_create_ms: float | None = None
    cold_first_infer_ms: float | None = None
    warmup_iterations: int | None = None
    n: int | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    p99_note: str | None = None
    max_ms: float | None = None
    ms_per_image: float | None = None
    images_per_s: float | None = None
    gflops: float | None = None


ROW_FIELDS = tuple(Row.__dataclass_fields__)


def reason_rows(backend: str, precision: str, batch_sizes: tuple[int, ...], reason: str,
                status: str = "unavailable") -> list[dict[str, Any]]:
    return [asdict(Row(backend, batch, precision=precision, precision_requested=precision,
                       status=status, reason=reason)) for batch in batch_sizes]


def run_worker(bundle: Path, target: str, config: BenchConfig, *, gmacs: float | None,
               images: list[str] | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run one target in a fresh interpreter; a crash or a hang becomes error rows."""
    from pipeline.backends import split_target

    backend, precision = split_target(target)
    spec = {"bundle": str(bundle), "backend": backend, "precision": precision,
            "config": asdict(config), "gmacs": gmacs, "images": images}
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads),
           "MKL_NUM_THREADS": str(config.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        try:
            # -X faulthandler: a worker killed by a signal (a native crash) leaves the Python
            # frame it died in, which becomes the rows' reason.
            proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m",
                                   "pipeline.bench_worker", str(spec_path),
                                   str(result_path)], capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"rows": reason_rows(backend, precision, config.batch_sizes,
                                        f"timed out after {timeout_s:g}s", "error")}
        if result_path.is_file():
            return json.loads(result_path.read_text())
        return {"rows": reason_rows(backend, precision, config.batch_sizes,
                                    worker_failure(proc.returncode, proc.stderr or proc.stdout),
                                    "error")}


def worker_failure(returncode: int, output: str) -> str:
    """Why a worker left no result: its last line, or for a signal the frame it died in."""
    lines = [line.strip() for line in (output or "").strip().splitlines() if line.strip()]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        frames = [line for line in lines if line.startswith('File "')]
        return f"worker killed by {name}" + (f" in {frames[0][:300]}" if frames else "")
    return f"worker exited {returncode}: {(lines[-1:] or ['no output'])[0][:300]}"


def run_bench(bundle: Path, config: BenchConfig, *, images: list[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Every selected backend, each in its own subprocess; returns the latency document."""
    from tqdm import tqdm

    from pipeline.archs import describe, get_arch
    from pipeline.bundle import Bundle
    from pipeline.machine import machine_block

    opened = Bundle.open(bundle)
    manifest = opened.read_manifest()
    model = manifest.get("model")
    if not model or "model.onnx" not in manifest.get("artifacts", {}):
        raise InputError(f"bundle {str(bundle)!r} has no exported model to time; run "
                         f"python -m pipeline export --out {bundle} first")
    gmacs = describe(get_arch(model["arch"]), num_classes=model["num_classes"],
                     input_size=model["input_size"])["gmacs"]
    rows: list[dict[str, Any]] = []
    loops: list[dict[str, Any]] = []
    for target in tqdm(config.backends, desc="bench", unit="target", disable=None if progress else True,
                       file=sys.stderr):
        result = run_worker(bundle, target, config, gmacs=gmacs, images=images)
        rows += result["rows"]
        loops += result.get("images", [])
    attach_verification(rows, read_parity(opened))
    return {"schema_version": SCHEMA_VERSION, "kind": "pipeline.latency",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"arch": model["arch"], "input_size": model["input_size"],
                      "num_classes": model["num_classes"], "gmacs_per_image": gmacs,
                      "onnx_file": opened.fp32_onnx()},
            "config": {**asdict(config), "backends": list(config.backends),
                       "batch_sizes": list(config.batch_sizes),
                       "min_warmup_iterations": MIN_WARMUP_ITERATIONS},
            "machine": machine_block(), "rows": rows, "images": loops}


def read_parity(bundle: Any) -> dict[str, Any] | None:
    from pipeline.bundle import PARITY

    path = bundle.path(PARITY)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def attach_verification(rows: list[dict[str, Any]], parity: dict[str, Any] | None) -> None:
    """Say for each row whether verify vouched for the very model file it timed.

    fp32 rows: the parity pairs on the same file (sha256); eager torch is the reference itself.
    Reduced precision: the accuracy gate of the same backend and precision on the same file.
    Anything else is ``not verified``, and ``recommend`` never picks a reduced precision that is.
    """
    from pipeline.backends import BACKENDS, target_name

    pairs = (parity or {}).get("pairs", [])
    gates = {g["candidate"]: g for g in (parity or {}).get("gates", [])}
    for row in rows:
        requested = row.get("precision_requested") or row.get("precision") or "fp32"
        backend = BACKENDS.get(row["backend"])
        row.update(verified="not verified", top1_agreement=None, top1_drop_points=None)
        if backend is None or row.get("model_sha256") is None:
            continue
        if requested == "fp32":
            if backend.runtime == "torch":
                row["verified"] = "reference"
                continue
            same = [p for p in pairs if p.get("model_sha256") == row["model_sha256"]]
            if same:
                row["verified"] = "parity passed" if all(p["passed"] for p in same) else "parity failed"
            continue
        gate = gates.get(target_name(backend.gate_as or backend.name, requested))
        if gate and gate.get("model_sha256") == row["model_sha256"]:
            row["verified"] = ("gate not meaningful" if gate.get("not_meaningful") else
                               "gate passed" if gate["passed"] else "gate failed")
            row["top1_agreement"] = gate.get("top1_agreement")
            row["top1_drop_points"] = gate.get("top1_drop_points")


def target_of(row: dict[str, Any]) -> str:
    from pipeline.backends import target_name

    return target_name(row["backend"], row.get("precision_requested") or "fp32")


def ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] == "ok"]


def eligible(row: dict[str, Any]) -> bool:
    """May this row be recommended? fp32 unless its parity failed; reduced precision only
    with a passed accuracy gate."""
    verified = row.get("verified", "not verified")
    if (row.get("precision_requested") or row.get("precision") or "fp32") == "fp32":
        return verified != "parity failed"
    return verified == "gate passed"


ADVICE_FIELDS = ("machine", "backend", "precision", "precision_requested", "device", "batch",
                 "p50_ms", "p90_ms", "verified", "top1_agreement", "top1_drop_points")


def recommend(rows: list[dict[str, Any]], budget_ms: float | None = None) -> dict[str, Any]:
    """The fastest verified (backend, precision) at batch 1 and its cost against the fastest
    fp32; who meets a p90 budget; where the GPU overtakes the CPU; what was not verified."""
    good = ok_rows(rows)
    usable = [r for r in good if eligible(r)]
    batch1 = sorted((r for r in usable if r["batch"] == 1), key=lambda r: r["p50_ms"])
    fp32 = [r for r in batch1 if (r.get("precision_requested") or "fp32") == "fp32"]
    answer: dict[str, Any] = {"fastest_batch1": None, "fastest_fp32_batch1": None,
                              "speedup_vs_fp32": None, "budget_ms": budget_ms, "meets_budget": None,
                              "gpu_overtakes_cpu_at_batch": None, "gpu_vs_cpu": None,
                              "not_verified": sorted({target_of(r) for r in good if not eligible(r)})}
    if batch1:
        answer["fastest_batch1"] = {k: batch1[0].get(k) for k in ADVICE_FIELDS}
    if fp32:
        answer["fastest_fp32_batch1"] = {k: fp32[0].get(k) for k in ADVICE_FIELDS}
        answer["speedup_vs_fp32"] = fp32[0]["p50_ms"] / batch1[0]["p50_ms"]
    if budget_ms is not None:
        answer["meets_budget"] = [{k: r.get(k) for k in ADVICE_FIELDS}
                                  for r in sorted(usable, key=lambda r: (r["batch"], r["p90_ms"]))
                                  if r["p90_ms"] <= budget_ms]
    answer.update(_gpu_crossover(usable))
    return answer


def _gpu_crossover(good: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[tuple[str, int], float] = {}
    for row in good:
        key = ("gpu" if row["device"] == "cuda" else "cpu", row["batch"])
        best[key] = max(best.get(key, 0.0), row["images_per_s"])
    batches = sorted({batch for kind, batch in best if (("cpu", batch) in best and ("gpu", batch) in best)})
    if not batches:
        return {"gpu_vs_cpu": "not measured: needs both a CPU and a GPU backend"}
    table = {b: best[("gpu", b)] / best[("cpu", b)] for b in batches}
    over = next((b for b in batches if table[b] > 1.0), None)
    return {"gpu_overtakes_cpu_at_batch": over,
            "gpu_vs_cpu": {str(b): round(ratio, 2) for b, ratio in table.items()}}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'backend':<20} {'precision':<10} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'ms/img':>8} "
             f"{'img/s':>9} {'GFLOP/s':>8}  {'verified':<14} provider"]
    for row in rows:
        precision = precision_label(row)
        if row["status"] != "ok":
            lines.append(f"{row['backend']:<20} {precision:<10} {row['batch']:>5}  {row['status']}: {row['reason']}")
            continue
        gflops = f"{row['gflops']:8.1f}" if row["gflops"] else f"{'':>8}"
        lines.append(f"{row['backend']:<20} {precision:<10} {row['batch']:>5} {row['p50_ms']:9.2f} "
                     f"{row['p90_ms']:9.2f} {row['ms_per_image']:8.2f} {row['images_per_s']:9.1f} "
                     f"{gflops}  {row.get('verified', ''):<14} {row['provider']}")
    return "\n".join(lines)


def precision_label(row: dict[str, Any]) -> str:
    """``bf16`` or, for OpenVINO's own choice, ``auto=bf16``: what was asked and what ran."""
    ran, asked = row.get("precision") or "fp32", row.get("precision_requested") or "fp32"
    return ran if ran == asked else f"{asked}={ran}"


def unavailable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] != "ok"]
