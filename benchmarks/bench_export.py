"""Time the whole `python -m pipeline export` command and read its peak memory.

Each run is a fresh subprocess, timed wall-clock; peak RSS comes from that child's own
rusage (os.wait4), so runs never see each other's memory. Writes a Markdown table.

    python benchmarks/bench_export.py --repeats 3 --out benchmarks/results/export.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.machine import cpu_summary

TARGETS = {"resnet18": ("wall", 20.0), "resnet50": ("wall", 40.0), "resnet152": ("rss", 3.0)}
HELP_TARGET_S = 1.0


def run_once(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pipeline", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def measure(arch: str, repeats: int) -> dict[str, float]:
    walls, peaks = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            wall, peak, code = run_once(["export", "--arch", arch, "--out", f"{tmp}/{arch}"])
        if code != 0:
            raise SystemExit(f"export --arch {arch} exited {code}")
        walls.append(wall)
        peaks.append(peak)
        print(f"{arch}: {wall:.1f}s, peak RSS {peak:.2f} GiB", file=sys.stderr)
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls),
            "rss": max(peaks), "n": repeats}


def help_time(repeats: int = 10) -> list[float]:
    return sorted(run_once(["--help"])[0] for _ in range(repeats))


def verdict(arch: str, row: dict[str, float]) -> str:
    kind, limit = TARGETS.get(arch, ("", 0.0))
    if not kind:
        return ""
    value = row["median"] if kind == "wall" else row["rss"]
    unit = "s" if kind == "wall" else " GiB"
    return f"{'met' if value <= limit else 'MISSED'} (target {kind} <= {limit:g}{unit})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,resnet50,resnet152")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export.md"))
    args = parser.parse_args()

    rows = {arch: measure(arch, args.repeats) for arch in args.archs.split(",")}
    helps = help_time()
    lines = [
        "# `python -m pipeline export` end to end",
        "",
        f"Command: `python benchmarks/bench_export.py --archs {args.archs} --repeats {args.repeats}`",
        "",
        f"Machine: {cpu_summary()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Defaults: dynamo exporter, opset 18, onnxsim, "
        f"verify on CPU. Wall time includes interpreter start-up and the verify stage. "
        f"Peak RSS is in GiB (2^30 bytes), the largest of the runs; the RSS target of "
        f"'3 GB' is checked as 3 GiB, so a value above 2.79 GiB would miss it in decimal GB.",
        "",
        "| arch | runs | median s | min s | max s | peak RSS GiB | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, row in rows.items():
        lines.append(f"| {arch} | {row['n']} | {row['median']:.1f} | {row['min']:.1f} | "
                     f"{row['max']:.1f} | {row['rss']:.2f} | {verdict(arch, row)} |")
    lines += ["", f"`python -m pipeline --help`: median {statistics.median(helps):.3f} s, "
                  f"max {max(helps):.3f} s over {len(helps)} runs "
                  f"({'met' if statistics.median(helps) <= HELP_TARGET_S else 'MISSED'}, "
                  f"target <= {HELP_TARGET_S:g} s)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
