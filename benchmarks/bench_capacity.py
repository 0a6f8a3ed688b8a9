"""Does the Poisson capacity hold when it is used? `--verify-capacity`, repeated.

Exports resnet18 at 224 px (random weights: speed only) unless --bundle names one, then runs
`python -m pipeline bench BUNDLE --scenario server --concurrency 1,4,16 --arrival poisson
--p99-ms 100 --verify-capacity` --repeats times. Each run searches the highest Poisson rate
whose p99 stays within the bound (at most 5 LoadGen runs of --seconds), then checks Poisson
arrivals at 0.9x that capacity for as long as a search run. The table gives, per repeat, the rate found,
each check's rate and p99 (a check that misses lowers the capacity to its own rate), the
capacity in the end and whether it held, and by how much the first check missed when it did;
then the replicas `report --target-rate` would plan for a load at the 0.8 headroom.

    python benchmarks/bench_capacity.py --repeats 3 --out benchmarks/results/capacity-cpu.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.core.machine import cpu_summary, library_versions
from pipeline.core.records import LatencyDoc
from pipeline.options import HEADROOM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--bundle", type=Path, default=None, help="An exported bundle to use.")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity-cpu.md"))
    args = parser.parse_args()
    searches = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / args.arch
        if args.bundle is None:
            subprocess.run([sys.executable, "-m", "pipeline", "export", "--arch", args.arch,
                            "--out", str(bundle), "--no-pt2"], check=True,
                           stdout=subprocess.DEVNULL)
        command = ["bench", str(bundle), "--scenario", "server", "--concurrency", "1,4,16",
                   "--seconds", f"{args.seconds:g}", "--arrival", "poisson", "--p99-ms",
                   f"{args.p99_ms:g}", "--verify-capacity"]
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pipeline", *command], check=True,
                           stdout=subprocess.DEVNULL)
            searches.append(LatencyDoc.load(bundle / "latency.json").server.poisson)
    versions = library_versions()
    lines = [f"# Capacity that holds: {args.arch} at 224 px, Triton + ONNX Runtime on the CPU", "",
             f"Command: `python benchmarks/bench_capacity.py --arch {args.arch} --seconds "
             f"{args.seconds:g} --p99-ms {args.p99_ms:g} --repeats {args.repeats}` (each repeat: "
             f"`python -m pipeline {' '.join(command).replace(str(bundle), 'BUNDLE')}`)", "",
             f"CPU: {cpu_summary()}. Versions: nvidia-pytriton {metadata.version('nvidia-pytriton')}, "
             f"mlcommons-loadgen {metadata.version('mlcommons-loadgen')}, onnxruntime "
             f"{versions.get('onnxruntime-gpu') or versions.get('onnxruntime')}. Server and load "
             f"generator share the machine's cores.", "",
             "What the search found is the highest rate a search trial ran at whose p99 stayed "
             "within the bound (never a bisection midpoint no trial ran at). `--verify-capacity` "
             "then runs Poisson arrivals at 0.9x the capacity, as long as a search trial; a run "
             "that misses lowers the capacity to its own rate and the next checks 0.9x that, up "
             "to 3 runs.", "",
             "| repeat | search trials | found req/s | its p99 ms | checks: rate req/s -> p99 ms "
             "| capacity req/s | result | first check's margin to the bound |",
             "|---|---|---|---|---|---|---|---|"]
    for index, search in enumerate(searches, 1):
        best = search.best
        if best is None or not search.checks:
            lines.append(f"| {index} | {len(search.trials)} | none within the bound | | | | | |")
            continue
        checks = ", ".join(f"{c.target_per_s:g} -> {c.p99_ms:.1f}" + ("" if c.within_bound else " (missed)")
                           for c in search.checks)
        margin = args.p99_ms - search.checks[0].p99_ms
        lines.append(f"| {index} | {len(search.trials)} | {best.target_per_s:g} | {best.p99_ms:.1f} | "
                     f"{checks} | {search.capacity_per_s:g} | {search.capacity_check} | "
                     f"{margin:+.1f} ms ({100 * margin / args.p99_ms:+.0f}%) |")
    first = [s for s in searches if s.checks and s.checks[0].within_bound]
    held = [s for s in searches if s.capacity_check and s.capacity_check.startswith("held")]
    capacities = [s.capacity_per_s for s in held]
    lines += ["", f"The search's own figure held at 90% on the first check in {len(first)} of "
                  f"{len(searches)} repeats; after lowering, the capacity held at 90% in "
                  f"{len(held)} of {len(searches)}."]
    if capacities:
        median = statistics.median(capacities)
        lines += [f"Confirmed capacity: median {median:.1f} req/s, range {min(capacities):g}-"
                  f"{max(capacities):g} across repeats. At the {HEADROOM:g} headroom "
                  f"`report --target-rate` plans {HEADROOM * median:.1f} req/s per replica: "
                  f"1000 req/s needs ceil(1000 / ({median:.1f} x {HEADROOM:g})) = "
                  f"{math.ceil(1000 / (median * HEADROOM))} replicas of this machine."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
