"""Is every exported model still the model that was trained? The CI gate.

Two kinds of check, one report (truthy only when all of them pass; the CLI maps a falsy report
to exit 1, or 3 when only the environment is at fault):

- **fp32 parity** for TorchScript, raw and simplified ONNX on ONNX Runtime (and CUDA when it
  really runs), and OpenVINO at f32. The reference is eager PyTorch in float64; the tolerance is
  the model's own fp32 noise floor on the same input (see ``pipeline.options``).
  ``--atol/--rtol`` switch to numpy's ``allclose`` against eager fp32.
- **An accuracy gate** for reduced precision (int8, fp16, bf16, OpenVINO's own choice): top-1
  agreement with eager fp32, and with labelled images the top-1 accuracy drop in points, on
  evaluation images held apart from the calibration images.

CPU parity pairs can never be skipped: a CPU ONNX comparison that cannot run is a failed pair.
Only GPU pairs, and optional extras that are not installed, are skipped with a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.bundle import (
    CALIBRATION,
    ONNX,
    ONNX_SIMPLIFIED,
    PARITY,
    PRECISION_FILES,
    WEIGHTS,
    Bundle,
    sha256_of,
)
from pipeline.core.confidence import CONFIDENCE, FAIL, INCONCLUSIVE, PASS, Counts, judge
from pipeline.core.machine import cpu_summary
from pipeline.core.records import (
    CalibrationRecord,
    EvaluationSet,
    GateResult,
    GateRule,
    Localization,
    ModelSection,
    PairResult,
    ParityReport,
    ParityRule,
    TrainSection,
)
from pipeline.data.datasets import (
    SYNTHETIC_GATE_IMAGES,
    labelled_folder,
    preprocess_samples,
    recorded_data_missing,
    recorded_split,
    synthetic_held_apart,
)
from pipeline.data.images import find_images
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.models.archs import Preprocessing
from pipeline.models.weights import load_model
from pipeline.options import (
    FLOOR_MULTIPLE,
    SCALE_TERM,
    VerifyOptions,
)
from pipeline.runtimes.base import Runner
from pipeline.runtimes.registry import (
    BACKENDS,
    ONNX_FILES,
    REDUCED_PRECISIONS,
    Backend,
    VariantMissing,
    int8_layer_backend,
    parity_backends,
    target_name,
)
from pipeline.stages.localize import MAX_ROWS, Reference, first_divergence, int8_shares

RANDOM_BATCHES = (1, 3)
MAX_EVAL_IMAGES = 2000


NOT_MEANINGFUL_RANDOM = "not meaningful: random weights"
GATE_VERDICT_RULE = ("gates of the variant files (int8, fp16) and of --precisions decide the exit "
                     "code; other runtime-only precisions (bf16, auto) are advisory; none on "
                     "random weights")
GATE_STATISTICS = ("pass when the worst end of each bound is within its limit, fail when the "
                   "best end of one is outside it, else inconclusive; disagreement: one-sided "
                   "Clopper-Pearson bounds; top-1 drop: one-sided Newcombe (paired) bounds")


# ----------------------------------------------------------------------------- comparisons
def topk_agreement(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Share of rows whose top-1 (argmax, as accuracy counts it: int8 logits can tie) and
    whose top-5 set are the same."""
    k = min(5, reference.shape[1])
    top_c = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    top_r = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    top5 = float(np.mean([set(a) == set(b) for a, b in zip(top_c, top_r)]))
    return float(np.mean(candidate.argmax(1) == reference.argmax(1))), top5


@dataclass(frozen=True)
class Comparison:
    """One candidate's outputs against the reference: the largest errors, top-k agreement and
    the verdict; under the floor rule also the error against float64, the floor, the tolerance
    it earns and the margin. These are PairResult's figures, so a pair is built from one."""

    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    top1: float | None = None
    top5: float | None = None
    max_abs_vs_fp64: float | None = None
    fp32_floor: float | None = None
    tolerance: float | None = None
    margin: float | None = None
    error: str | None = None
    finite: bool | None = None
    allclose_hull: list[list[float]] | None = None  # see ``allclose_hull``

    @classmethod
    def failed(cls, error: str) -> "Comparison":
        return cls(passed=False, error=error)


