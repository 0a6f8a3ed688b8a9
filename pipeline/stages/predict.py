"""Classify image files with an exported model: a bundle, a bare .onnx or a bare model.pt2.

A bare .onnx carries its preprocessing and class names in ``metadata_props``, a model.pt2 the
same keys in its ``extra/pipeline.json`` (both written by export), so nothing else is needed.
Files stream through ``pipeline.stages.stream``: decoded in worker processes, batched, run,
and written out in input order as they are ready. Bad files get a per-file error and the rest
still run.

``--precision auto`` (the default) runs what the report recommends: the fastest (backend,
precision) whose accuracy gate passed for this bundle on this CPU (by bench's images/s here,
else int8 first), and fp32 when nothing was gated.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np

from pipeline.core.bundle import LATENCY, Bundle, sha256_of
from pipeline.core.machine import cpu_flags, cpu_model, cpu_summary
from pipeline.core.records import LatencyDoc, read_parity, target_name
from pipeline.errors import InputError
from pipeline.models.archs import Preprocessing
from pipeline.options import PredictOptions, output_format
from pipeline.runtimes.base import Runner
from pipeline.runtimes.registry import (
    BACKENDS,
    Backend,
    check_precision_name,
    predict_backend,
    remote,
    served_model,
)
from pipeline.stages.stream import CALIBRATION_FILES, Engine, Split, plan_split, walk


@dataclass(frozen=True)
class ClassScore:
    """One of a prediction's top-k classes."""

    index: int
    label: str
    probability: float


@dataclass
class Prediction:
    """One file's result: its top-k classes, most probable first, or why it has none."""

    file: str
    top: list[ClassScore] = field(default_factory=list)
    error: str | None = None


def backend_for(runtime: str, provider: str) -> Backend:
    """The registry entry for ``--runtime``/``--provider``."""
    return predict_backend(runtime, provider)


# ----------------------------------------------------------------------------- choosing the model
@dataclass(frozen=True)
class Choice:
    backend: Backend
    precision: str
    why: str

    @property
    def target(self) -> str:
        return target_name(self.backend.name, self.precision)


def choose(target: Path, options: PredictOptions) -> Choice:
    """The (backend, precision) to run: as given, or for ``auto`` the fastest gated one."""
    runtime = options.runtime or "ort"
    if options.precision != "auto":
        return Choice(backend_for(runtime, options.provider), options.precision, "as asked")
    fallback = Choice(backend_for(runtime, options.provider), "fp32", "")
    if not target.is_dir():
        return Choice(fallback.backend, "fp32", "a bare model file runs as it is")
    bundle = Bundle.open(target)
    parity = read_parity(bundle)
    if parity is None:
        return Choice(fallback.backend, "fp32", "no verify results (parity.json): fp32")
    if parity.machine != cpu_summary():
        return Choice(fallback.backend, "fp32", f"the gates in parity.json ran on another CPU "
                                                f"({parity.machine}); run verify here: fp32")
    gated = []
    for gate in parity.gates:
        backend = BACKENDS.get(gate.backend)
        if backend is None or not backend.predict or not gate.passed or gate.not_meaningful:
            continue
        if options.runtime and backend.runtime != options.runtime:
            continue
        if backend.device != ("cuda" if options.provider == "cuda" else "cpu"):
            continue
        if backend.availability_problem(with_cuda=options.provider == "cuda"):
            continue
        try:
            path = backend.model_file(bundle, gate.precision_requested)
        except Exception:  # the variant is gone: its gate no longer says anything
            continue
        if gate.model_sha256 and sha256_of(path) != gate.model_sha256:
            continue
        gated.append((backend, gate.precision_requested, gate))
    if not gated:
        return Choice(fallback.backend, "fp32", "no reduced precision passed its gate here: fp32")
    speed = _measured_speed(bundle)
    if speed:
        gated.sort(key=lambda g: -speed.get(target_name(g[0].name, g[1]), 0.0))
        best = gated[0]
        rate = speed.get(target_name(best[0].name, best[1]))
        how = (f"fastest gated target in latency.json here ({rate:.0f} img/s)" if rate else
               "gate passed (not timed in latency.json)")
    else:
        gated.sort(key=lambda g: (_PREFERENCE.index(g[1]) if g[1] in _PREFERENCE else 9,
                                  g[0].runtime != "ort"))
        best, how = gated[0], "gate passed; no bench results here, int8 first"
    agreement = best[2].top1_agreement
    return Choice(best[0], best[1], f"{how}; top-1 agreement with fp32 "
                                    f"{100 * agreement:.2f}%" if agreement is not None else how)


