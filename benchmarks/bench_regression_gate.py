"""How often bench's regression gate flags a slower model, and how often the same model.

resnet18 exported at 224 px is the baseline; the same architecture at 240 px does about 15%
more work (240^2 / 224^2 = 1.148). Each trial is one ``bench`` of ort-cpu fp32 at batch 1, as
a CI job runs it, judged by the gate at ``--max-slowdown 0.10``:

- with ``--baseline-rerun`` (the baseline model re-measured in the same run, alternating
  windows): the 240 px model against the 224 px model, and the 224 px model against itself;
- without it, against a latency.json of the 224 px model measured once at the start on this
  machine (what a CI job does when it keeps the baseline's numbers as an artifact), with
  ``--seconds 8`` on both sides: the file comparison needs at least 6 windows of 25 calls a
  row, which 2 seconds do not give.

Targets: with ``--baseline-rerun`` the slower model is flagged in at least 19 of 20 trials
and the same model in at most 1 of 20.

    python benchmarks/bench_regression_gate.py --out benchmarks/results/regression-gate.md
    python benchmarks/bench_regression_gate.py --trials 5 --work /tmp/rg   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import pipeline

ARCH, BASE_SIZE, SLOW_SIZE = "resnet18", 224, 240
BENCH = {"backends": "ort-cpu:fp32", "batch_sizes": [1], "seconds": 2.0, "warmup_seconds": 1.0}


def export(work: Path, size: int) -> Path:
    out = work / f"{ARCH}-{size}"
    if not (out / "manifest.json").is_file():
        pipeline.export(ARCH, out=out, input_size=size, pt2=False, verify=True,
                        log=lambda line: None)
    return out


FILE_SECONDS = 8.0


def trial(bundle: Path, seconds: float = BENCH["seconds"], **gate: object) -> dict:
    started = time.perf_counter()
    result = pipeline.bench(bundle, **{**BENCH, "seconds": seconds}, max_slowdown=0.10,
                            log=lambda line: None, **gate)
    (row,) = result.doc.regression.rows
    return {"flagged": not result, "status": row.status, "slowdown": row.slowdown,
            "p": row.p_value, "reason": row.reason, "seconds": time.perf_counter() - started}


def summarise(name: str, trials: list[dict], should_flag: bool) -> dict:
    flagged = sum(t["flagged"] for t in trials)
    judged = [t for t in trials if t["slowdown"] is not None]
    return {"case": name, "trials": len(trials), "flagged": flagged,
            "not_comparable": sum(t["status"] == "not comparable" for t in trials),
            "median_slowdown": statistics.median(t["slowdown"] for t in judged) if judged else None,
            "slowdown_range": [min(t["slowdown"] for t in judged), max(t["slowdown"] for t in judged)]
            if judged else None,
            "median_p": statistics.median(t["p"] for t in judged) if judged else None,
            "should_flag": should_flag, "seconds_per_trial": statistics.median(t["seconds"] for t in trials)}


def table(cases: list[dict], command: str, took: float) -> str:
    from pipeline.core.machine import cpu_summary

    lines = ["# bench's regression gate: flag rates, resnet18 224 px (baseline) vs 240 px", "",
             f"Command: `{command}`", "",
             f"CPU: {cpu_summary()}, 2 cores, ORT fp32 at batch 1, 2 threads. Each trial is one "
             f"`bench --backends ort-cpu:fp32 --batch-sizes 1 --seconds 2 --max-slowdown 0.10` "
             f"(`--seconds {FILE_SECONDS:g}` against the file, on both sides); "
             f"the gate's test is a one-sided Mann-Whitney U over windows of 25 calls (p < 0.05), "
             f"on top of the median being more than 10% slower.", "",
             "| case | trials | flagged | not comparable | median slowdown | slowdown range | "
             "median p | target | s/trial |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        target = ("flagged >= 19 of 20" if case["should_flag"] else "flagged <= 1 of 20")
        rng = case["slowdown_range"]
        lines.append(
            f"| {case['case']} | {case['trials']} | **{case['flagged']}** | {case['not_comparable']} | "
            + (f"{100 * case['median_slowdown']:+.1f}% | {100 * rng[0]:+.1f} to {100 * rng[1]:+.1f}% | "
               f"{case['median_p']:.3g}" if case["median_slowdown"] is not None else "— | — | —")
            + f" | {target} | {case['seconds_per_trial']:.0f} |")
    lines += ["", f"Took {took / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/regression-gate"))
    parser.add_argument("--out", type=Path, default=None, help="Write the Markdown table here.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args()
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    base, slow = export(args.work, BASE_SIZE), export(args.work, SLOW_SIZE)
    same = args.work / f"{ARCH}-{BASE_SIZE}-again"
    if not same.exists():
        shutil.copytree(base, same)
    pipeline.bench(base, **{**BENCH, "seconds": FILE_SECONDS}, log=lambda line: None)  # once
    baseline_file = args.work / "baseline-latency.json"
    shutil.copy(base / "latency.json", baseline_file)
    runs: dict[str, list[dict]] = {k: [] for k in ("slow-rerun", "same-rerun", "slow-file", "same-file")}
    for index in range(args.trials):  # interleaved, so that drift over the run hits every case
        runs["slow-rerun"].append(trial(slow, baseline_rerun=base))
        runs["same-rerun"].append(trial(same, baseline_rerun=base))
        runs["slow-file"].append(trial(slow, FILE_SECONDS, baseline=baseline_file))
        runs["same-file"].append(trial(same, FILE_SECONDS, baseline=baseline_file))
        print(f"trial {index + 1}/{args.trials}: " + ", ".join(
            f"{k} {'FLAG' if v[-1]['flagged'] else 'ok'} {100 * (v[-1]['slowdown'] or 0):+.1f}%"
            for k, v in runs.items()), file=sys.stderr, flush=True)
    cases = [summarise("240 px vs 224 px, --baseline-rerun", runs["slow-rerun"], True),
             summarise("224 px vs itself, --baseline-rerun", runs["same-rerun"], False),
             summarise("240 px vs the 224 px file measured at the start", runs["slow-file"], True),
             summarise("224 px vs the 224 px file measured at the start", runs["same-file"], False)]
    if args.json:
        print(json.dumps({"cases": cases, "trials": runs}, indent=2))
    text = table(cases, "python benchmarks/bench_regression_gate.py " + " ".join(sys.argv[1:]),
                 time.perf_counter() - started)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
