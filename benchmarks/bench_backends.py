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


def _median_gflops(step, size: int, seconds: float, sync=lambda: None) -> dict[str, float]:
    for _ in range(3):
        step()
    sync()
    samples, deadline = [], time.perf_counter() + seconds
    while len(samples) < 10 or time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        step()
        sync()
        samples.append(time.perf_counter_ns() - start)
    p50_s = statistics.median(samples) / 1e9
    return {"size": size, "n": len(samples), "p50_ms": p50_s * 1e3, "gflops": 2 * size ** 3 / p50_s / 1e9}


def ort_matmul_session(size: int, threads: int):
    """An ONNX Runtime session holding one fp32 MatMul: the GEMM its convolutions use (MLAS)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "aby"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cpu_gemm_peak(threads: int, size: int = 2048, seconds: float = 5.0) -> dict[str, dict[str, float]]:
    """fp32 GEMM rate through every library at hand; the best is this machine's practical peak."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    session = ort_matmul_session(size, threads)
    return {"torch.mm": _median_gflops(lambda: torch.mm(ta, tb), size, seconds),
            "numpy matmul": _median_gflops(lambda: a @ b, size, seconds),
            "onnxruntime MatMul": _median_gflops(lambda: session.run(None, {"a": a, "b": b}), size, seconds)}


def cuda_gemm_peak(size: int = 8192, seconds: float = 5.0) -> dict[str, dict[str, float]]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    return {"torch.mm (fp32, TF32 off)": _median_gflops(lambda: torch.mm(a, b), size, seconds,
                                                       sync=torch.cuda.synchronize)}


def best(gemms: dict[str, dict[str, float]]) -> dict[str, float]:
    return max(gemms.values(), key=lambda g: g["gflops"])


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
                verdict = (f"ratio {'met' if ratio <= limit else 'MISSED'} (<= {limit}x); peak share "
                           f"{'met' if share >= TARGET_PEAK_SHARE else 'MISSED'} (>= {TARGET_PEAK_SHARE:.0%})")
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
    gemms = {"cpu": cpu_gemm_peak(args.threads, seconds=args.seconds)}
    if args.cuda:
        gemms["cuda"] = cuda_gemm_peak(seconds=args.seconds)
    peaks = {device: best(found) for device, found in gemms.items()}
    machine = machine_block()
    lines = ["# Backends side by side: batch 1, 224 px, fp32", "",
             f"Command: `python benchmarks/bench_backends.py {' '.join(sys.argv[1:])}`", "",
             f"- CPU: {machine['cpu']} ({machine['cpu_count']} logical cores), threads per backend: {args.threads}",
             f"- GPU: {machine['gpu']['name'] + ', driver ' + str(machine['gpu']['driver']) if machine['gpu'] else 'none'}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             f"- Protocol: each backend in its own process; warm-up >= 10 iterations and >= 1 s; "
             f"timed >= {args.iterations} iterations and >= {args.seconds:g} s; random weights "
             f"(BN calibrated); model.sim.onnx for ONNX Runtime", ""]
    for device, found in gemms.items():
        for name, gemm in found.items():
            lines.append(f"- fp32 GEMM {gemm['size']}x{gemm['size']} on {device} via {name}: p50 "
                         f"{gemm['p50_ms']:.1f} ms = {gemm['gflops']:.1f} GFLOP/s (n={gemm['n']})")
        lines.append(f"- Practical peak ({device}), the best of those: **{peaks[device]['gflops']:.1f} "
                     f"GFLOP/s**; target: ONNX Runtime reaches >= {TARGET_PEAK_SHARE:.0%} of it")
    lines += [""] + table(results, peaks) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
