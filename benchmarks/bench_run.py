"""Time `python -m pipeline run` with its defaults and record the validation accuracy it reaches.

    python benchmarks/bench_run.py --repeats 1 --out benchmarks/results/run.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 300.0
TARGET_ACC = 0.90


def run_once() -> tuple[float, float, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--out", tmp],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"run exited {proc.returncode}: {proc.stderr[-2000:]}")
        metrics = json.loads(Path(tmp, "metrics.json").read_text())
        history = json.loads(Path(tmp, "history.json").read_text())
    return wall, metrics["top1"], history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/run.md"))
    args = parser.parse_args()
    runs = [run_once() for _ in range(args.repeats)]
    walls = [wall for wall, _, _ in runs]
    accs = [acc for _, acc, _ in runs]
    history = runs[-1][2]
    lines = ["# `python -m pipeline run` with its defaults", "",
             f"Command: `python benchmarks/bench_run.py --repeats {args.repeats}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU. Defaults: resnet18, "
             f"synthetic shapes (4 classes, 500 per class, 64 px), 10 epochs, batch 16, AdamW, "
             f"cosine; then export, verify and bench.", "",
             "| runs | median wall s | max wall s | best val accuracy (each run) | targets |",
             "|---|---|---|---|---|",
             f"| {len(runs)} | {statistics.median(walls):.0f} | {max(walls):.0f} | "
             f"{', '.join(f'{a:.4f}' for a in accs)} | wall <= {TARGET_S:.0f} s: "
             f"{'met' if max(walls) <= TARGET_S else 'MISSED'}; accuracy >= {TARGET_ACC:.0%}: "
             f"{'met' if min(accs) >= TARGET_ACC else 'MISSED'} |", "",
             "Last run, per epoch:", "", "| epoch | train loss | train acc | val loss | val acc | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | {r['val_loss']:.4f} | "
              f"{r['val_acc']:.4f} | {r['duration_s']:.1f} |" for r in history]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
