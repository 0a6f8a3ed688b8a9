"""serve's dynamic-batcher queue delay, 0 against 2000 us, side by side in one run.

Exports resnet18 (random weights: speed only) and serves it twice, once per queue delay, each
driven by the server scenario's closed-loop clients at concurrency 1 and 16. With a delay, a
lone request waits it out in Triton's queue hoping for company; with none, it runs at once
and batches still form from the requests that queue while the model runs. Writes the table
with the CPU model:

    python benchmarks/bench_queue_delay.py --out benchmarks/results/queue-delay-cpu.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.core.bundle import Bundle
from pipeline.core.machine import cpu_summary
from pipeline.options import ScenarioOptions
from pipeline.stages.bench.server import run_server_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--delays", default="0,2000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/queue-delay-cpu.md"))
    args = parser.parse_args()
    delays = [int(d) for d in args.delays.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.arch
        subprocess.run([sys.executable, "-m", "pipeline", "export", "--arch", args.arch, "--out",
                        str(path), "--no-pt2"], check=True, stdout=subprocess.DEVNULL)
        bundle = Bundle.open(path)
        for delay in delays:
            levels, _, _, _ = run_server_scenario(
                bundle, ScenarioOptions(concurrency=(1, 16), seconds=args.seconds,
                                        queue_delay_us=delay), print)
            rows += [(delay, level) for level in levels]
    lines = [f"# serve's queue delay: {args.arch} at 224 px, Triton + ONNX Runtime on the CPU", "",
             f"Command: `python benchmarks/bench_queue_delay.py --arch {args.arch} --delays "
             f"{args.delays} --seconds {args.seconds:g}`", "",
             f"CPU: {cpu_summary()}. One run: each delay served in turn, {args.seconds:g} s per "
             f"level after 2 s of warm-up, batch-1 binary-tensor requests from closed-loop clients "
             f"on the same cores.", "",
             "| queue delay us | concurrency | images/s | p50 ms | p99 ms | Triton queue ms | mean batch | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for delay, row in rows:
        b = row.breakdown
        lines.append(f"| {delay} | {row.concurrency} | {row.images_per_s:.1f} | {row.p50_ms:.2f} | "
                     f"{row.p99_ms:.2f} | {b.queue_ms:.2f} | {b.mean_batch:.2f} | {row.errors} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
