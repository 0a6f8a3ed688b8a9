"""``bench --baseline``: fail when a model got slower, and not when the machine was noisy.

Run to run, throughput on a shared 2-core machine moves by 5-20%, so one median against
another decides nothing. The gate therefore:

- compares like with like only: the same machine fingerprint (CPU model and flags, core
  count, threads, GPU) and the same backend, precision and batch; anything else is "not
  comparable", listed and never counted as passing;
- judges on the stability windows bench already takes (images/s of each run of 25 calls), with
  a one-sided Mann-Whitney U test (scipy): a row regresses only when its median is slower than
  the baseline's by more than ``max_slowdown`` and the windows show it, i.e. the test rejects
  "now is at least as fast as baseline / (1 + max_slowdown)" at ``ALPHA``;
- with ``--baseline-rerun`` measures the baseline model in the same run, alternating windows
  of the two models in one process, so both see the same machine state: the only comparison
  that holds on a noisy shared machine, and the one to use whenever the baseline file's
  fingerprint does not match.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.bundle import Bundle
from pipeline.core.records import (
    Hardware,
    LatencyDoc,
    LatencyRow,
    ModelSection,
    RegressionRow,
    RegressionSection,
)
from pipeline.errors import InputError
from pipeline.options import BenchOptions
from pipeline.stages.bench.protocol import PairedRates, WorkerSpec, worker_process

ALPHA = 0.05
TEST = (f"one-sided Mann-Whitney U on the images/s of windows of 25 calls (scipy): regressed "
        f"when the median is slower than allowed and p < {ALPHA:g} against the baseline's "
        f"windows scaled to the allowed slowdown")
RERUN_WINDOWS = 12  # windows of each model in a --baseline-rerun, alternating
# Fewer windows than this on either side and the test cannot show a slowdown in practice
# (3 against 4 windows reach p < 0.05 only when every window is apart): the row is called
# not comparable, with the fix, rather than silently passing.
MIN_WINDOWS = 6


def fingerprint(doc: LatencyDoc) -> tuple[Hardware, int]:
    """What must match for two latency files' numbers to be compared across runs: the
    hardware and the thread count."""
    return doc.machine.hardware, doc.config.threads


def judge(now: list[float], baseline: list[float], max_slowdown: float) -> tuple[float, float, bool]:
    """(slowdown of the medians, p-value, regressed) for two lists of window images/s."""
    from scipy.stats import mannwhitneyu

    slowdown = statistics.median(baseline) / statistics.median(now) - 1.0
    allowed = [rate / (1.0 + max_slowdown) for rate in baseline]
    p = float(mannwhitneyu(now, allowed, alternative="less").pvalue)
    return slowdown, p, slowdown > max_slowdown and p < ALPHA


@dataclass
class Gate:
    """A checked baseline, ready to judge a bench's rows: opened (and refused, exit 2) before
    anything is timed, so that a bad baseline costs no minutes."""

    bundle: Path
    max_slowdown: float
    baseline_path: Path | None  # an earlier latency.json
    baseline_doc: LatencyDoc | None
    rerun_model: Path | None  # a bundle or .onnx to re-measure, alternating windows
    notes: list[str]

    @property
    def rerun(self) -> bool:
        return self.rerun_model is not None

    @classmethod
    def open(cls, bundle: Bundle, baseline: str | Path | None, rerun: str | Path | None,
             max_slowdown: float, *, force: bool) -> "Gate":
        ours = ModelSection.read(bundle)
        doc = LatencyDoc.load(baseline) if baseline is not None else None
        theirs: tuple[str | None, int | None] | None = (
            (doc.model.arch, doc.model.input_size) if doc else None)
        model = Path(rerun) if rerun is not None else None
        if model is not None:
            if not model.exists():
                raise InputError(f"--baseline-rerun {str(model)!r} does not exist: give the "
                                 f"baseline's bundle folder or its .onnx file")
            if model.is_dir():
                section = ModelSection.read(Bundle.open(model))
                theirs = (section.arch, section.input_size)
            elif model.suffix != ".onnx":
                raise InputError(f"--baseline-rerun {str(model)!r} is neither a bundle folder nor "
                                 f"an .onnx file")
        notes = []
        if theirs is not None:
            where = str(model if model is not None else baseline)
            if theirs[0] is not None and theirs[0] != ours.arch:
                if not force:
                    raise InputError(f"the baseline {where!r} is {theirs[0]}, this bundle "
                                     f"{ours.arch}: not the same model. Pass --force to compare "
                                     f"them anyway")
                notes.append(f"compared across architectures (--force): {theirs[0]} -> {ours.arch}")
            if theirs[1] is not None and theirs[1] != ours.input_size:
                notes.append(f"input size changed: baseline {theirs[1]} px, now "
                             f"{ours.input_size} px (the cost of that change is what is compared)")
        return cls(bundle.root, max_slowdown, Path(baseline) if baseline else None, doc, model,
                   notes)

    def judge(self, doc: LatencyDoc, config: BenchOptions) -> RegressionSection:
        if self.rerun_model is not None:
            return rerun(self.bundle, self.rerun_model, doc, config, self.max_slowdown, self.notes)
        assert self.baseline_doc is not None and self.baseline_path is not None
        return compare_files(doc, self.baseline_doc, self.baseline_path, self.max_slowdown,
                             self.notes)


def compare_files(doc: LatencyDoc, baseline: LatencyDoc, path: Path, max_slowdown: float,
                  notes: list[str]) -> RegressionSection:
    """Each of ``doc``'s rows against the baseline file's row for the same target and batch."""
    section = RegressionSection(baseline=str(path), max_slowdown=max_slowdown, test=TEST,
                                alpha=ALPHA, rerun=False, notes=list(notes))
    same_machine = fingerprint(doc) == fingerprint(baseline)
    if not same_machine:
        section.notes.append("the baseline was measured on another machine fingerprint "
                             f"({baseline.machine.hardware.describe(baseline.config.threads)}; now "
                             f"{doc.machine.hardware.describe(doc.config.threads)}):"
                             " no row is comparable; use --baseline-rerun")
    theirs = {(r.target, r.batch): r for r in baseline.rows if r.ok}
    for row in doc.rows:
        if not row.ok:
            continue
        base = theirs.get((row.target, row.batch))
        reason = _not_comparable(row, base, same_machine)
        section.rows.append(_judged(row.target, row.batch, row.windows_per_s,
                                    base.windows_per_s if base else None, max_slowdown, reason))
    return section


def _not_comparable(row: LatencyRow, base: LatencyRow | None, same_machine: bool) -> str | None:
    """Why ``row`` cannot be judged against ``base`` (None: it can)."""
    if not same_machine:
        return "another machine fingerprint"
    if base is None:
        return "no baseline row for this target and batch"
    if not (_enough(row) and _enough(base)):
        return (f"fewer than {MIN_WINDOWS} windows of 25 calls in "
                f"{'the baseline' if not _enough(base) else 'this run'} "
                f"({len(base.windows_per_s or [])} and {len(row.windows_per_s or [])}): bench "
                f"both with a longer --seconds, or use --baseline-rerun")
    return None


def _enough(row: LatencyRow) -> bool:
    return len(row.windows_per_s or []) >= MIN_WINDOWS


def _judged(target: str, batch: int, now: list[float] | None, base: list[float] | None,
            max_slowdown: float, reason: str | None) -> RegressionRow:
    if reason is not None or not now or not base:
        return RegressionRow(target=target, batch=batch, status="not comparable",
                             reason=reason or "no windows")
    slowdown, p, regressed = judge(now, base, max_slowdown)
    return RegressionRow(target=target, batch=batch, status="regressed" if regressed else "ok",
                         baseline_per_s=statistics.median(base), now_per_s=statistics.median(now),
                         slowdown=slowdown, p_value=p, windows=[len(now), len(base)])


def rerun(bundle: Path, baseline_model: Path, doc: LatencyDoc, config: BenchOptions,
          max_slowdown: float, notes: list[str]) -> RegressionSection:
    """Each target and batch of ``doc`` measured again on both models in one worker process,
    alternating windows of 25 calls (``RERUN_WINDOWS`` of each), then judged."""
    section = RegressionSection(baseline=str(baseline_model),
                                max_slowdown=max_slowdown, test=TEST, alpha=ALPHA, rerun=True,
                                notes=list(notes))
    for row in doc.rows:
        if not row.ok:
            continue
        backend, precision = row.backend, row.requested
        outcome = paired_windows(bundle, baseline_model, backend, precision, row.batch, config)
        if outcome.error is not None:
            section.rows.append(RegressionRow(target=row.target, batch=row.batch,
                                              status="not comparable", reason=outcome.error))
            continue
        section.rows.append(_judged(row.target, row.batch, outcome.now, outcome.baseline,
                                    max_slowdown, None))
    return section


def paired_windows(bundle: Path, baseline_model: Path, backend: str, precision: str, batch: int,
                   config: BenchOptions, windows: int = RERUN_WINDOWS) -> PairedRates:
    """Run ``pipeline.stages.bench.worker`` in paired mode: images/s per window of each
    model, or why not."""
    spec = WorkerSpec(mode="paired", bundle=str(bundle), baseline=str(baseline_model),
                      backend=backend, precision=precision, batch=batch, windows=windows,
                      config=config)
    result, failure = worker_process(spec)
    if result is None:
        return PairedRates(error=failure)
    return PairedRates.from_dict(result, where="the paired bench worker's result")
