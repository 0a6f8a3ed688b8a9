"""PyTorch eager vs TorchScript vs ONNX Runtime at batch 1, 224 px, side by side in one run.

Each backend runs in its own subprocess through `pipeline bench`'s protocol (same threads,
warm-up >= 10 iterations and >= 1 s, timed >= 200 iterations and >= 5 s). Achieved GFLOP/s
(2 x MACs / p50) is compared with a large fp32 GEMM timed in the same run: this machine's
practical peak.

    python benchmarks/bench_backends.py --out benchmarks/results/backends-cpu.md
    python benchmarks/bench_backends.py --cuda --out benchmarks/results/backends-h100.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench import BenchConfig, run_bench
from pipeline.console import StageTimer
from pipeline.export import ExportOptions, export_bundle
from pipeline.machine import machine_block
from pipeline.weights import load_model

CPU_BACKENDS = ("torch-cpu", "torchscript-cpu", "ort-cpu")
CUDA_BACKENDS = ("torch-cuda", "torchscript-cuda", "ort-cuda", "ort-cuda-iobinding", "ort-tensorrt")
TARGET_RATIO = {"resnet18": 0.5, "resnet50": 0.7}
TARGET_PEAK_SHARE = 0.70


def gemm_gflops(threads: int, size: int = 4096, seconds: float = 5.0, device: str = "cpu") -> dict[str, float]:
    """Median GFLOP/s of an fp32 size x size matmul, timed like the backends."""
    import torch

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    samples, deadline = [], time.perf_counter() + seconds
    while len(samples) < 10 or time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        torch.mm(a, b)
        sync()
        samples.append(time.perf_counter_ns() - start)
    p50_s = statistics.median(samples) / 1e9
    return {"size": size, "n": len(samples), "p50_ms": p50_s * 1e3, "gflops": 2 * size ** 3 / p50_s / 1e9}


def export_for_bench(arch: str, root: Path) -> Path:
    loaded = load_model(arch)
    return export_bundle(loaded, root / arch, ExportOptions(), StageTimer(quiet=True)).root


def table(results: dict[str, list[dict]], peaks: dict[str, dict]) -> list[str]:
    lines = ["| arch | backend | device | p50 ms | p90 ms | p95 ms | n | ratio to eager (p50) | "
             "GFLOP/s | share of GEMM peak | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, rows in results.items():
        eager = {row["device"]: row["p50_ms"] for row in rows
                 if row["status"] == "ok" and row["backend"].startswith("torch-")}
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {arch} | {row['backend']} | — | {row['status']}: {row['reason']} |||||||| ")
                continue
            ratio = row["p50_ms"] / eager[row["device"]] if row["device"] in eager else None
            share = row["gflops"] / peaks[row["device"]]["gflops"]
            verdict = ""
            if row["backend"] == "ort-cpu" and arch in TARGET_RATIO and ratio is not None:
                limit = TARGET_RATIO[arch]
                verdict = f"{'met' if ratio <= limit else 'MISSED'} (<= {limit}x eager)"
            lines.append(f"| {arch} | {row['backend']} | {row['device']} | {row['p50_ms']:.2f} | "
                         f"{row['p90_ms']:.2f} | {row['p95_ms']:.2f} | {row['n']} | "
                         f"{ratio:.2f}x | {row['gflops']:.1f} | {share:.0%} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--cuda", action="store_true", help="add the CUDA backends")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backends-cpu.md"))
    args = parser.parse_args()

    backends = CPU_BACKENDS + (CUDA_BACKENDS if args.cuda else ())
    config = BenchConfig(backends=backends, batch_sizes=(1,), iterations=args.iterations,
                         seconds=args.seconds, threads=args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            bundle = export_for_bench(arch, Path(tmp))
            results[arch] = run_bench(bundle, config, progress=True)["rows"]
    peaks = {"cpu": gemm_gflops(args.threads, seconds=args.seconds)}
    if args.cuda:
        peaks["cuda"] = gemm_gflops(args.threads, size=8192, seconds=args.seconds, device="cuda")
    machine = machine_block()
    lines = ["# Backends side by side: batch 1, 224 px, fp32", "",
             f"Command: `python benchmarks/bench_backends.py {' '.join(sys.argv[1:])}`", "",
             f"- CPU: {machine['cpu']} ({machine['cpu_count']} logical cores), threads per backend: {args.threads}",
             f"- GPU: {machine['gpu']['name'] + ', driver ' + str(machine['gpu']['driver']) if machine['gpu'] else 'none'}",
             f"- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             f"- Protocol: each backend in its own process; warm-up >= 10 iterations and >= 1 s; "
             f"timed >= {args.iterations} iterations and >= {args.seconds:g} s; random weights "
             f"(BN calibrated); model.sim.onnx for ONNX Runtime", ""]
    for device, peak in peaks.items():
        lines.append(f"- Practical peak ({device}): fp32 GEMM {peak['size']}x{peak['size']}, p50 "
                     f"{peak['p50_ms']:.1f} ms = **{peak['gflops']:.1f} GFLOP/s** (n={peak['n']}); "
                     f"target: ORT reaches >= {TARGET_PEAK_SHARE:.0%} of it")
    lines += [""] + table(results, peaks) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
