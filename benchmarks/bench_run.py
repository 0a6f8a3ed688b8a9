"""Time `python -m pipeline run` with its defaults; record the accuracy it reaches, and what
int8 and the other reduced precisions cost in accuracy on that trained model.

The run calibrates int8 on the training split and verify gates every reduced-precision variant
on the validation split (400 images, held apart): the gate table below is the last run's
parity.json, and the recommendation is the last run's report.

    python benchmarks/bench_run.py --repeats 1 --out benchmarks/results/run.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 300.0
TARGET_ACC = 0.90


PHASES = ("train", "export", "quantize", "bench")  # each records its duration_s in the manifest


def run_once() -> tuple[float, float, list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--out", tmp],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"run exited {proc.returncode}: {proc.stderr[-2000:]}")
        metrics = json.loads(Path(tmp, "metrics.json").read_text())
        history = json.loads(Path(tmp, "history.json").read_text())
        extra = {"parity": json.loads(Path(tmp, "parity.json").read_text()),
                 "latency": json.loads(Path(tmp, "latency.json").read_text()),
                 "manifest": json.loads(Path(tmp, "manifest.json").read_text())}
    return wall, metrics["top1"], history, extra


def gate_lines(extra: dict) -> list[str]:
    parity, latency = extra["parity"], extra["latency"]
    int8 = extra["manifest"]["quantize"]["variants"]["model.int8.onnx"]
    calib = int8["calibration"]
    ev = parity["evaluation"]
    lines = ["## Reduced precision on this trained model", "",
             f"int8: {int8['format']} per-channel, {int8['activations']} activations / "
             f"{int8['weights']} weights, 7-bit weights: {int8['reduce_range']} "
             f"({int8['why_reduce_range']}); calibrated on {calib['count']} images of "
             f"{calib['source']} ({calib['method']}).",
             f"Evaluation: {ev['images']} images: {ev['source']}; held apart: "
             f"{ev['held_apart_from_calibration']}. Gate: top-1 drop <= "
             f"{parity['gate_rule']['max_top1_drop_points']:g} points and agreement >= "
             f"{100 * parity['gate_rule']['min_top1_agreement']:g}%.", "",
             "| candidate | ran as | top-1 agreement | 95% interval | top-5 agreement | mean cosine | "
             "fp32 top-1 | candidate top-1 | drop (points) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in parity["gates"]:
        bounds = g.get("disagreement_bounds")
        interval = (f"{100 * (1 - bounds[1]):.2f}-{100 * (1 - bounds[0]):.2f}%" if bounds else "")
        lines.append(f"| {g['candidate']} | {g['precision']} | {100 * g['top1_agreement']:.2f}% | "
                     f"{interval} | {100 * g['top5_agreement']:.2f}% | {g['cosine_mean']:.5f} | "
                     f"{100 * g['fp32_top1']:.2f}% | {100 * g['candidate_top1']:.2f}% | "
                     f"{g['top1_drop_points']:.2f} | {g.get('verdict') or ('pass' if g['passed'] else 'fail')} |")
    lines += [f"| {key} | skipped | {reason} ||||||||" for key, reason in parity["skipped"].items()
              if ":" in key]
    best = latency["recommendation"]["fastest_batch1"]
    fp32 = latency["recommendation"]["fastest_fp32_batch1"]
    if best and fp32:
        lines += ["", f"Recommendation of that run's bench (batch 1, 64 px, 2 threads): "
                      f"{best['backend']} {best['precision']} at p50 {best['p50_ms']:.2f} ms, "
                      f"{latency['recommendation']['speedup_vs_fp32']:.2f}x the fastest fp32 "
                      f"({fp32['backend']} {fp32['p50_ms']:.2f} ms)."]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/run.md"))
    args = parser.parse_args()
    runs = [run_once() for _ in range(args.repeats)]
    walls = [run[0] for run in runs]
    accs = [run[1] for run in runs]
    history = runs[-1][2]
    from pipeline.core.machine import cpu_summary
    from pipeline.options import RunOptions, TrainOptions

    run, train = RunOptions(), TrainOptions()
    lines = ["# `python -m pipeline run` with its defaults", "",
             f"Command: `python benchmarks/bench_run.py --repeats {args.repeats}`", "",
             f"Machine: {cpu_summary()}, {os.cpu_count()} cores, no GPU. Defaults: resnet18, "
             f"synthetic shapes (4 classes, {train.synthetic_per_class} per class, 64 px), "
             f"{run.epochs} epochs, batch {run.batch_size}, {train.optimizer}, {train.schedule}, "
             f"data-loader workers {TrainOptions(data='synthetic').loader_workers}; then export, "
             f"quantize (int8), verify and bench ({', '.join(run.backends)}; batch "
             f"{', '.join(map(str, run.batch_sizes))}; {run.bench_seconds:g} s a row).", "",
             "| runs | median wall s | max wall s | best val accuracy (each run) | targets |",
             "|---|---|---|---|---|",
             f"| {len(runs)} | {statistics.median(walls):.0f} | {max(walls):.0f} | "
             f"{', '.join(f'{a:.4f}' for a in accs)} | wall <= {TARGET_S:.0f} s on this CPU: "
             f"{'met' if max(walls) <= TARGET_S else 'MISSED'}; accuracy >= {TARGET_ACC:.0%}: "
             f"{'met' if min(accs) >= TARGET_ACC else 'MISSED'} |", "",
             "Last run, per epoch:", "", "| epoch | train loss | train acc | val loss | val acc | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | {r['val_loss']:.4f} | "
              f"{r['val_acc']:.4f} | {r['duration_s']:.1f} |" for r in history]
    lines += ["", "Where the time goes (seconds; each stage's own duration_s in manifest.json, "
              "the rest is verify, start-up and the report):", "",
              "| run | wall | " + " | ".join(PHASES) + " | verify and the rest |",
              "|---|---|" + "---|" * (len(PHASES) + 1)]
    for index, (wall, _, _, extra) in enumerate(runs, 1):
        stages = extra["manifest"]["stages"]
        phases = [stages.get(name, {}).get("duration_s") or 0.0 for name in PHASES]
        lines.append(f"| {index} | {wall:.0f} | " + " | ".join(f"{t:.0f}" for t in phases)
                     + f" | {wall - sum(phases):.0f} |")
    lines += [""] + gate_lines(runs[-1][3])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
