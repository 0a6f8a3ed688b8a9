"""``bench --scenario offline``: images/s from files to labels, and what bounds it.

MLPerf's offline scenario scores one large query: every sample is available at once and only
throughput counts. Here the query is a folder of image files, and three figures come from the
same run on the same cores:

- **decode-only**: decode and preprocess every file with one decode worker per core;
- **inference-only**: the chosen model at the chosen batch with one runtime thread per core,
  on decoded images, for ``seconds`` (the median of its windows);
- **end to end**: ``predict``'s streaming engine over every file, its core split measured as
  predict measures it.

Decode and inference share the cores, so the end-to-end rate is bounded by
``1 / (1/decode + 1/inference)``; ``ratio_to_bound`` says how close the engine comes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.bundle import OFFLINE, Bundle
from pipeline.core.machine import machine_block
from pipeline.core.records import OfflineRun
from pipeline.data.images import find_images, normalise
from pipeline.errors import InputError
from pipeline.options import PredictOptions
from pipeline.runtimes.base import Runner
from pipeline.stages.predict import Predictor, make_runner, sample_files
from pipeline.stages.decoders import DecodePool
from pipeline.stages.stream import available_cores

WINDOW_S = 0.5


def decode_only(paths: list[Path], predictor: Predictor, cores: int) -> tuple[float, list[np.ndarray]]:
    """Images/s decoding every file on ``cores`` decode workers (predict's own); the first
    crops."""
    with DecodePool(cores, predictor.prep, predictor.options.fast_decode) as pool:
        list(pool.imap([str(p) for p in paths[:cores]], window=2 * cores))  # workers started
        start = time.perf_counter()
        results = list(pool.imap([str(p) for p in paths], window=8 * cores))
        seconds = time.perf_counter() - start
    crops = [pixels for _, pixels, _ in results if pixels is not None]
    if not crops:
        raise InputError("none of the --images files can be decoded")
    return len(crops) / seconds, crops[:64]


def infer_only(runner: Runner, crops: list[np.ndarray], predictor: Predictor, batch: int,
               seconds: float) -> float:
    """Images/s at ``batch``: the median of half-second windows over ``seconds``."""
    inputs = normalise(np.stack([crops[i % len(crops)] for i in range(batch)]), predictor.prep)
    runner.infer(inputs)
    rates, deadline = [], time.perf_counter() + max(seconds, 3 * WINDOW_S)
    while time.perf_counter() < deadline or len(rates) < 3:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < WINDOW_S:
            runner.infer(inputs)
            count += batch
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def offline_bench(bundle: Path, images: Path, options: PredictOptions, *, seconds: float = 5.0,
                  log: Callable[[str], None] = lambda _: None) -> OfflineRun:
    """Measure the three figures and write ``offline.json`` into the bundle."""
    target = Bundle.open(bundle)
    paths = find_images([images])
    cores = available_cores()
    with Predictor(target.root, options, log=log, sample=sample_files([images])) as predictor:
        choice = predictor.choice
        assert choice is not None
        log(f"decode only: {len(paths)} files on {cores} processes")
        decode_rate, crops = decode_only(paths, predictor, cores)
        log(f"inference only: {choice.target} at batch {options.batch} on {cores} threads")
        with make_runner(target.root, choice.backend, choice.precision, cores) as runner:
            infer_rate = infer_only(runner, crops, predictor, options.batch, seconds)
        log(f"end to end: {predictor.split.describe()}")
        classified = errors = 0
        start = time.perf_counter()
        for prediction in predictor.stream([images]):
            if prediction.error is None:
                classified += 1
            else:
                errors += 1
        elapsed = time.perf_counter() - start
        split = predictor.split
    end_to_end = classified / elapsed
    bound = 1.0 / (1.0 / decode_rate + 1.0 / infer_rate)
    run = OfflineRun(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine_block(),
                     target=choice.target, choice=choice.why, files=len(paths),
                     classified=classified, errors=errors, batch=options.batch, cores=cores,
                     workers=split.workers, threads=split.threads, split=split.describe(),
                     fast_decode=options.fast_decode, decode_only_per_s=decode_rate,
                     infer_only_per_s=infer_rate, shared_core_bound_per_s=bound,
                     end_to_end_per_s=end_to_end, ratio_to_bound=end_to_end / bound,
                     seconds=elapsed)
    run.dump(target.path(OFFLINE))
    return run
