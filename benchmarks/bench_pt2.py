"""The PyTorch artifacts side by side: eager, TorchScript, model.pt2, AOTInductor and ORT fp32.

For each arch: `python -m pipeline export --arch ARCH --aoti` as a user runs it (wall time, and
the AOTInductor compile time the manifest records), then one `pipeline bench` run over
torch-cpu, torchscript-cpu, torch-export-cpu, aoti-cpu and ort-cpu fp32 at batch 1 and 8,
each target in its own process with the same threads. Ratios are to ORT fp32 in the same run.
Random weights: speed only. The export without --aoti (the `.pt2` cost in the default export)
is timed by `benchmarks/bench_export.py`.

    python benchmarks/bench_pt2.py --archs resnet18,resnet50 --out benchmarks/results/pt2-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.machine import cpu_summary, library_versions
from pipeline.options import BenchOptions
from pipeline.stages.bench.protocol import run_bench

TARGETS = ("ort-cpu:fp32", "torch-cpu:fp32", "torchscript-cpu:fp32", "torch-export-cpu:fp32",
           "aoti-cpu:fp32")
TARGET_AOTI_COMPILE_S = {"resnet50": 180.0}


def export(arch: str, out: Path) -> tuple[float, dict]:
    """A cold compile: Inductor's caches (kernels, FX graphs) start empty."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out.parent / f"inductor-cache-{arch}")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "export", "--arch", arch, "--out", str(out),
                    "--aoti"], check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    return wall, json.loads((out / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pt2-cpu.md"))
    args = parser.parse_args()
    versions = library_versions()
    lines = ["# PyTorch artifacts on the CPU: eager, TorchScript, .pt2, AOTInductor, and ORT", "",
             f"Command: `python benchmarks/bench_pt2.py --archs {args.archs} --threads {args.threads}`",
             "", f"CPU: {cpu_summary()}; {args.threads} threads for every backend.",
             f"Versions: torch {versions.get('torch')}, onnxruntime "
             f"{versions.get('onnxruntime-gpu') or versions.get('onnxruntime')}.", "",
             "Each target in its own process (`pipeline bench`'s protocol): warm-up >= 10 "
             f"iterations and >= 1 s, timed >= 200 iterations and >= {args.seconds:g} s; "
             "224 px, random weights (speed only).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            bundle = Path(tmp) / arch
            wall, manifest = export(arch, bundle)
            aoti = manifest["export"]["aoti"]["cpu"]
            doc = run_bench(bundle, BenchOptions(backends=TARGETS, batch_sizes=(1, 8), iterations=200,
                                                seconds=args.seconds, threads=args.threads),
                            progress=False).to_dict()
            target = TARGET_AOTI_COMPILE_S.get(arch)
            verdict = (f"; target <= {target:.0f} s: {'met' if aoti['compile_s'] <= target else 'MISSED'}"
                       if target else "")
            lines += [f"## {arch}", "",
                      f"`python -m pipeline export --arch {arch} --aoti`: {wall:.1f} s end to end; "
                      f"AOTInductor compile {aoti['compile_s']:.1f} s (cold caches) with "
                      f"{aoti['compiler_version']} "
                      f"(vector ISA {aoti['vector_isa']}){verdict}.", "",
                      "| backend | file | batch | p50 ms | p90 ms | p99 ms | img/s | p50 vs ORT fp32 |",
                      "|---|---|---|---|---|---|---|---|"]
            for batch in (1, 8):
                rows = [r for r in doc["rows"] if r["batch"] == batch]
                base = next((r["p50_ms"] for r in rows if r["backend"] == "ort-cpu" and r["status"] == "ok"), None)
                for row in rows:
                    if row["status"] != "ok":
                        lines.append(f"| {row['backend']} | | {batch} | — | — | — | — | {row['reason'][:80]} |")
                        continue
                    ratio = f"{row['p50_ms'] / base:.2f}x" if base else "—"
                    p99 = f"{row['p99_ms']:.2f}" if row.get("p99_ms") is not None else "—"
                    lines.append(f"| {row['backend']} | {row['model_file']} | {batch} | {row['p50_ms']:.2f} | "
                                 f"{row['p90_ms']:.2f} | {p99} | {row['images_per_s']:.1f} | {ratio} |")
            lines.append("")
            print("\n".join(lines[-16:]), flush=True)
    lines += ["p99 is given only from 600 samples (bench's rule); a dash means fewer were taken.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