def allclose_hull(reference: np.ndarray, diff: np.ndarray) -> list[list[float]]:
    """What ``verify --recheck`` needs to apply any ``--atol A --rtol R`` later without the
    outputs: the pair passes numpy's rule, every |diff| <= A + R x |reference|, exactly when
    A >= max over the points (|reference|, |diff|) of |diff| - R x |reference|. For R >= 0 that
    maximum is reached on the upper convex hull of the points, between the smallest
    |reference| and the largest |diff|: those few vertices are kept, [[|reference|, |diff|], ...]."""
    r, d = np.abs(reference).ravel(), np.abs(diff).ravel()
    order = np.lexsort((-d, r))  # by |reference|, the largest |diff| first among equals
    peak = float(d.max())
    hull: list[tuple[float, float]] = []
    for x, y in zip(r[order].tolist(), d[order].tolist()):
        if hull and x == hull[-1][0]:
            continue  # same |reference|: the first (largest |diff|) dominates
        while len(hull) >= 2 and _turns_left_or_straight(hull[-2], hull[-1], (x, y)):
            hull.pop()
        hull.append((x, y))
        if y == peak:
            break  # right of the largest |diff|, no point can be a maximum for R >= 0
    return [[x, y] for x, y in hull]


def _turns_left_or_straight(a: tuple[float, float], b: tuple[float, float],
                            c: tuple[float, float]) -> bool:
    """Is b on or below the segment a-c (so not an upper hull vertex)?"""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) >= 0


def allclose_from_hull(hull: list[list[float]], atol: float, rtol: float) -> tuple[bool, float]:
    """numpy's allclose verdict from ``allclose_hull``'s points: (passed, the atol needed)."""
    needed = max(d - rtol * r for r, d in hull)
    return needed <= atol, needed


def compare(candidate: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float) -> Comparison:
    """numpy's allclose rule against ``reference``, with largest errors and top-k agreement."""
    candidate = candidate.astype(np.float64)
    reference = reference.astype(np.float64)
    if candidate.shape != reference.shape:
        return Comparison.failed(f"shape {candidate.shape} != reference {reference.shape}")
    diff = np.abs(candidate - reference)
    # Relative error over |reference| floored at atol, so near-zero logits do not divide by zero.
    rel = diff / np.maximum(np.abs(reference), max(atol, 1e-12))
    top1, top5 = topk_agreement(candidate, reference)
    finite = bool(np.isfinite(candidate).all())
    return Comparison(max_abs=float(diff.max()), max_rel=float(rel.max()), top1=top1, top5=top5,
                      passed=finite and bool(np.all(diff <= atol + rtol * np.abs(reference))),
                      finite=finite, allclose_hull=allclose_hull(reference, diff) if finite else None)


def floor_tolerance(fp32: np.ndarray, fp64: np.ndarray) -> tuple[float, float]:
    """(the model's fp32 noise floor on this input, the tolerance it earns)."""
    floor = float(np.abs(fp32.astype(np.float64) - fp64).max())
    return floor, FLOOR_MULTIPLE * floor + SCALE_TERM * float(np.abs(fp64).max())


def compare_to_floor(candidate: np.ndarray, fp32: np.ndarray, fp64: np.ndarray) -> Comparison:
    """The floor rule: ``|candidate - fp64| <= FLOOR_MULTIPLE * floor + SCALE_TERM * max|fp64|``."""
    outcome = compare(candidate, fp32, atol=0.0, rtol=0.0)
    if outcome.error is not None:
        return outcome
    floor, tolerance = floor_tolerance(fp32, fp64)
    error = float(np.abs(candidate.astype(np.float64) - fp64).max())
    finite = bool(np.isfinite(candidate).all())
    return replace(outcome, max_abs_vs_fp64=error, fp32_floor=floor, tolerance=tolerance,
                   margin=tolerance / error if error > 0 else float("inf"),
                   passed=finite and error <= tolerance)