_PREFERENCE = ("int8", "auto", "fp16")


def _measured_speed(bundle: Bundle) -> dict[str, float]:
    """Best images/s per target in the bundle's latency.json, if it was measured on this CPU."""
    path = bundle.path(LATENCY)
    if not path.is_file():
        return {}
    try:
        doc = LatencyDoc.load(path)
    except InputError:
        return {}
    if doc.machine.cpu != cpu_model() or doc.machine.cpu_flags != cpu_flags():
        return {}
    best: dict[str, float] = {}
    for row in doc.rows:
        if row.ok and row.images_per_s:
            key = target_name(row.backend, row.requested)
            best[key] = max(best.get(key, 0.0), row.images_per_s)
    return best


def make_runner(target: Path, backend: Backend, precision: str, threads: int | None = None) -> Runner:
    """A runner on a bundle's model at ``precision``, or on a bare .onnx file as it is."""
    check_precision_name(precision)
    if target.is_dir():
        bundle = Bundle.open(target)
        bundle.require_export()
        return backend.make(bundle, precision, threads=threads)
    if not target.is_file():
        raise InputError(f"model file {str(target)!r} does not exist")
    if target.suffix == ".pt2" or backend.runtime == "torch-export":
        if precision != "fp32" or backend.runtime == "openvino":
            raise InputError(f"a .pt2 runs in PyTorch at fp32; drop --precision {precision} "
                             f"and --runtime {backend.runtime}")
        return predict_backend("torch-export", backend.device).make_file(target)
    if precision != "fp32":
        raise InputError(f"--precision {precision} chooses a variant inside a bundle; a bare "
                         f".onnx runs as it is: give the bundle folder, or the variant's file")
    return backend.make_file(target, precision, threads=threads)


def labels_and_preprocessing(runner: Any, target: Path) -> tuple[list[str], Preprocessing]:
    """From the model's own metadata_props (written by export), read once from the runtime."""
    meta = runner.metadata()
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise InputError(f"{str(target)!r} lacks metadata {', '.join(missing)}; export it with "
                         f"python -m pipeline export")
    return json.loads(meta["class_names"]), Preprocessing.from_dict(json.loads(meta["preprocessing"]))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, names: list[str], k: int) -> list[ClassScore]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [ClassScore(int(i), names[i], float(probabilities[i])) for i in order]


def server_runner(target: Path, url: str, precision: str) -> Any:
    """A runner that sends each batch to the Triton server at ``url`` serving this bundle."""
    if not Path(target).is_dir():
        raise InputError(f"--server needs the bundle folder the server serves (for its "
                         f"preprocessing and classes), not {str(target)!r}")
    return remote(url, served_model(Bundle.open(target), "fp32" if precision == "auto" else precision))


