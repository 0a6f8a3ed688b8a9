"""The classic per-image loop over real files, measured properly, and a pipelined variant.

The write-ups this project grew from open each image, convert it to RGB, resize 256 and crop
224, normalise, run the model, and print ``i/N: name 0.012s`` and
``device:<device> total time:<t>s mean:<m>s``. Here decode+preprocess and inference are timed
apart, the model is warmed up first, and the device is named for real. The pipelined mode runs
the same files through predict's streaming engine (decode workers, batches of 8, the core split
predict would choose), and both report end-to-end images/s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.bundle import Bundle
from pipeline.core.records import (
    ImageLoop,
    ModelSection,
    PipelinedLoop,
    SequentialLoop,
)
from pipeline.data.images import BadImage, eval_transform, open_rgb
from pipeline.models.archs import Preprocessing
from pipeline.options import BenchOptions, PredictOptions
from pipeline.stages.bench.timing import percentile_stats, warm_up
from pipeline.stages.stream import Engine, available_cores, split_rule


def sequential_loop(runner: Any, paths: list[Path], prep: Preprocessing) -> SequentialLoop:
    transform = eval_transform(prep)
    decode_ns, infer_ns, lines, skipped = [], [], [], []
    wall_start = time.perf_counter_ns()
    for index, path in enumerate(paths, 1):
        start = time.perf_counter_ns()
        try:
            batch = transform(open_rgb(path)).numpy()[None]
        except BadImage as exc:
            skipped.append(str(exc))
            continue
        decoded = time.perf_counter_ns()
        runner.infer(batch)
        runner.synchronize()
        done = time.perf_counter_ns()
        decode_ns.append(decoded - start)
        infer_ns.append(done - decoded)
        lines.append(f"{index}/{len(paths)}: {path.name} {(done - start) / 1e9:.3f}s")
    wall_s = (time.perf_counter_ns() - wall_start) / 1e9
    count = len(infer_ns)
    return SequentialLoop(n=count, wall_s=wall_s, images_per_s=count / wall_s if wall_s else None,
                          decode=percentile_stats(decode_ns) if count else None,
                          infer=percentile_stats(infer_ns) if count else None,
                          total_s=(sum(decode_ns) + sum(infer_ns)) / 1e9, lines=lines,
                          skipped=skipped)


def pipelined_loop(runner: Any, paths: list[Path], prep: Preprocessing, *, workers: int,
                   batch: int = PredictOptions.batch) -> PipelinedLoop:
    """The same files through predict's streaming engine: decode worker processes feeding
    batches to the model while it runs; end-to-end images/s."""
    engine = Engine(runner, prep, batch=batch, workers=workers)
    count = 0
    start = time.perf_counter_ns()
    for item in engine.run((path, None) for path in paths):
        count += item.error is None
    runner.synchronize()
    wall_s = (time.perf_counter_ns() - start) / 1e9
    return PipelinedLoop(n=count, workers=workers, wall_s=wall_s,
                         images_per_s=count / wall_s if wall_s else None)


def _first_decodable(paths: list[Path], prep: Preprocessing) -> np.ndarray:
    transform = eval_transform(prep)
    for path in paths:
        try:
            return transform(open_rgb(path)).numpy()[None]
        except BadImage:
            continue
    raise BadImage(f"none of the {len(paths)} --images files can be decoded")


def image_loops(runner: Any, backend: str, bundle: Bundle, images: list[str],
                config: BenchOptions, device: str) -> ImageLoop:
    prep = Preprocessing.from_dict(ModelSection.read(bundle).preprocessing)
    paths = [Path(p) for p in images]
    first = _first_decodable(paths, prep)
    warm_up(lambda: runner.infer(first), seconds=config.warmup_s, sync=runner.synchronize)
    sequential = sequential_loop(runner, paths, prep)
    # The engine's core split from the sequential loop's own costs (decode on one core,
    # inference on the runner's threads), as predict splits them.
    decode_s = sequential.decode.mean_ms / 1e3 if sequential.decode else 1.0
    infer_s = (sequential.infer.mean_ms / 1e3 * config.threads) if sequential.infer else 1.0
    workers, _ = split_rule(available_cores(), decode_s, infer_s, device=runner.device)
    pipelined = pipelined_loop(runner, paths, prep, workers=workers)
    mean = sequential.total_s / sequential.n if sequential.n else float("nan")
    return ImageLoop(backend=backend, device=device, files=len(paths),
                     summary=f"device:{device} total time:{sequential.total_s:.3f}s mean:{mean:.4f}s",
                     sequential=sequential, pipelined=pipelined)