def cosine_rows(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a, b = candidate.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


# ----------------------------------------------------------------------------- inputs
def random_inputs(size: int) -> dict[str, np.ndarray]:
    """Fixed-seed batches; more than one sample proves the dynamic batch axis."""
    inputs = {}
    for seed, batch in enumerate(RANDOM_BATCHES):
        rng = np.random.default_rng(seed)
        inputs[f"random-b{batch}"] = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    return inputs


@dataclass
class Evaluation:
    """Images for the accuracy gate (and an extra parity input), with labels when known."""

    batch: np.ndarray
    labels: np.ndarray | None
    source: str
    files_sha256: list[str] | None = None

    def describe(self, held_apart: str) -> EvaluationSet:
        return EvaluationSet(source=self.source, images=int(len(self.batch)),
                             labelled=self.labels is not None,
                             held_apart_from_calibration=held_apart)


NO_EVALUATION = ("no evaluation images: give --images DIR (class folders named after the "
                 "model's classes add accuracy)")


def evaluation_images(bundle: Bundle, manifest: dict[str, Any], images: Path | None) -> tuple[Evaluation | None, str]:
    """``--images`` (labelled when its sub-folders are the model's classes), else the recorded
    validation split of a bundle that ``train`` made (when its data is here); else (None, why)."""
    model = ModelSection.of(manifest, str(bundle.manifest_path))
    prep, names = Preprocessing.from_dict(model.preprocessing), model.class_names
    if images is not None:
        labelled = labelled_folder(images, names)
        samples = labelled if labelled else [(p, -1) for p in find_images([images])]
        if not samples:
            find_images([images])  # raises the "holds no image files" error
        batch, labels, bad = preprocess_samples(samples, prep)
        if bad:
            raise InputError(f"--images {str(images)!r}: {len(bad)} file(s) are not usable "
                             f"images, first: {bad[0]}")
        return Evaluation(batch, labels if labelled else None,
                          f"{images} ({'class folders: labelled' if labelled else 'unlabelled'})",
                          [sha256_of(Path(p)) for p, _ in samples]), ""
    missing = recorded_data_missing(manifest)
    if missing:
        return None, f"{NO_EVALUATION}; {missing}"
    samples, _, source = recorded_split(manifest, "val")
    train = TrainSection.of(manifest)
    if train is not None and train.synthetic and len(samples) < SYNTHETIC_GATE_IMAGES:
        extra, what = synthetic_held_apart(manifest, SYNTHETIC_GATE_IMAGES - len(samples))
        samples, source = samples + extra, f"{source}, and {what}"
    if len(samples) > MAX_EVAL_IMAGES:
        order = np.random.default_rng(0).permutation(len(samples))[:MAX_EVAL_IMAGES]
        samples = [samples[i] for i in sorted(order)]
        source += f", a seeded {MAX_EVAL_IMAGES}-image subset"
    batch, labels, _ = preprocess_samples(samples, prep)
    files = [sha256_of(Path(p)) for p, _ in samples if isinstance(p, (str, Path))]
    return Evaluation(batch, labels, source, files or None), ""


def held_apart(bundle: Bundle, evaluation: Evaluation) -> str:
    """Refuse evaluation images that calibrated the int8 model; say how they are kept apart."""
    path = bundle.path(CALIBRATION)
    if not path.is_file():
        return "no calibration record (no int8 model)"
    record = CalibrationRecord.load(path)
    shared = set(record.files_sha256 or []) & set(evaluation.files_sha256 or [])
    if shared:
        raise InputError(f"{len(shared)} evaluation image(s) were also calibration images "
                         f"({record.source}); the accuracy gate needs images held apart: give "
                         f"--images a folder not used for --calibration")
    repaired_on = set(record.repair_files_sha256 or []) & set(evaluation.files_sha256 or [])
    if repaired_on:
        raise InputError(f"{len(repaired_on)} evaluation image(s) were also the images quantize "
                         f"--repair chose its repair on ({record.repair_source}); the accuracy "
                         f"gate needs images held apart from them too: give --images a folder "
                         f"used for neither --calibration nor --repair-images")
    repaired = len(record.repair_files_sha256 or [])
    if record.split == "train" and "validation split" in evaluation.source:
        return ("yes: calibration used the training split, evaluation the validation split"
                + (f"; none is among the {repaired} repair images (sha256)" if repaired else ""))
    return (f"yes: no evaluation image is among the {record.count} calibration images"
            + (f" and the {repaired} repair images" if repaired else "") + " (sha256)")


# ----------------------------------------------------------------------------- candidates
Candidates = dict[str, tuple["Backend", Callable[[], Runner]]]


def parity_candidates(bundle: Bundle, *, with_cuda: bool) -> tuple[Candidates, dict[str, str]]:
    """fp32 exports to compare with the floor rule, and why any were skipped. Every runner
    comes from the registry; a key names the file and the backend (``onnx-sim-ort-cpu``)."""
    factories: Candidates = {}
    skipped: dict[str, str] = {}

    def offer(key: str, backend: Backend, make: Callable[[], Runner]) -> None:
        # Only GPU backends and uninstalled extras have a problem here: a CPU ONNX Runtime
        # session that cannot be made is a failed pair, never a skip (see _pair_rows).
        problem = backend.availability_problem(with_cuda=with_cuda)
        if problem:
            skipped[key] = problem
        else:
            factories[key] = (backend, make)

    onnx_files = {"onnx": ONNX}
    if bundle.path(ONNX_SIMPLIFIED).is_file():
        onnx_files["onnx-sim"] = ONNX_SIMPLIFIED
    label_of = {name: label for label, name in onnx_files.items()}
    for backend in parity_backends(with_cuda=with_cuda):
        if backend.parity == ONNX_FILES:
            for label, name in onnx_files.items():
                offer(f"{label}-{backend.name}", backend,
                      lambda b=backend, n=name: b.make_file(bundle.path(n)))
            continue
        try:  # MODEL_FILE: the one file it reads, where the bundle has one (.pt2, AOTInductor)
            path = backend.model_file(bundle, "fp32")
        except VariantMissing:
            continue
        key = f"{label_of[path.name]}-{backend.name}" if backend.reads_onnx else backend.name
        offer(key, backend, lambda b=backend: b.make(bundle))
    return factories, skipped


def gate_candidates(bundle: Bundle, *, with_cuda: bool,
                    named: tuple[str, ...] = ()) -> tuple[list[tuple[Backend, str]], dict[str, str]]:
    """Every (backend, reduced precision) the registry knows that this bundle has a model for.
    A precision the user named is gated even where this CPU would only emulate it, so that its
    verdict does not depend on the CPU the job lands on."""
    chosen: list[tuple[Backend, str]] = []
    skipped: dict[str, str] = {}
    for backend in BACKENDS.values():
        if backend.gate_as:
            continue
        for precision in backend.precisions:
            if precision not in REDUCED_PRECISIONS:
                continue
            try:
                backend.model_file(bundle, precision)
            except VariantMissing:
                continue  # no such variant: nothing to gate
            key = target_name(backend.name, precision)
            # A precision this CPU would only emulate is neither timed nor gated here, unless
            # the user named it.
            reason = (backend.availability_problem(with_cuda=with_cuda)
                      or (None if precision in named
                          else backend.precision_problem(precision, timed=False)))
            if reason:
                skipped[key] = reason
            else:
                chosen.append((backend, precision))
    return chosen, skipped


def _check_named(bundle: Bundle, named: tuple[str, ...], gates: list[tuple[Backend, str]],
                 skipped: dict[str, str], evaluation: "Evaluation | None", no_evaluation: str) -> None:
    """A precision named with --precisions must be gated here: say why it cannot be."""
    for precision in named:
        if any(p == precision for _, p in gates):
            continue
        reasons = [f"{key}: {why}" for key, why in skipped.items() if key.endswith(f":{precision}")]
        if reasons:
            raise EnvironmentUnavailable(f"--precisions {precision}: no runtime here can gate it "
                                         f"({'; '.join(reasons)})")
        made_by = PRECISION_FILES.get(precision)
        fix = (f"run: python -m pipeline quantize {bundle.root} --precision {precision}"
               if made_by else "install the runtime that runs it")
        raise InputError(f"--precisions {precision}: {bundle.root} has nothing to gate at "
                         f"{precision}{f' (no {made_by})' if made_by else ''}; {fix}")
    if named and gates and evaluation is None:
        raise InputError(f"--precisions {','.join(named)} needs evaluation images for its gate; "
                         f"{no_evaluation}")


# ----------------------------------------------------------------------------- running
def _model_identity(runner: Runner, known: dict[str, str]) -> dict[str, str | None]:
    """The file a runner read and its sha256 (the manifest's, once integrity has matched it)."""
    path = runner.model_path
    if path is None:
        return {"model_file": None, "model_sha256": None}
    return {"model_file": path.name, "model_sha256": known.get(path.name) or sha256_of(path)}


def _pair_rows(key: str, backend: Backend, make: Callable[[], Runner], inputs: dict[str, np.ndarray],
               fp32: dict[str, np.ndarray], fp64: dict[str, np.ndarray],
               tolerances: tuple[float, float] | None, known: dict[str, str]) -> list[PairResult]:
    """One candidate on every input; any failure to create or run it is a failed row."""
    try:
        runner = make()
    except InputError:
        raise  # the file is not a model at all (exit 2), though its hash matches
    except EnvironmentUnavailable as exc:
        return [PairResult(key, label, len(batch), error=str(exc), environment=True,
                           backend=backend.name) for label, batch in inputs.items()]
    except Exception as exc:  # a runner that cannot be created is a failed pair, never a skip
        return [PairResult(key, label, len(batch), error=f"{type(exc).__name__}: {str(exc)[:300]}",
                           backend=backend.name) for label, batch in inputs.items()]
    results = []
    with runner:
        model = _model_identity(runner, known)
        for label, batch in inputs.items():
            try:
                out = runner.infer(batch)
                outcome = (compare(out, fp32[label], atol=tolerances[0], rtol=tolerances[1])
                           if tolerances else compare_to_floor(out, fp32[label], fp64[label]))
            except Exception as exc:  # a runtime error in one backend is a failed row, not a crash
                outcome = Comparison.failed(f"{type(exc).__name__}: {str(exc)[:300]}")
            results.append(PairResult(key, label, len(batch), provider=runner.provider,
                                      backend=backend.name, **model, **asdict(outcome)))
    return results


def _gate(backend: Backend, precision: str, bundle: Bundle, evaluation: Evaluation,
          reference: np.ndarray, max_drop: float, min_agreement: float,
          known: dict[str, str], not_meaningful: str | None = None,
          named: tuple[str, ...] = (), accept_inconclusive: bool = False) -> GateResult:
    gate = GateResult(target_name(backend.name, precision), backend.name, precision,
                      images=len(evaluation.batch),
                      decides_exit=precision in PRECISION_FILES or precision in named,
                      not_meaningful=not_meaningful)
    try:
        with backend.make(bundle, precision) as runner:
            logits = np.concatenate([runner.infer(evaluation.batch[i:i + 64])
                                     for i in range(0, len(evaluation.batch), 64)])
            gate.precision, gate.provider = runner.precision, runner.provider
            identity = _model_identity(runner, known)
    except Exception as exc:  # a candidate that cannot run fails its gate, with the reason
        gate.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        gate.failed_on = None if gate.not_meaningful else "error"
        return gate
    gate.model_file, gate.model_sha256 = identity["model_file"], identity["model_sha256"]
    gate.top1_agreement, gate.top5_agreement = topk_agreement(logits, reference)
    cosines = cosine_rows(logits, reference)
    gate.cosine_mean, gate.cosine_min = float(cosines.mean()), float(cosines.min())
    gate.max_abs = float(np.abs(logits.astype(np.float64) - reference).max())
    counts = _gate_counts(gate, logits, reference, evaluation.labels)
    if not np.isfinite(logits).all():
        gate.failed_on = NON_FINITE
    judge_gate(gate, counts, max_drop=max_drop, min_agreement=min_agreement,
               accept_inconclusive=accept_inconclusive)
    return gate


NON_FINITE = "non-finite logits"


def judge_gate(gate: GateResult, counts: Counts, *, max_drop: float, min_agreement: float,
               accept_inconclusive: bool) -> None:
    """The gate's verdict, bounds and pass from its counts and the limits: what verify does
    after running a candidate, and what ``--recheck`` does again with new limits."""
    judgement = judge(counts, min_agreement=min_agreement, max_drop_points=max_drop)
    gate.verdict, gate.confidence = judgement.verdict, CONFIDENCE
    gate.disagreement_bounds = [*judgement.disagreement]
    gate.drop_bounds_points = [*judgement.drop_points] if judgement.drop_points else None
    gate.images_needed = judgement.images_needed
    non_finite = gate.failed_on == NON_FINITE
    gate.passed, gate.failed_on, gate.accepted_inconclusive = False, None, None
    if non_finite:
        gate.verdict, gate.failed_on = FAIL, NON_FINITE
    if gate.not_meaningful:
        return  # figures shown, no verdict: passed stays False, so never recommended
    gate.passed = gate.verdict == PASS
    if not gate.passed:
        gate.failed_on = gate.failed_on or judgement.why
    if gate.verdict == INCONCLUSIVE and accept_inconclusive:
        gate.accepted_inconclusive = True


def _gate_counts(gate: GateResult, logits: np.ndarray, reference: np.ndarray,
                 labels: np.ndarray | None) -> Counts:
    """The counts the gate judges (kept in parity.json), and the accuracies they give."""
    ours, theirs = logits.argmax(1), reference.argmax(1)
    gate.disagreements = int((ours != theirs).sum())
    if labels is None:
        return Counts(len(ours), gate.disagreements)
    fp32_right, ours_right = theirs == labels, ours == labels
    gate.both_right = int((fp32_right & ours_right).sum())
    gate.fp32_only_right = int((fp32_right & ~ours_right).sum())
    gate.candidate_only_right = int((~fp32_right & ours_right).sum())
    gate.both_wrong = int((~fp32_right & ~ours_right).sum())
    gate.fp32_top1 = float(fp32_right.mean())
    gate.candidate_top1 = float(ours_right.mean())
    gate.top1_drop_points = 100.0 * (gate.fp32_top1 - gate.candidate_top1)
    return Counts(len(ours), gate.disagreements, gate.both_right, gate.fp32_only_right,
                  gate.candidate_only_right, gate.both_wrong)


def parity_rule(tolerances: tuple[float, float] | None) -> ParityRule:
    """parity.json's ``rule``: numpy's allclose against eager fp32, or the floor rule."""
    if tolerances:
        return ParityRule(kind=ParityRule.ALLCLOSE, atol=tolerances[0], rtol=tolerances[1],
                          formula="|candidate - fp32| <= atol + rtol * |fp32|")
    return ParityRule(kind=ParityRule.FLOOR, floor_multiple=FLOOR_MULTIPLE, scale_term=SCALE_TERM,
                      formula="|candidate - fp64| <= floor_multiple * max|fp32 - fp64| + "
                              "scale_term * max|fp64|")


def gate_rule(max_top1_drop: float, min_agreement: float, accept_inconclusive: bool,
              named: tuple[str, ...] | None = None, rechecked_from: str | None = None) -> GateRule:
    """parity.json's ``gate_rule``: the limits every gate was judged against."""
    return GateRule(max_top1_drop_points=max_top1_drop, min_top1_agreement=min_agreement,
                    decides_exit=GATE_VERDICT_RULE, statistics=GATE_STATISTICS,
                    confidence=CONFIDENCE, accept_inconclusive=accept_inconclusive,
                    named=list(named) if named is not None else None,
                    rechecked_from=rechecked_from)


def recheck(source: Path, *, atol: float | None = None, rtol: float | None = None,
            max_top1_drop: float | None = None, min_agreement: float | None = None,
            accept_inconclusive: bool | None = None) -> ParityReport:
    """``verify --recheck``: the figures a parity.json stored, judged again against new limits
    without running anything (Polygraphy's ``check accuracy``). A limit left None keeps the
    file's. Raises InputError (exit 2) when a limit needs figures the file does not hold:
    --atol/--rtol need each pair's allclose points (stored since this version), the floor rule
    needs the pairs' floors (absent when the file was judged with --atol/--rtol), and a gate
    needs its counts. The file itself is never rewritten."""
    import copy

    original = ParityReport.load(source)
    report = copy.deepcopy(original)
    report._path = None
    old_rule = original.rule
    old_gates = original.gate_rule or GateRule(max_top1_drop_points=0.0, min_top1_agreement=0.0)
    if atol is None and rtol is None:
        tolerances = ((old_rule.atol or 0.0, old_rule.rtol or 0.0) if old_rule.allclose else None)
    else:
        given = old_rule if old_rule.allclose else ParityRule(kind=ParityRule.ALLCLOSE)
        tolerances = (atol if atol is not None else given.atol or 0.0,
                      rtol if rtol is not None else given.rtol or 0.0)
    VerifyOptions(atol=tolerances[0] if tolerances else None,
                  rtol=tolerances[1] if tolerances else None,
                  max_top1_drop=0.0 if max_top1_drop is None else max_top1_drop,
                  min_agreement=0.0 if min_agreement is None else min_agreement).check()
    report.rule = parity_rule(tolerances)
    for pair in report.pairs:
        _recheck_pair(pair, tolerances, source)
    drop = old_gates.max_top1_drop_points if max_top1_drop is None else max_top1_drop
    agreement = old_gates.min_top1_agreement if min_agreement is None else min_agreement
    accept = old_gates.accept_inconclusive if accept_inconclusive is None \
        else accept_inconclusive
    report.gate_rule = gate_rule(drop, agreement, accept,
                                 tuple(old_gates.named) if old_gates.named is not None else None,
                                 rechecked_from=str(source))
    for gate in report.gates:
        _recheck_gate(gate, source, max_drop=drop, min_agreement=agreement, accept=accept)
    report.passed = bool(report)
    return report


def _recheck_pair(pair: PairResult, tolerances: tuple[float, float] | None, source: Path) -> None:
    if pair.max_abs is None:
        return  # it never produced outputs: its error stands under any limit
    name = f"{pair.candidate} on {pair.inputs}"
    if tolerances:
        if pair.allclose_hull is None and pair.finite is not False:
            raise InputError(f"{source} does not store what --atol/--rtol need for {name} (each "
                             f"pair's allclose points, kept since this version); re-run "
                             f"python -m pipeline verify with --atol/--rtol, or on this version "
                             f"once, then --recheck")
        passed = bool(pair.finite is not False and pair.allclose_hull
                      and allclose_from_hull(pair.allclose_hull, *tolerances)[0])
        pair.passed, pair.tolerance, pair.fp32_floor, pair.margin = passed, None, None, None
        return
    if pair.tolerance is None or pair.max_abs_vs_fp64 is None:
        raise InputError(f"{source} was judged with --atol/--rtol, so {name} has no fp32 noise "
                         f"floor to judge the floor rule by; give --atol and --rtol, or re-run "
                         f"python -m pipeline verify")
    pair.passed = pair.finite is not False and pair.max_abs_vs_fp64 <= pair.tolerance


def _recheck_gate(gate: GateResult, source: Path, *, max_drop: float, min_agreement: float,
                  accept: bool) -> None:
    if gate.top1_agreement is None:
        return  # it could not run: its error stands
    if gate.disagreements is None:
        raise InputError(f"{source} does not store the counts gate {gate.candidate} needs "
                         f"(parity.json files before the confidence bounds); re-run python -m "
                         f"pipeline verify")
    labelled = gate.fp32_only_right is not None
    counts = Counts(gate.images, gate.disagreements,
                    *((gate.both_right, gate.fp32_only_right, gate.candidate_only_right,
                       gate.both_wrong) if labelled else ()))
    judge_gate(gate, counts, max_drop=max_drop, min_agreement=min_agreement,
               accept_inconclusive=accept)


def verify_bundle(path: Path | str, options: VerifyOptions = VerifyOptions(), *,
                  images: Path | None = None) -> ParityReport:
    """Check integrity, fp32 parity and the reduced-precision gate; write parity.json."""
    options.check()
    tolerances, with_cuda = options.tolerances, options.cuda
    max_top1_drop, min_agreement = options.max_top1_drop, options.min_agreement
    bundle = Bundle.open(path)
    manifest = bundle.read_manifest()
    artifacts = bundle.artifacts(manifest)
    exported = [name for name, entry in artifacts.items() if entry.stage in ("export", "quantize")]
    if ONNX not in exported:
        raise InputError(f"{bundle.root} has no exported models in its manifest; "
                         f"run: python -m pipeline export --out {bundle.root}")
    integrity = bundle.check_integrity(exported)
    known = {name: artifacts[name].sha256 for name in integrity}  # just matched on disk
    report = ParityReport(rule=parity_rule(tolerances), integrity_checked=integrity,
                          machine=cpu_summary(),
                          gate_rule=gate_rule(max_top1_drop, min_agreement,
                                              options.accept_inconclusive, options.precisions))
    model = load_model(checkpoint=bundle.path(WEIGHTS)).model.eval()
    section = ModelSection.of(manifest, str(bundle.manifest_path))
    inputs = random_inputs(section.input_size)
    evaluation, no_evaluation = evaluation_images(bundle, manifest, images)
    if evaluation is not None and len(evaluation.batch):
        inputs["images"] = evaluation.batch[:16]
    fp32, fp64 = _eager_references(model, inputs)

    factories, report.skipped = parity_candidates(bundle, with_cuda=with_cuda)
    for key, (backend, make) in factories.items():
        rows = _pair_rows(key, backend, make, inputs, fp32, fp64, tolerances, known)
        if backend.device == "cuda" and rows and all(r.environment for r in rows):
            report.skipped[key] = rows[0].error or "unavailable"  # only GPU pairs may be skipped
            continue
        report.pairs += rows

    named = options.precisions
    gates, skipped = gate_candidates(bundle, with_cuda=with_cuda, named=named)
    _check_named(bundle, named, gates, skipped, evaluation, no_evaluation)
    report.skipped.update(skipped)
    if gates and evaluation is None:
        report.not_verified = {target_name(b.name, p): no_evaluation for b, p in gates}
    elif gates and evaluation is not None:
        report.evaluation = evaluation.describe(held_apart(bundle, evaluation))
        reference = _eager_logits(model, evaluation.batch)
        report.gates = [_gate(b, p, bundle, evaluation, reference, max_top1_drop, min_agreement,
                              known, NOT_MEANINGFUL_RANDOM if section.random_weights else None,
                              named, options.accept_inconclusive)
                        for b, p in gates]
    report.localized = localize_candidates(bundle, report, factories, model, inputs,
                                           everything=options.localize)
    report.dump(bundle.path(PARITY))
    return report


# ----------------------------------------------------------------------------- localizing


def localize_candidates(bundle: Bundle, report: ParityReport, factories: Candidates, model: Any,
                        inputs: dict[str, np.ndarray], *, everything: bool) -> list[Localization]:
    """Layer-by-layer comparison of every failed fp32 pair and int8 gate (of every one, when
    asked): the first divergent layer, or int8's largest error shares."""
    failed = {p.candidate: p.inputs for p in report.pairs if not p.passed and not p.environment}
    chosen = [key for key, (backend, _) in factories.items()
              if backend.layers and (everything or key in failed)]
    int8_backend = int8_layer_backend()
    failed_int8 = any(g.precision_requested == "int8" and g.backend == int8_backend.name
                      and g.decides_exit and not g.passed and not g.not_meaningful
                      for g in report.gates)
    int8 = ([target_name(int8_backend.name, "int8")] if bundle.path(PRECISION_FILES["int8"]).is_file()
            and (everything or failed_int8) else [])
    if not chosen and not int8:
        return []
    import onnx

    raw = onnx.load(str(bundle.path(ONNX)))
    references: dict[str, tuple[Any, np.ndarray]] = {}

    def reference_for(label: str) -> tuple[Any, np.ndarray]:
        if label not in references:
            batch = inputs[label][:MAX_ROWS]
            references[label] = (Reference.capture(model, batch), batch)
        return references[label]

    default = "images" if "images" in inputs else max(inputs, key=lambda k: len(inputs[k]))
    results = []
    for key in chosen:
        label = failed.get(key, default)
        reference, batch = reference_for(label)
        results.append(_localized(key, label, len(batch), factories[key][1],
                                  lambda runner: first_divergence(key, runner, reference, batch,
                                                                  label, raw)))
    for candidate in int8:
        reference, batch = reference_for(default)
        results.append(_localized(candidate, default, len(batch),
                                  lambda: int8_backend.make(bundle, "int8"),
                                  lambda runner: int8_shares(candidate, runner, reference,
                                                             batch, default, raw)))
    return results


def _localized(candidate: str, label: str, rows: int, make: Callable[[], Runner],
               compare: Callable[[Runner], Localization]) -> Localization:
    """One candidate's localization; a runtime that cannot do it leaves a note, not a crash."""
    try:
        with make() as runner:
            return compare(runner)
    except Exception as exc:  # diagnostics must never turn a verdict into a traceback
        return Localization(candidate, None, label, rows, "eager PyTorch", layers_compared=0,
                            note=f"could not localize: {type(exc).__name__}: {str(exc)[:300]}")


def _eager_references(model: Any, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Eager fp32 and eager float64 logits for every input (float64 is the parity reference)."""
    import copy

    import torch

    fp32 = {label: _eager_logits(model, batch) for label, batch in inputs.items()}
    exact = copy.deepcopy(model).double()
    with torch.inference_mode():
        fp64 = {label: exact(torch.from_numpy(batch).double()).numpy() for label, batch in inputs.items()}
    del exact
    return fp32, fp64


def _eager_logits(model: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(batch[i:i + 64])).numpy()
                               for i in range(0, len(batch), 64)]) if len(batch) else \
            np.zeros((0, 0), np.float32)