# ----------------------------------------------------------------------------- the predictor
class Predictor:
    """A chosen model, its runner and the streaming engine: ``stream(inputs)`` yields
    Predictions in input order. A context manager; closing it releases the runner."""

    def __init__(self, target: Path | str, options: PredictOptions = PredictOptions(), *,
                 server: str | None = None, log: Callable[[str], None] = lambda _: None,
                 sample: list[Path] | None = None) -> None:
        options.check()
        self.target, self.options, self.log = Path(target), options, log
        if server:
            self.choice = None
            self.runner = server_runner(self.target, server, options.precision)
            self.split = Split(0, options.workers if options.workers is not None else 1, 1,
                               how="server: decode here, inference there")
        else:
            self.choice = choose(self.target, options)
            self.runner, self.split = self._runner_and_split(sample or [])
            # Said once the model has loaded: a file that cannot be read gets its one error line.
            if options.precision == "auto":
                log(f"precision auto: {self.choice.target} ({self.choice.why})")
            log(f"split: {self.split.describe()}")
        self.class_names, self.prep = labels_and_preprocessing(self.runner, self.target)
        self.engine = Engine(self.runner, self.prep, batch=options.batch,
                             workers=self.split.workers, max_wait_s=options.max_wait_ms / 1e3,
                             fast_decode=options.fast_decode)

    def _runner_and_split(self, sample: list[Path]) -> tuple[Runner, Split]:
        from pipeline.stages.stream import available_cores

        options, choice = self.options, self.choice
        assert choice is not None

        def make(threads: int | None) -> Runner:
            return make_runner(self.target, choice.backend, choice.precision, threads)

        cores = available_cores()
        if options.workers is not None and options.threads is not None:
            return make(options.threads), Split(cores, options.workers, options.threads)
        with make(1) as probe:  # one session measures both the preprocessing and one core
            _, prep = labels_and_preprocessing(probe, self.target)
            split = plan_split(sample[:CALIBRATION_FILES], prep, probe, batch=options.batch,
                               cores=cores, fast=options.fast_decode,
                               device=choice.backend.device)
        workers = options.workers if options.workers is not None else split.workers
        threads = options.threads if options.threads is not None else split.threads
        split = Split(cores, workers, threads, split.decode_ms, split.infer_ms, split.how)
        return make(threads), split

    def stream(self, inputs: Iterable[Path | str], skip: set[str] | None = None) -> Iterator[Prediction]:
        k = min(self.options.top_k, len(self.class_names))
        files = ((path, problem) for path, problem in walk([Path(p) for p in inputs])
                 if not skip or str(path) not in skip)
        for item in self.engine.run(files):
            if item.error is not None:
                yield Prediction(item.file, error=item.error)
            else:
                yield Prediction(item.file, top_k(softmax(item.logits), self.class_names, k))

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sample_files(inputs: Iterable[Path | str], count: int = CALIBRATION_FILES) -> list[Path]:
    """The first few image files, to measure the core split on."""
    found = []
    for path, problem in walk([Path(p) for p in inputs]):
        if problem is None:
            found.append(path)
            if len(found) >= count:
                break
    return found


def predict(target: Path, inputs: list[Path], options: PredictOptions = PredictOptions(), *,
            server: str | None = None, log: Callable[[str], None] = lambda _: None) -> list[Prediction]:
    """Every prediction, in input order, as a list (for a handful of files; a folder of any
    size streams with ``Predictor.stream`` or ``write_predictions``)."""
    with Predictor(target, options, server=server, log=log, sample=sample_files(inputs)) as predictor:
        results = list(predictor.stream(inputs))
    if not results:
        raise InputError("no images given; pass image files or folders")
    return results


# ----------------------------------------------------------------------------- output files
CSV_FIELDS = ("file", "label", "probability", "index", "top", "error")


def as_record(prediction: Prediction) -> dict[str, Any]:
    return {k: v for k, v in asdict(prediction).items() if v is not None and (k != "top" or v)}


def csv_row(prediction: Prediction) -> dict[str, Any]:
    if prediction.error is not None:
        return {"file": prediction.file, "error": prediction.error}
    best = prediction.top[0]
    return {"file": prediction.file, "label": best.label,
            "probability": f"{best.probability:.6f}", "index": best.index,
            "top": "|".join(f"{t.label}:{t.probability:.6f}" for t in prediction.top)}


