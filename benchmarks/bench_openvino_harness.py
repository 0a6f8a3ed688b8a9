"""Does bench's OpenVINO harness add time? bench against OpenVINO's own benchmark_app.

On the same model file, in one run, alternating the two tools ``--repeats`` times:

- batch-1 latency: ``benchmark_app -hint latency -shape [1,3,S,S]`` median against bench's
  ``openvino-cpu`` p50 at batch 1 (target: within 5%);
- throughput: ``benchmark_app -hint throughput`` images/s against the best images/s of bench's
  ``openvino-cpu`` and ``openvino-cpu-throughput`` over a batch sweep (target: at least 1.0x).

    python benchmarks/bench_openvino_harness.py --arch resnet50 --out benchmarks/results/openvino-harness.md
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARK_APP = Path(sys.executable).with_name("benchmark_app")


def benchmark_app(model: Path, hint: str, size: int, seconds: float,
                  pin_f32: bool) -> tuple[float, float]:
    """(median latency ms, throughput images/s) as benchmark_app reports them. ``pin_f32``
    pins the inference precision to f32 as bench's openvino-cpu:fp32 does (on a CPU with AMX
    or AVX512-BF16 OpenVINO would otherwise run bf16)."""
    shape = f"[1,3,{size},{size}]"
    pinned = ["-infer_precision", "f32"] if pin_f32 else []
    proc = subprocess.run([str(BENCHMARK_APP), "-m", str(model), "-d", "CPU", "-hint", hint,
                           "-shape", shape, "-t", str(max(1, round(seconds))), *pinned],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark_app failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    median = re.search(r"Median:\s+([\d.]+) ms", proc.stdout)
    throughput = re.search(r"Throughput:\s+([\d.]+) FPS", proc.stdout)
    if not median or not throughput:
        raise SystemExit(f"cannot read benchmark_app's output:\n{proc.stdout[-2000:]}")
    return float(median.group(1)), float(throughput.group(1))


def bench(bundle: Path, targets: str, batches: str, seconds: float) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "bench", str(bundle), "--backends",
                           targets, "--batch-sizes", batches, "--seconds", str(seconds),
                           "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed: {proc.stderr[-2000:]}")
    return [r for r in json.loads(proc.stdout)["rows"] if r["status"] == "ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pipeline.core.machine import cpu_summary

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / args.arch
        for command in (["export", "--arch", args.arch, "--out", str(bundle), "--no-pt2",
                         "--input-size", str(args.size)],
                        ["quantize", str(bundle), "--precision", "int8", "--calibration",
                         "synthetic", "--count", "64"]):
            proc = subprocess.run([sys.executable, "-m", "pipeline", *command],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{command[0]} failed: {proc.stderr[-2000:]}")
        rows = []
        for precision, name in (("fp32", "model.sim.onnx"), ("int8", "model.int8.onnx")):
            model = bundle / name
            app_lat, app_tput, ours_lat, ours_tput, best_how = [], [], [], [], []
            for _ in range(args.repeats):
                pin = precision == "fp32"
                app_lat.append(benchmark_app(model, "latency", args.size, args.seconds, pin)[0])
                ours = bench(bundle, f"openvino-cpu:{precision}", "1", args.seconds)
                ours_lat.append(ours[0]["p50_ms"])
                app_tput.append(benchmark_app(model, "throughput", args.size, args.seconds, pin)[1])
                swept = bench(bundle, f"openvino-cpu:{precision},openvino-cpu-throughput:{precision}",
                              "sweep", args.seconds / 2)
                best = max(swept, key=lambda r: r["images_per_s"])
                ours_tput.append(best["images_per_s"])
                best_how.append(f"{best['backend']} batch {best['batch']} ({best['provider']})")
            med = statistics.median
            rows.append((precision, name, med(app_lat), med(ours_lat), med(app_tput),
                         med(ours_tput), best_how[-1]))
    lines = ["# bench's OpenVINO harness against benchmark_app", "",
             f"Command: `python benchmarks/bench_openvino_harness.py --arch {args.arch} "
             f"--out benchmarks/results/openvino-harness.md`", "",
             f"CPU: {cpu_summary()}. {args.arch} at {args.size} px, random weights (timing "
             f"only); int8 calibrated on synthetic images. fp32 is pinned to f32 in both tools "
             f"(`-infer_precision f32`); int8 leaves the rest of the graph to OpenVINO in both. "
             f"Each figure is the median of "
             f"{args.repeats} alternating runs of {args.seconds:g} s.", "",
             "| precision | benchmark_app -hint latency median ms | bench p50 ms, batch 1 | ratio (target <= 1.05) | "
             "benchmark_app -hint throughput img/s | bench best img/s | ratio (target >= 1.0) | bench's best |",
             "|---|---|---|---|---|---|---|---|"]
    for precision, name, app_lat, ours_lat, app_tput, ours_tput, how in rows:
        lines.append(f"| {precision} ({name}) | {app_lat:.2f} | {ours_lat:.2f} | "
                     f"**{ours_lat / app_lat:.3f}** | {app_tput:.1f} | {ours_tput:.1f} | "
                     f"**{ours_tput / app_tput:.2f}** | {how} |")
    lines += ["", f"Took {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
