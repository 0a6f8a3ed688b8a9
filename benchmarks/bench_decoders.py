"""Which decode mechanism for predict's engine: threads, multiprocessing's spawn pool, or
predict's own worker processes (``pipeline.stages.decoders``), side by side in one run.

On the same real photos as ``bench_offline.py`` (crops of scikit-image's and matplotlib's
sample photos, 0.05-5 MP, a quarter >= 2 MP), each mechanism decodes and preprocesses the
files to 224 px crops on all cores, in alternating rounds; the table gives the median images/s
and the time from creating the pool to the first decoded file (start-up).

- **threads**: ``concurrent.futures.ThreadPoolExecutor``, one thread per core. Pillow releases
  the GIL while it decodes and resamples; this measures how much of the work that is.
  Works from any caller, but a decoder that crashes takes the caller with it.
- **spawn pool**: ``ProcessPoolExecutor`` with the spawn context, the engine before this
  change. Re-imports the caller's ``__main__`` (fails from an unguarded script or stdin) and
  breaks whole when one worker dies.
- **predict's workers**: ``DecodePool``, one ``python -m pipeline.stages.decoders`` per core,
  one pipe each. Works from any caller; a dying worker costs its file.

    python benchmarks/bench_decoders.py --out benchmarks/results/decoders.md
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_offline import make_photos, megapixel_summary  # noqa: E402

from pipeline.core.machine import cpu_summary  # noqa: E402
from pipeline.models.archs import Preprocessing  # noqa: E402
from pipeline.stages.decoders import DecodePool, decode_file  # noqa: E402
from pipeline.stages.stream import available_cores  # noqa: E402

PREP = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def with_executor(make, paths: list[str], cores: int) -> tuple[float, float]:
    start = time.perf_counter()
    with make() as pool:
        first = pool.submit(decode_file, paths[0], PREP, False)
        first.result()
        started = time.perf_counter() - start
        begin = time.perf_counter()
        results = list(pool.map(decode_file, paths, [PREP] * len(paths), [False] * len(paths),
                                chunksize=1 if isinstance(pool, ThreadPoolExecutor) else 4))
        seconds = time.perf_counter() - begin
    assert all(pixels is not None for pixels, _ in results)
    return len(paths) / seconds, started


def threads(paths: list[str], cores: int) -> tuple[float, float]:
    return with_executor(lambda: ThreadPoolExecutor(cores), paths, cores)


def spawn_pool(paths: list[str], cores: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    return with_executor(lambda: ProcessPoolExecutor(cores, mp_context=context), paths, cores)


def decode_pool(paths: list[str], cores: int) -> tuple[float, float]:
    start = time.perf_counter()
    with DecodePool(cores, PREP) as pool:
        pool.result(pool.submit(paths[0]))
        started = time.perf_counter() - start
        begin = time.perf_counter()
        results = list(pool.imap(paths, window=8 * cores))
        seconds = time.perf_counter() - begin
    assert all(pixels is not None for _, pixels, _ in results)
    return len(paths) / seconds, started


def one_core(paths: list[str], cores: int) -> tuple[float, float]:
    begin = time.perf_counter()
    for path in paths:
        decode_file(path, PREP, False)
    return len(paths) / (time.perf_counter() - begin), 0.0


MECHANISMS = {
    "one core, in the caller (reference)": one_core,
    "threads (ThreadPoolExecutor)": threads,
    "spawn pool (ProcessPoolExecutor, before)": spawn_pool,
    "predict's workers (DecodePool, now)": decode_pool,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--distinct", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        made = make_photos(Path(tmp), args.distinct, args.files)
        paths = [str(p) for p in sorted((Path(tmp) / "all").iterdir())]
        rates: dict[str, list[float]] = {name: [] for name in MECHANISMS}
        starts: dict[str, list[float]] = {name: [] for name in MECHANISMS}
        for round_ in range(args.rounds):
            for name, measure in MECHANISMS.items():
                rate, started = measure(paths, cores)
                rates[name].append(rate)
                starts[name].append(started)
                print(f"round {round_ + 1}: {name}: {rate:.1f} img/s, first after {started:.2f} s",
                      file=sys.stderr)
        photos = megapixel_summary(made["distinct"])
    best = statistics.median(rates["predict's workers (DecodePool, now)"])
    lines = [
        "# Decode mechanisms for predict's engine: images/s decoding and preprocessing to 224 px",
        "",
        "Command: `python benchmarks/bench_decoders.py --out benchmarks/results/decoders.md`",
        "",
        f"CPU: {cpu_summary()}, {cores} cores. {args.rounds} alternating rounds (medians; "
        f"min-max in brackets).",
        "",
        f"Photos: {photos} (bench_offline.py's set), {len(paths)} files.",
        "",
        "| mechanism | images/s | vs predict's workers | start-up to the first crop |",
        "|---|---|---|---|",
    ]
    for name in MECHANISMS:
        rate = statistics.median(rates[name])
        start = statistics.median(starts[name])
        lines.append(f"| {name} | {rate:.1f} [{min(rates[name]):.1f}-{max(rates[name]):.1f}] | "
                     f"{rate / best:.2f}x | {start:.2f} s |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