class OutputFile:
    """Predictions appended to a .jsonl or .csv file as they come, each line flushed whole,
    so an interrupted run leaves a valid file and ``--resume`` can continue it."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path, self.format = path, output_format(str(path))
        self.done: set[str] = set()
        if resume and path.is_file():
            self.done = self._read_done()
        elif path.exists() and not resume:
            raise InputError(f"--output {str(path)!r} exists; add --resume to continue it, or "
                             f"remove it")
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.is_file() or path.stat().st_size == 0
        self.handle: TextIO = open(path, "a", encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.handle, CSV_FIELDS) if self.format == "csv" else None
        if self.writer is not None and fresh:
            self.writer.writeheader()
            self.handle.flush()
        self.written = 0

    def _read_done(self) -> set[str]:
        """Files already in the output; a last line cut off by a crash is dropped."""
        raw = self.path.read_bytes()
        complete = raw[:raw.rfind(b"\n") + 1] if not raw.endswith(b"\n") else raw
        if len(complete) != len(raw):
            self.path.write_bytes(complete)  # drop the half-written last line
        text = complete.decode("utf-8")
        if self.format == "csv":
            return {row["file"] for row in csv.DictReader(io.StringIO(text)) if row.get("file")}
        done = set()
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                done.add(json.loads(line)["file"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"--resume: line {number} of {str(self.path)!r} is not a "
                                 f"prediction written by predict; give another --output") from None
        return done

    def write(self, prediction: Prediction) -> None:
        if self.writer is not None:
            self.writer.writerow(csv_row(prediction))
        else:
            self.handle.write(json.dumps(as_record(prediction)) + "\n")
        self.written += 1

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# ----------------------------------------------------------------------------- streaming to a sink
@dataclass
class StreamSummary:
    """What one streaming run did: ``predict`` prints it on stderr, the API returns it."""

    classified: int = 0
    errors: int = 0
    resumed: int = 0  # files skipped because the output already had them
    seconds: float = 0.0
    split: str = ""
    choice: str | None = None
    output: str | None = None
    interrupted: bool = False

    @property
    def images_per_s(self) -> float | None:
        return self.classified / self.seconds if self.seconds > 0 else None

    def deliver(self, prediction: Prediction, out: "OutputFile | None",
                emit: Callable[[Prediction], None] | None) -> None:
        """Write one prediction (a whole, flushed line), hand it to ``emit``, count it."""
        if out is not None:
            out.write(prediction)
            out.flush()
        if emit is not None:
            emit(prediction)
        if prediction.error is None:
            self.classified += 1
        else:
            self.errors += 1

    @property
    def summary(self) -> str:
        rate = f", {self.images_per_s:.1f} img/s" if self.images_per_s else ""
        where = f" to {self.output}" if self.output else ""
        resumed = f", {self.resumed} already done" if self.resumed else ""
        return (f"{'interrupted after ' if self.interrupted else ''}{self.classified} classified, "
                f"{self.errors} error(s){resumed} in {self.seconds:.1f}s{rate}{where}")


def write_predictions(target: Path | str, inputs: list[Path | str],
                      options: PredictOptions = PredictOptions(), *, server: str | None = None,
                      emit: Callable[[Prediction], None] | None = None,
                      log: Callable[[str], None] = lambda _: None,
                      progress: bool | None = None) -> StreamSummary:
    """Stream predictions to ``options.output`` (JSONL or CSV, appended and flushed as they
    come) and/or to ``emit``, in input order, with a progress bar on stderr. Memory stays
    bounded whatever the number of files. Ctrl-C raises KeyboardInterrupt after the output
    file is closed with whole lines only; ``--resume`` continues it."""
    import sys
    import time

    from tqdm import tqdm

    options.check()
    if options.output and Path(options.output).exists() and not options.resume:
        raise InputError(f"--output {options.output!r} exists; add --resume to continue it, or "
                         f"remove it")
    out: OutputFile | None = None
    summary = StreamSummary(output=options.output)
    start = time.perf_counter()
    try:
        with Predictor(target, options, server=server, log=log,
                       sample=sample_files(inputs)) as predictor:
            # Opened once the model is ready: a run that cannot start leaves no file behind.
            out = OutputFile(Path(options.output), resume=options.resume) if options.output else None
            summary.resumed = len(out.done) if out else 0
            summary.split = predictor.split.describe()
            summary.choice = predictor.choice.target if predictor.choice else None
            start = time.perf_counter()
            with tqdm(desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True,
                      disable=not progress if progress is not None else None) as bar:
                for prediction in predictor.stream(inputs, out.done if out else None):
                    summary.deliver(prediction, out, emit)
                    bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        if out is not None:
            out.close()
        if summary.split:  # the model loaded (and only then was the output opened)
            log(summary.summary)
    if not (summary.classified or summary.errors or summary.resumed):
        raise InputError("no images given; pass image files or folders")
    return summary
