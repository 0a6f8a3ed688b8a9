"""Backends x precisions at batch 1, 224 px, side by side in one run, plus quantization time.

For each arch: export (random weights, BN calibrated), `quantize` (int8 with 300 synthetic
calibration images, fp16), then every CPU target through `pipeline bench`'s protocol, each in
its own subprocess with the same threads. Ratios are against ONNX Runtime fp32 in the same
run. An S8S8 int8 model (signed activations) is timed beside the default U8S8 to show why U8S8
is the default. Random weights: this measures speed only; accuracy comes from
`benchmarks/bench_run.py` on a trained model.

    python benchmarks/bench_precision.py --out benchmarks/results/precision-cpu.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.console import StageTimer
from pipeline.core.machine import cpu_has_fast_int8, cpu_summary, library_versions
from pipeline.models.weights import load_model
from pipeline.options import BenchOptions, ExportOptions, QuantizeOptions
from pipeline.stages.bench.protocol import run_bench
from pipeline.stages.bench.timing import percentile_stats, timed_loop, warm_up
from pipeline.stages.export import export_bundle
from pipeline.stages.quantize import quantize_bundle

TARGETS = ("ort-cpu:fp32", "ort-cpu:int8", "openvino-cpu:fp32", "openvino-cpu:auto",
           "openvino-cpu:int8", "torch-cpu:fp32", "torch-cpu:bf16")
TARGET_INT8_RATIO = 0.55
TARGET_FASTEST_RATIO = 0.35
TARGET_QUANTIZE_S = 60.0


def s8s8_p50(bundle: Path, threads: int, seconds: float) -> float:
    """p50 of an S8S8 QDQ model made from the same calibration, timed in this process."""
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from pipeline.runtimes.ort import OrtRunner

    size = 224
    batch = np.random.default_rng(0).standard_normal((32, 3, size, size), dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter([{"input": batch[i:i + 16]} for i in range(0, 32, 16)])

        def get_next(self):
            return next(self.chunks, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp, "pre.onnx"), Path(tmp, "s8s8.onnx")
        quant_pre_process(str(bundle / "model.sim.onnx"), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        runner = OrtRunner(out, threads=threads)
        one = batch[:1]
        warm_up(lambda: runner.infer(one), seconds=1.0)
        samples = timed_loop(lambda: runner.infer(one), iterations=200, seconds=seconds)
    return percentile_stats(samples).p50_ms


def measure(arch: str, root: Path, threads: int, seconds: float) -> dict:
    bundle = export_bundle(load_model(arch), root / arch, ExportOptions(), StageTimer(quiet=True))
    started = time.perf_counter()
    record = quantize_bundle(bundle.root, QuantizeOptions(calibration="synthetic", count=300))
    quantize_s = time.perf_counter() - started
    doc = run_bench(bundle.root, BenchOptions(backends=TARGETS, batch_sizes=(1,), iterations=200,
                                             seconds=seconds, threads=threads),
                    progress=False).to_dict()
    return {"rows": doc["rows"], "quantize_s": quantize_s,
            "int8_s": record["int8"].duration_s, "reduce_range": record["int8"].reduce_range,
            "s8s8_p50": s8s8_p50(bundle.root, threads, seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision-cpu.md"))
    args = parser.parse_args()
    versions = library_versions()
    lines = ["# Backends x precisions on the CPU, batch 1, 224 px", "",
             f"Command: `python benchmarks/bench_precision.py --archs {args.archs} --threads "
             f"{args.threads}`", "",
             f"CPU: {cpu_summary()}; {args.threads} threads for every backend; VNNI: "
             f"{'yes' if cpu_has_fast_int8() else 'no'}.",
             f"Versions: onnxruntime {versions.get('onnxruntime-gpu') or versions.get('onnxruntime')}, "
             f"openvino {versions.get('openvino')}, torch {versions.get('torch')}.", "",
             "Each target in its own process: warm-up >= 10 iterations and >= 1 s, timed >= 200 "
             f"iterations and >= {args.seconds:g} s. Random weights (speed only).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            result = measure(arch, Path(tmp), args.threads, args.seconds)
            rows = [r for r in result["rows"] if r["batch"] == 1]
            base = next(r["p50_ms"] for r in rows if r["backend"] == "ort-cpu" and r["precision_requested"] == "fp32")
            lines += [f"## {arch}", "",
                      f"quantize (int8 with 300 calibration images, 7-bit weights: "
                      f"{result['reduce_range']}; plus fp16): {result['quantize_s']:.1f} s "
                      f"(int8 alone {result['int8_s']:.1f} s; target <= {TARGET_QUANTIZE_S:.0f} s "
                      f"for resnet50)", "",
                      "| backend | precision (asked=ran) | p50 ms | p90 ms | vs ORT fp32 | note |",
                      "|---|---|---|---|---|---|"]
            ok = []
            for row in rows:
                asked, ran = row["precision_requested"], row["precision"]
                label = asked if asked == ran else f"{asked}={ran}"
                if row["status"] != "ok":
                    lines.append(f"| {row['backend']} | {label} | — | — | — | {row['reason']} |")
                    continue
                ok.append(row)
                lines.append(f"| {row['backend']} | {label} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                             f"{row['p50_ms'] / base:.2f}x | |")
            lines.append(f"| ort-cpu | int8 S8S8 (not the default) | {result['s8s8_p50']:.2f} | | "
                         f"{result['s8s8_p50'] / base:.2f}x | signed activations, timed in-process |")
            int8 = next(r for r in ok if r["backend"] == "ort-cpu" and r["precision_requested"] == "int8")
            fastest = min(ok, key=lambda r: r["p50_ms"])
            lines += ["", f"- ORT int8 / ORT fp32: **{int8['p50_ms'] / base:.2f}x** (target <= "
                          f"{TARGET_INT8_RATIO}x on a CPU with VNNI).",
                      f"- Fastest CPU row: {fastest['backend']} {fastest['precision']} at "
                      f"**{fastest['p50_ms'] / base:.2f}x** ORT fp32 (target <= {TARGET_FASTEST_RATIO}x "
                      f"on a CPU with AMX or VNNI).", ""]
            print("\n".join(lines[-14:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
