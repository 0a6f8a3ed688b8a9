"""The server scenario against in-process ONNX Runtime, resnet18 at 224 px, in one run.

Exports resnet18 (random weights: speed only), then runs
`python -m pipeline bench BUNDLE --scenario server --concurrency 1,4,16 --seconds 10
--arrival poisson --p99-ms 100`, which measures in-process ORT fp32 at batch 1 and at 2, 4,
8, 16 (the best is the batching ceiling), then the served model (Triton through PyTriton,
dynamic batching) under 1, 4 and 16 closed-loop clients, each level broken down by stage from
the server's metrics, then the highest Poisson request rate whose p99 stays within the bound
(MLPerf LoadGen). Writes the table with the CPU model and the targets: concurrency 1's p50
within in-process p50 + queue delay + 3 ms, the best concurrency at >= 0.9x the ceiling.

    python benchmarks/bench_server.py --out benchmarks/results/server-cpu.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.core.machine import cpu_summary, library_versions
from pipeline.core.records import LatencyDoc
from pipeline.stages.bench.writeup import server_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--poisson-trials", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/server-cpu.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / args.arch
        subprocess.run([sys.executable, "-m", "pipeline", "export", "--arch", args.arch, "--out",
                        str(bundle), "--no-pt2"], check=True, stdout=subprocess.DEVNULL)
        command = ["bench", str(bundle), "--scenario", "server", "--concurrency", args.concurrency,
                   "--seconds", str(args.seconds), "--arrival", "poisson", "--p99-ms",
                   f"{args.p99_ms:g}", "--poisson-trials", str(args.poisson_trials)]
        subprocess.run([sys.executable, "-m", "pipeline", *command], check=True,
                       stdout=subprocess.DEVNULL)
        section = LatencyDoc.load(bundle / "latency.json").server
    versions = library_versions()
    section.command = "python -m pipeline " + " ".join(command).replace(str(bundle), "BUNDLE")
    lines = [f"# Server scenario: {args.arch} at 224 px, Triton + ONNX Runtime on the CPU", "",
             f"Command: `python benchmarks/bench_server.py --arch {args.arch} --concurrency "
             f"{args.concurrency} --seconds {args.seconds:g} --p99-ms {args.p99_ms:g} "
             f"--poisson-trials {args.poisson_trials}`", "",
             f"CPU: {cpu_summary()}. Versions: nvidia-pytriton {metadata.version('nvidia-pytriton')}, "
             f"mlcommons-loadgen {metadata.version('mlcommons-loadgen')}, onnxruntime "
             f"{versions.get('onnxruntime-gpu') or versions.get('onnxruntime')}, torch "
             f"{versions.get('torch')}. Server, clients and baselines share the machine's cores; "
             f"every figure below comes from this one run.", "",
             *server_lines(section)[2:]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
