"""serve at concurrency 1: this checkout against an earlier commit, side by side in one run.

Exports resnet18 at 224 px (random weights: speed only) once, then, in alternating rounds,
times in-process ONNX Runtime at batch 1 and `python -m pipeline serve` from each of the two
trees (the earlier one from a temporary `git worktree`), each with one client sending
binary-tensor requests through serve's front (Triton's HTTP client, the same image every
time). Every round starts each server afresh; the table gives each one's per-round p50, p90
and p99, and the median over rounds. The default earlier commit is the last one whose serve
ran the model behind PyTriton's `bind` (its stub-to-process hand-off):

    python benchmarks/bench_serve_before_after.py --out benchmarks/results/serve-before-after-cpu.md
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.machine import cpu_summary
from pipeline.serving.serve import free_port, model_ready
from pipeline.stages.bench.timing import percentile_stats, timed_loop

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "cee498d"  # serve through PyTriton's bind (model function in serve's process)


def timed(call: Callable[[], object], requests: int, warmup: int) -> dict[str, Any]:
    """The statistics of ``call``'s latency (bench's own: p99 needs 600 samples), ``requests``
    times after ``warmup`` untimed calls."""
    timed_loop(call, iterations=warmup, seconds=0)
    return percentile_stats(timed_loop(call, iterations=requests, seconds=0)).to_dict()


def client_latencies(port: int, model: str, shape: tuple[int, ...], requests: int,
                     warmup: int) -> dict[str, Any]:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    image = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    tensor = http.InferInput("input", list(shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=True)
    wanted = [http.InferRequestedOutput("logits", binary_data=True)]
    try:
        return timed(lambda: client.infer(model, [tensor], outputs=wanted).as_numpy("logits"),
                     requests, warmup)
    finally:
        client.close()


def in_process(model_file: Path, shape: tuple[int, ...], requests: int, warmup: int) -> dict[str, Any]:
    from pipeline.runtimes.registry import get_backend

    image = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    with get_backend("ort-cpu").make_file(model_file) as runner:
        return timed(lambda: runner.infer(image), requests, warmup)


def served(tree: Path, bundle: Path, model: str, shape: tuple[int, ...], requests: int,
           warmup: int) -> dict[str, Any]:
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "pipeline", "serve", str(bundle), "--port", str(ports[0]),
               "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    process = subprocess.Popen(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve from {tree} exited {process.returncode}")
            if model_ready(f"http://127.0.0.1:{ports[0]}", model):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"serve from {tree} was not ready in 180 s")
            time.sleep(0.5)
        return client_latencies(ports[0], model, shape, requests, warmup)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def per_round(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join("n/a" if r[key] is None else f"{r[key]:.2f}" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the earlier commit (default %(default)s)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve-before-after-cpu.md"))
    args = parser.parse_args()
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "pipeline"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    shape = (1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        earlier = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(earlier), args.before], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            bundle = Path(tmp) / args.arch
            subprocess.run([sys.executable, "-m", "pipeline", "export", "--arch", args.arch,
                            "--out", str(bundle), "--no-pt2"], check=True, stdout=subprocess.DEVNULL)
            model_file = bundle / "model.sim.onnx"
            runs: dict[str, list[dict[str, Any]]] = {}
            for number in range(args.rounds):
                for name, measure in (
                        ("in-process ONNX Runtime, batch 1",
                         lambda: in_process(model_file, shape, args.requests, args.warmup)),
                        (f"serve at {args.before}",
                         lambda: served(earlier, bundle, args.arch, shape, args.requests, args.warmup)),
                        (f"serve at {after}{' + uncommitted changes' if dirty else ''}",
                         lambda: served(ROOT, bundle, args.arch, shape, args.requests, args.warmup))):
                    runs.setdefault(name, []).append(measure())
                    print(f"round {number + 1}: {name}: p50 {runs[name][-1]['p50_ms']:.2f} ms",
                          flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT,
                           capture_output=True)
    base = statistics.median(r["p50_ms"] for r in next(iter(runs.values())))
    lines = [f"# serve at concurrency 1: {args.before} against {after}, {args.arch} at 224 px", "",
             f"Command: `python benchmarks/bench_serve_before_after.py --before {args.before} "
             f"--rounds {args.rounds} --requests {args.requests}`", "",
             f"CPU: {cpu_summary()}. One client, binary-tensor requests through serve's front, "
             f"{args.requests} timed after {args.warmup} warm-up, each server started afresh per "
             f"round; the rounds alternate, so all rows share the machine's state.", "",
             "| | p50 ms (median of rounds) | p50 per round | p90 per round | p99 per round | "
             "p50 over in-process |",
             "|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        p50 = statistics.median(r["p50_ms"] for r in rows)
        lines.append(f"| {name} | {p50:.2f} | {per_round(rows, 'p50_ms')} | "
                     f"{per_round(rows, 'p90_ms')} | {per_round(rows, 'p99_ms')} | "
                     f"+{p50 - base:.2f} ms |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
