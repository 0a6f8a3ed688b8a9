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

from pipeline.core.console import StageTimer
from pipeline.core.machine import cpu_summary, machine_block
from pipeline.models.weights import load_model
from pipeline.options import BenchOptions, ExportOptions
from pipeline.stages.bench.protocol import run_bench
from pipeline.stages.export import export_bundle

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


def physical_cpu_peak(threads: int) -> dict[str, float | str]:
    """cores x fp32 SIMD lanes x FMA units x 2 flops x clock: the ceiling no kernel can pass.

    Lanes: 16 with AVX-512, 8 with AVX2. FMA units per core are not readable from the OS;
    2 is what current server cores have (Zen 3/4, Xeon Gold/Platinum since Skylake-SP), so the
    figure is an upper bound where a core has one. The clock is the highest that
    /proc/cpuinfo reports now; turbo can go above it, which the label says.
    """
    from pipeline.core.machine import cpu_flags

    flags = cpu_flags()
    lanes = 16 if flags.get("avx512f") else 8 if flags.get("avx2") else 4
    mhz, source = 0.0, "highest cpu MHz in /proc/cpuinfo"
    try:  # the rated maximum (boost) where the kernel exposes cpufreq; VMs often do not
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as handle:
            mhz, source = float(handle.read()) / 1e3, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                mhz = max(float(line.split(":")[1]) for line in handle if line.startswith("cpu MHz"))
        except (OSError, ValueError):
            pass
    cores, fma_units = threads, 2
    return {"cores": cores, "lanes": lanes, "fma_units": fma_units, "ghz": mhz / 1e3,
            "clock_source": source,
            "gflops": cores * lanes * fma_units * 2 * mhz / 1e3,
            "simd": "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE"}


def best(gemms: dict[str, dict[str, float]]) -> dict[str, float]:
    return max(gemms.values(), key=lambda g: g["gflops"])


def export_for_bench(arch: str, root: Path) -> Path:
    loaded = load_model(arch)
    return export_bundle(loaded, root / arch, ExportOptions(), StageTimer(quiet=True)).root


def table(results: dict[str, list[dict]], peaks: dict[str, dict],
          gemms_by_device: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| arch | backend | device | p50 ms | p90 ms | p95 ms | n | ratio to eager (p50) | "
             "GFLOP/s | share of peak | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, rows in results.items():
        eager = {row["device"]: row["p50_ms"] for row in rows
                 if row["status"] == "ok" and row["backend"].startswith("torch-")}
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {arch} | {row['backend']} | — | {row['status']}: {row['reason']} |||||||| ")
                continue
            ratio = row["p50_ms"] / eager[row["device"]] if row["device"] in eager else None
            share = row["gflops"] / peaks[row["device"]]["gflops"]
            gemm_share = row["gflops"] / best(gemms_by_device[row["device"]])["gflops"] \
                if row["device"] in gemms_by_device else share
            shown_ratio = f"{ratio:.2f}x" if ratio is not None else "—"
            verdict = ""
            if row["backend"] == "ort-cpu" and arch in TARGET_RATIO and ratio is not None:
                limit = TARGET_RATIO[arch]
                verdict = (f"ratio {'met' if ratio <= limit else 'MISSED'} (<= {limit}x); GEMM share "
                           f"{gemm_share:.0%}: {'met' if gemm_share >= TARGET_PEAK_SHARE else 'MISSED'} "
                           f"(>= {TARGET_PEAK_SHARE:.0%})")
            lines.append(f"| {arch} | {row['backend']} | {row['device']} | {row['p50_ms']:.2f} | "
                         f"{row['p90_ms']:.2f} | {row['p95_ms']:.2f} | {row['n']} | "
                         f"{shown_ratio} | {row['gflops']:.1f} | {share:.0%} | {verdict} |")
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
    config = BenchOptions(backends=backends, batch_sizes=(1,), iterations=args.iterations,
                         seconds=args.seconds, threads=args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            bundle = export_for_bench(arch, Path(tmp))
            results[arch] = run_bench(bundle, config, progress=True).to_dict()["rows"]
    gemms = {"cpu": cpu_gemm_peak(args.threads, seconds=args.seconds)}
    if args.cuda:
        gemms["cuda"] = cuda_gemm_peak(seconds=args.seconds)
    physical = physical_cpu_peak(args.threads)
    # The CPU share is of the physical peak (a GEMM can be beaten; the hardware cannot);
    # on the GPU the fp32 GEMM stands in, as no clock-times-units figure is read here.
    peaks = {device: best(found) for device, found in gemms.items()}
    peaks["cpu"] = {"gflops": physical["gflops"]}
    machine = machine_block()
    lines = ["# Backends side by side: batch 1, 224 px, fp32", "",
             f"Command: `python benchmarks/bench_backends.py {' '.join(sys.argv[1:])}`", "",
             f"- CPU: {cpu_summary()} ({machine['cpu_count']} logical cores), threads per backend: {args.threads}",
             f"- GPU: {machine['gpu']['name'] + ', driver ' + str(machine['gpu']['driver']) if machine['gpu'] else 'none'}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             f"- Protocol: each backend in its own process; warm-up >= 10 iterations and >= 1 s; "
             f"timed >= {args.iterations} iterations and >= {args.seconds:g} s; random weights "
             f"(BN calibrated); model.sim.onnx for ONNX Runtime", ""]
    for device, found in gemms.items():
        for name, gemm in found.items():
            lines.append(f"- fp32 GEMM {gemm['size']}x{gemm['size']} on {device} via {name}: p50 "
                         f"{gemm['p50_ms']:.1f} ms = {gemm['gflops']:.1f} GFLOP/s (n={gemm['n']})")
        if device == "cuda":
            lines.append(f"- GPU peak used for shares: that GEMM, **{peaks[device]['gflops']:.1f} GFLOP/s**")
    gemm_best = best(gemms["cpu"])["gflops"]
    lines.append(f"- Physical fp32 peak (cpu), the share column's reference: {physical['cores']} cores "
                 f"x {physical['lanes']} lanes ({physical['simd']}) x {physical['fma_units']} FMA units "
                 f"(assumed) x 2 flops x {physical['ghz']:.2f} GHz ({physical['clock_source']}) = "
                 f"**{physical['gflops']:.1f} GFLOP/s**; the GEMMs above are kept as a reference; "
                 f"target: ONNX Runtime reaches >= {TARGET_PEAK_SHARE:.0%} of the GEMM best "
                 f"({gemm_best:.1f} GFLOP/s)")
    achieved = max([gemm_best] + [row["gflops"] for rows in results.values() for row in rows
                                  if row["status"] == "ok" and row["device"] == "cpu"])
    if achieved > physical["gflops"]:
        implied = achieved / (physical["cores"] * physical["lanes"] * physical["fma_units"] * 2)
        lines.append(f"- Measured {achieved:.1f} GFLOP/s beats that figure, so the cores run above the clock this "
                     f"machine reports (boost; a VM hides cpufreq): the implied clock is at least "
                     f"{implied:.2f} GHz, and shares above 100% mean the reported clock is too low, "
                     f"not that the hardware was beaten")
    lines += [""] + table(results, peaks, gemms) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
