"""``predict --ray``: the same engine as a Ray Data pipeline, for more than one machine.

- the file list is a Ray dataset (``from_items``), split into blocks;
- **decode** is a stateless ``map_batches`` function: Ray tasks run ``decode_crop`` on each
  block, wherever the cluster has CPUs;
- **inference** is ``map_batches`` with a callable class: an actor pool, each actor holding
  one runtime session (the model is loaded once per actor, not per batch), fed batches of
  ``batch`` images;
- results come back to the driver in input order (``preserve_order``) and are written as
  single-process ``predict`` writes them: the same decode, the same normalisation, the same
  runner, so the predictions are identical.

It runs on a local Ray (``ray.init(num_cpus=2)`` when no address is given) and on a cluster
(``address="ray://head:10001"`` or ``"auto"``). The bundle must be readable at the same path
on every node (a shared filesystem), as must the images.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.data.images import decode_crop, normalise
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.models.archs import Preprocessing
from pipeline.options import PredictOptions
from pipeline.stages.predict import (
    ClassScore,
    OutputFile,
    Prediction,
    StreamSummary,
    choose,
    labels_and_preprocessing,
    make_runner,
    softmax,
    top_k,
)
from pipeline.stages.stream import available_cores, walk

INSTALL = 'pip install -e ".[ray]"'
# Ray Data fuses a task map into the actor map after it when their resource requests match,
# and decoding would then run inside the inference actors. A decode task asks for half a CPU
# (decoding waits on reads too), which keeps it a separate task pool
# (ray-project/ray#54433 documents this workaround).
DECODE_CPUS = 0.5


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  the Data library is the extra's point
    except ImportError as exc:
        raise EnvironmentUnavailable(f"--ray needs Ray Data ({exc.name} is missing); install the "
                                     f"extra: {INSTALL}") from None
    return ray


def _decode_batch(batch: dict[str, np.ndarray], prep: dict[str, Any], fast: bool) -> dict[str, Any]:
    """A Ray task body: file names -> crops (HWC uint8) and the reason a file is unusable."""
    from pipeline.data.images import BadImage

    spec = Preprocessing.from_dict(prep)
    pixels = np.zeros((len(batch["file"]), spec.crop, spec.crop, 3), np.uint8)
    errors = []
    for index, name in enumerate(batch["file"]):
        try:
            pixels[index] = decode_crop(str(name), spec, fast=fast)
            errors.append("")
        except BadImage as exc:
            errors.append(str(exc))
    return {"file": batch["file"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _Classify:
    """A Ray actor: one runtime session, reused for every batch it is given."""

    def __init__(self, target: str, backend: str, precision: str, threads: int, k: int) -> None:
        from pipeline.runtimes.registry import get_backend

        self.runner = make_runner(Path(target), get_backend(backend), precision, threads)
        self.names, self.prep = labels_and_preprocessing(self.runner, Path(target))
        self.k = min(k, len(self.names))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import json

        good = np.array([not e for e in batch["error"]], dtype=bool)
        tops = [""] * len(good)
        if good.any():
            logits = self.runner.infer(normalise(np.asarray(batch["pixels"])[good], self.prep))
            rows = iter(softmax(logits))
            tops = [json.dumps([asdict(score) for score in top_k(next(rows), self.names, self.k)])
                    if ok else ""
                    for ok in good]
        return {"file": batch["file"], "top": np.array(tops, dtype=object), "error": batch["error"]}


def classify_on_ray(target: Path, inputs: list[Path], options: PredictOptions, *,
                    address: str | None = None, actors: int | None = None,
                    emit: Callable[[Prediction], None] | None = None,
                    log: Callable[[str], None] = lambda _: None) -> StreamSummary:
    """Classify ``inputs`` with a Ray Data pipeline; the output is what ``write_predictions``
    writes for the same files."""
    import json

    options.check()
    ray = _ray()
    if not Path(target).is_dir():
        raise InputError(f"--ray needs a bundle folder (every node reads it), not {str(target)!r}")
    if options.output and Path(options.output).exists() and not options.resume:
        raise InputError(f"--output {options.output!r} exists; add --resume to continue it, or "
                         f"remove it")
    choice = choose(Path(target), options)
    log(f"precision {options.precision}: {choice.target} ({choice.why})")
    with make_runner(Path(target), choice.backend, choice.precision, 1) as probe:
        _, prep = labels_and_preprocessing(probe, Path(target))
    import logging

    for name in ("ray", "ray.data"):  # Ray's INFO lines would drown the progress and errors
        logging.getLogger(name).setLevel(logging.WARNING)
    started_here = not ray.is_initialized()
    if started_here:
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=available_cores(), include_dashboard=False, **quiet)
    out = OutputFile(Path(options.output), resume=options.resume) if options.output else None
    summary = StreamSummary(output=options.output, resumed=len(out.done) if out else 0,
                            choice=choice.target)
    start = time.perf_counter()
    try:
        files, problems = [], {}
        for path, problem in walk(inputs):
            if out is not None and str(path) in out.done:
                continue
            files.append(str(path))
            if problem:
                problems[str(path)] = problem
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = actors or max(1, cpus // 2)
        threads = options.threads or max(1, cpus // (2 * actors))
        summary.split = (f"Ray: {cpus} CPUs; decode in tasks, {actors} inference actor(s) with "
                         f"{threads} thread(s) each")
        log(f"split: {summary.split}")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        readable = [f for f in files if f not in problems]
        dataset = ray.data.from_items([{"file": f} for f in readable])
        dataset = dataset.map_batches(_decode_batch, fn_kwargs={"prep": prep.to_dict(),
                                                                "fast": options.fast_decode},
                                      batch_size=options.batch, num_cpus=DECODE_CPUS)
        dataset = dataset.map_batches(_Classify, fn_constructor_args=(
            str(target), choice.backend.name, choice.precision, threads, options.top_k),
            batch_size=options.batch, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads)
        def write(prediction: Prediction) -> None:
            summary.deliver(prediction, out, emit)

        # preserve_order: batches arrive in input order; a missing file goes in its place.
        remaining = iter(files)
        for batch in dataset.iter_batches(batch_size=options.batch, batch_format="numpy"):
            for name, top, error in zip(batch["file"], batch["top"], batch["error"]):
                for earlier in remaining:
                    if earlier == str(name):
                        break
                    write(Prediction(earlier, error=problems[earlier]))
                write(Prediction(str(name), error=str(error)) if error
                      else Prediction(str(name), [ClassScore(**score) for score in json.loads(top)]))
        for earlier in remaining:
            write(Prediction(earlier, error=problems[earlier]))
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        if out is not None:
            out.close()
        if started_here:
            ray.shutdown()
        log(summary.summary)
    return summary
