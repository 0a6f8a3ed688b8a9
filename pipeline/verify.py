"""Is every exported model still the model that was trained? The CI gate.

Two kinds of check, one report (truthy only when all of them pass; the CLI maps a falsy report
to exit 1, or 3 when only the environment is at fault):

- **fp32 parity** for TorchScript, raw and simplified ONNX on ONNX Runtime (and CUDA when it
  really runs), and OpenVINO at f32. The reference is eager PyTorch in float64; the tolerance is
  the model's own fp32 noise floor on the same input (see ``pipeline.tolerances``).
  ``--atol/--rtol`` switch to numpy's ``allclose`` against eager fp32.
- **An accuracy gate** for reduced precision (int8, fp16, bf16, OpenVINO's own choice): top-1
  agreement with eager fp32, and with labelled images the top-1 accuracy drop in points, on
  evaluation images held apart from the calibration images.

CPU parity pairs can never be skipped: a CPU ONNX comparison that cannot run is a failed pair.
Only GPU pairs, and optional extras that are not installed, are skipped with a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.backends import BACKENDS, REDUCED_PRECISIONS, Backend, VariantMissing, target_name
from pipeline.bundle import (CALIBRATION, ONNX, ONNX_SIMPLIFIED, PARITY, PRECISION_FILES,
                             TORCHSCRIPT, WEIGHTS, Bundle, sha256_of, write_json_atomic)
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.runners import (OpenVinoRunner, OrtRunner, Runner, TorchRunner, cuda_problem,
                              openvino_problem, ort_provider_problem)
from pipeline.tolerances import (DEFAULT_MAX_TOP1_DROP, DEFAULT_MIN_AGREEMENT, FLOOR_MULTIPLE,
                                 SCALE_TERM)

RANDOM_BATCHES = (1, 3)
MAX_EVAL_IMAGES = 2000


@dataclass
class PairResult:
    candidate: str
    inputs: str
    batch: int
    provider: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    max_abs: float | None = None  # against eager fp32
    max_rel: float | None = None
    max_abs_vs_fp64: float | None = None
    fp32_floor: float | None = None  # max |eager fp32 - eager fp64| on this input
    tolerance: float | None = None  # the effective absolute tolerance (floor rule)
    margin: float | None = None  # tolerance / error: > 1 passes
    top1: float | None = None
    top5: float | None = None
    passed: bool = False
    error: str | None = None
    environment: bool = False  # failed because the environment cannot run it
    reference: str = "torch-cpu"


@dataclass
class GateResult:
    """A reduced-precision candidate judged on predictions against eager fp32."""

    candidate: str  # backend:precision, as bench rows name it
    backend: str
    precision_requested: str
    precision: str | None = None  # what really ran (OpenVINO reads its choice back)
    provider: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    images: int = 0
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs: float | None = None
    fp32_top1: float | None = None
    candidate_top1: float | None = None
    top1_drop_points: float | None = None
    passed: bool = False
    failed_on: str | None = None
    error: str | None = None
    # Does this gate decide verify's exit code? Variant files (int8, fp16) and precisions the
    # user named do; runtime-only precisions (bf16 autocast, OpenVINO's auto) are advisory.
    decides_exit: bool = True
    # Why the gate's figures mean nothing (a random-weight model has no margins to keep).
    not_meaningful: str | None = None


NOT_MEANINGFUL_RANDOM = "not meaningful: random weights"
GATE_VERDICT_RULE = ("gates of the variant files (int8, fp16) decide the exit code; runtime-only "
                     "precisions (bf16, auto) are advisory; none on random weights")


@dataclass
class ParityReport:
    rule: dict[str, Any]
    pairs: list[PairResult] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    gate_rule: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    not_verified: dict[str, str] = field(default_factory=dict)
    integrity: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.has_cpu_onnx_pair and all(p.passed for p in self.pairs) \
            and all(g.passed for g in self.binding_gates)

    @property
    def binding_gates(self) -> list[GateResult]:
        """The gates that decide the exit code (see ``GateResult.decides_exit``)."""
        return [g for g in self.gates if g.decides_exit and not g.not_meaningful]

    @property
    def has_cpu_onnx_pair(self) -> bool:
        return any(p.candidate.endswith("ort-cpu") for p in self.pairs)

    @property
    def failures(self) -> list[PairResult | GateResult]:
        return [p for p in self.pairs if not p.passed] + [g for g in self.binding_gates if not g.passed]

    @property
    def advisories(self) -> list[GateResult]:
        """Gates that failed without deciding the exit code (kept out of recommendations)."""
        return [g for g in self.gates if not g.passed and not g.not_meaningful
                and not g.decides_exit]

    @property
    def environment_only(self) -> bool:
        """Every failure is an environment that cannot run a CPU pair (exit 3, not 1)."""
        failures = self.failures
        return bool(failures) and all(isinstance(f, PairResult) and f.environment for f in failures)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "rule": self.rule, "gate_rule": self.gate_rule,
                "reference": "eager PyTorch on the CPU: float64 for parity, fp32 for the gate",
                "integrity_checked": self.integrity, "skipped": self.skipped,
                "not_verified": self.not_verified, "evaluation": self.evaluation,
                "pairs": [asdict(p) for p in self.pairs], "gates": [asdict(g) for g in self.gates]}


# ----------------------------------------------------------------------------- comparisons
def topk_agreement(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Share of rows whose top-1 (argmax, as accuracy counts it: int8 logits can tie) and
    whose top-5 set are the same."""
    k = min(5, reference.shape[1])
    top_c = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    top_r = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    top5 = float(np.mean([set(a) == set(b) for a, b in zip(top_c, top_r)]))
    return float(np.mean(candidate.argmax(1) == reference.argmax(1))), top5


def compare(candidate: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float) -> dict[str, Any]:
    """numpy's allclose rule against ``reference``, with largest errors and top-k agreement."""
    candidate = candidate.astype(np.float64)
    reference = reference.astype(np.float64)
    if candidate.shape != reference.shape:
        return {"passed": False, "error": f"shape {candidate.shape} != reference {reference.shape}"}
    diff = np.abs(candidate - reference)
    # Relative error over |reference| floored at atol, so near-zero logits do not divide by zero.
    rel = diff / np.maximum(np.abs(reference), max(atol, 1e-12))
    top1, top5 = topk_agreement(candidate, reference)
    finite = bool(np.isfinite(candidate).all())
    return {"max_abs": float(diff.max()), "max_rel": float(rel.max()), "top1": top1, "top5": top5,
            "passed": finite and bool(np.all(diff <= atol + rtol * np.abs(reference)))}


def floor_tolerance(fp32: np.ndarray, fp64: np.ndarray) -> tuple[float, float]:
    """(the model's fp32 noise floor on this input, the tolerance it earns)."""
    floor = float(np.abs(fp32.astype(np.float64) - fp64).max())
    return floor, FLOOR_MULTIPLE * floor + SCALE_TERM * float(np.abs(fp64).max())


def compare_to_floor(candidate: np.ndarray, fp32: np.ndarray, fp64: np.ndarray) -> dict[str, Any]:
    """The floor rule: ``|candidate - fp64| <= FLOOR_MULTIPLE * floor + SCALE_TERM * max|fp64|``."""
    outcome = compare(candidate, fp32, atol=0.0, rtol=0.0)
    if "error" in outcome:
        return outcome
    floor, tolerance = floor_tolerance(fp32, fp64)
    error = float(np.abs(candidate.astype(np.float64) - fp64).max())
    finite = bool(np.isfinite(candidate).all())
    outcome.update(max_abs_vs_fp64=error, fp32_floor=floor, tolerance=tolerance,
                   margin=tolerance / error if error > 0 else float("inf"),
                   passed=finite and error <= tolerance)
    return outcome


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

    def describe(self, held_apart: str) -> dict[str, Any]:
        return {"source": self.source, "images": int(len(self.batch)),
                "labelled": self.labels is not None, "held_apart_from_calibration": held_apart}


NO_EVALUATION = ("no evaluation images: give --images DIR (class folders named after the "
                 "model's classes add accuracy)")


def evaluation_images(bundle: Bundle, manifest: dict[str, Any], images: Path | None) -> tuple[Evaluation | None, str]:
    """``--images`` (labelled when its sub-folders are the model's classes), else the recorded
    validation split of a bundle that ``train`` made (when its data is here); else (None, why)."""
    from pipeline.archs import Preprocessing
    from pipeline.data import (labelled_folder, preprocess_samples, recorded_data_missing,
                               recorded_split)
    from pipeline.images import find_images

    prep = Preprocessing.from_dict(manifest["model"]["preprocessing"])
    names = manifest["model"]["class_names"]
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
    if len(samples) > MAX_EVAL_IMAGES:
        order = np.random.default_rng(0).permutation(len(samples))[:MAX_EVAL_IMAGES]
        samples = [samples[i] for i in sorted(order)]
        source += f", a seeded {MAX_EVAL_IMAGES}-image subset"
    batch, labels, _ = preprocess_samples(samples, prep)
    files = [sha256_of(Path(p)) for p, _ in samples if isinstance(p, (str, Path))]
    return Evaluation(batch, labels, source, files or None), ""


def held_apart(bundle: Bundle, evaluation: Evaluation) -> str:
    """Refuse evaluation images that calibrated the int8 model; say how they are kept apart."""
    import json

    path = bundle.path(CALIBRATION)
    if not path.is_file():
        return "no calibration record (no int8 model)"
    record = json.loads(path.read_text(encoding="utf-8"))
    shared = set(record.get("files_sha256") or []) & set(evaluation.files_sha256 or [])
    if shared:
        raise InputError(f"{len(shared)} evaluation image(s) were also calibration images "
                         f"({record['source']}); the accuracy gate needs images held apart: give "
                         f"--images a folder not used for --calibration")
    if record.get("split") == "train" and "validation split" in evaluation.source:
        return "yes: calibration used the training split, evaluation the validation split"
    return f"yes: no evaluation image is among the {record['count']} calibration images (sha256)"


# ----------------------------------------------------------------------------- candidates
def parity_candidates(bundle: Bundle, *, with_cuda: bool) -> tuple[dict[str, Callable[[], Runner]], dict[str, str]]:
    """fp32 exports to compare with the floor rule, and why any were skipped."""
    factories: dict[str, Callable[[], Runner]] = {
        "torchscript-cpu": lambda: TorchRunner.from_torchscript(bundle.path(TORCHSCRIPT)),
    }
    onnx_files = {"onnx": ONNX}
    if bundle.path(ONNX_SIMPLIFIED).is_file():
        onnx_files["onnx-sim"] = ONNX_SIMPLIFIED
    skipped: dict[str, str] = {}
    for label, name in onnx_files.items():
        factories[f"{label}-ort-cpu"] = lambda n=name: OrtRunner(bundle.path(n), provider="cpu")
    fp32 = bundle.fp32_onnx()
    label = "onnx-sim" if fp32 == ONNX_SIMPLIFIED else "onnx"
    missing = openvino_problem()
    if missing:
        skipped[f"{label}-openvino-cpu"] = missing
    else:
        factories[f"{label}-openvino-cpu"] = lambda: OpenVinoRunner(bundle.path(fp32), precision="fp32")
    if with_cuda:
        problem = ort_provider_problem("cuda")
        for label, name in onnx_files.items():
            key = f"{label}-ort-cuda"
            if problem:
                skipped[key] = problem
            else:
                factories[key] = lambda n=name: OrtRunner(bundle.path(n), provider="cuda")
    # The PyTorch artifacts the bundle has: model.pt2, and AOTInductor packages per device.
    for backend in BACKENDS.values():
        if backend.runtime not in ("torch-export", "aoti") or (backend.device == "cuda" and not with_cuda):
            continue
        try:
            backend.model_file(bundle, "fp32")
        except VariantMissing:
            continue
        problem = _backend_problem(backend, with_cuda)
        if problem:
            skipped[backend.name] = problem
        else:
            factories[backend.name] = lambda b=backend: b.make(bundle)
    return factories, skipped


def gate_candidates(bundle: Bundle, *, with_cuda: bool) -> tuple[list[tuple[Backend, str]], dict[str, str]]:
    """Every (backend, reduced precision) the registry knows that this bundle has a model for."""
    chosen: list[tuple[Backend, str]] = []
    skipped: dict[str, str] = {}
    for backend in BACKENDS.values():
        if backend.gate_as:
            continue
        for precision in backend.precisions:
            if precision not in REDUCED_PRECISIONS:
                continue
            name = PRECISION_FILES.get(precision)
            if name and not bundle.path(name).is_file() and not (backend.provider == "tensorrt"
                                                                 and precision == "fp16"):
                continue  # no such variant: nothing to gate
            key = target_name(backend.name, precision)
            # A precision this CPU would only emulate is neither timed nor gated here.
            reason = (_backend_problem(backend, with_cuda)
                      or backend.precision_problem(precision, timed=False))
            if reason:
                skipped[key] = reason
            else:
                chosen.append((backend, precision))
    return chosen, skipped


def _backend_problem(backend: Backend, with_cuda: bool) -> str | None:
    if backend.runtime == "openvino":
        return openvino_problem()
    if backend.device == "cuda":
        if not with_cuda:
            return "--cpu-only"
        if backend.runtime == "ort":
            return ort_provider_problem(backend.provider or "cuda")
        return cuda_problem()
    return None


# ----------------------------------------------------------------------------- running
def _model_identity(runner: Runner, known: dict[str, str]) -> dict[str, str | None]:
    """The file a runner read and its sha256 (the manifest's, once integrity has matched it)."""
    path = runner.model_path
    if path is None:
        return {"model_file": None, "model_sha256": None}
    return {"model_file": path.name, "model_sha256": known.get(path.name) or sha256_of(path)}


def _pair_rows(key: str, make: Callable[[], Runner], inputs: dict[str, np.ndarray],
               fp32: dict[str, np.ndarray], fp64: dict[str, np.ndarray],
               tolerances: tuple[float, float] | None, known: dict[str, str]) -> list[PairResult]:
    """One candidate on every input; any failure to create or run it is a failed row."""
    try:
        runner = make()
    except InputError:
        raise  # the file is not a model at all (exit 2), though its hash matches
    except EnvironmentUnavailable as exc:
        return [PairResult(key, label, len(batch), error=str(exc), environment=True)
                for label, batch in inputs.items()]
    except Exception as exc:  # a runner that cannot be created is a failed pair, never a skip
        return [PairResult(key, label, len(batch), error=f"{type(exc).__name__}: {str(exc)[:300]}")
                for label, batch in inputs.items()]
    model = _model_identity(runner, known)
    results = []
    for label, batch in inputs.items():
        result = PairResult(key, label, len(batch), provider=runner.provider, **model)
        try:
            out = runner.infer(batch)
            outcome = (compare(out, fp32[label], atol=tolerances[0], rtol=tolerances[1])
                       if tolerances else compare_to_floor(out, fp32[label], fp64[label]))
        except Exception as exc:  # a runtime error in one backend is a failed row, not a crash
            outcome = {"passed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        for name, value in outcome.items():
            setattr(result, name, value)
        results.append(result)
    return results


def _gate(backend: Backend, precision: str, bundle: Bundle, evaluation: Evaluation,
          reference: np.ndarray, max_drop: float, min_agreement: float,
          known: dict[str, str], not_meaningful: str | None = None) -> GateResult:
    gate = GateResult(target_name(backend.name, precision), backend.name, precision,
                      images=len(evaluation.batch), decides_exit=precision in PRECISION_FILES,
                      not_meaningful=not_meaningful)
    try:
        runner = backend.make(bundle, precision)
        logits = np.concatenate([runner.infer(evaluation.batch[i:i + 64])
                                 for i in range(0, len(evaluation.batch), 64)])
    except Exception as exc:  # a candidate that cannot run fails its gate, with the reason
        gate.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        gate.failed_on = None if gate.not_meaningful else "error"
        return gate
    gate.precision, gate.provider = runner.precision, runner.provider
    identity = _model_identity(runner, known)
    gate.model_file, gate.model_sha256 = identity["model_file"], identity["model_sha256"]
    gate.top1_agreement, gate.top5_agreement = topk_agreement(logits, reference)
    cosines = cosine_rows(logits, reference)
    gate.cosine_mean, gate.cosine_min = float(cosines.mean()), float(cosines.min())
    gate.max_abs = float(np.abs(logits.astype(np.float64) - reference).max())
    failed = []
    if not np.isfinite(logits).all():
        failed.append("non-finite logits")
    if evaluation.labels is not None:
        gate.fp32_top1 = float(np.mean(reference.argmax(1) == evaluation.labels))
        gate.candidate_top1 = float(np.mean(logits.argmax(1) == evaluation.labels))
        gate.top1_drop_points = 100.0 * (gate.fp32_top1 - gate.candidate_top1)
        if gate.top1_drop_points > max_drop:
            failed.append(f"top-1 drop {gate.top1_drop_points:.2f} points > {max_drop:g}")
    if gate.top1_agreement < min_agreement:
        failed.append(f"top-1 agreement {100 * gate.top1_agreement:.2f}% < {100 * min_agreement:g}%")
    if gate.not_meaningful:
        return gate  # figures shown, no verdict: passed stays False, so never recommended
    gate.passed = not failed
    gate.failed_on = "; ".join(failed) or None
    return gate


def verify_bundle(path: Path | str, *, atol: float | None = None, rtol: float | None = None,
                  images: Path | None = None, with_cuda: bool = True,
                  max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
                  min_agreement: float = DEFAULT_MIN_AGREEMENT) -> ParityReport:
    """Check integrity, fp32 parity and the reduced-precision gate; write parity.json."""
    from pipeline.weights import load_model

    tolerances = _check_options(atol, rtol, max_top1_drop, min_agreement)
    bundle = Bundle.open(path)
    manifest = bundle.read_manifest()
    artifacts = manifest.get("artifacts", {})
    exported = [name for name, entry in artifacts.items() if entry.get("stage") in ("export", "quantize")]
    if ONNX not in exported:
        raise InputError(f"{bundle.root} has no exported models in its manifest; "
                         f"run: python -m pipeline export --out {bundle.root}")
    integrity = bundle.check_integrity(exported)
    known = {name: artifacts[name]["sha256"] for name in integrity}  # just matched on disk
    rule = ({"kind": "allclose vs eager fp32", "atol": tolerances[0], "rtol": tolerances[1],
             "formula": "|candidate - fp32| <= atol + rtol * |fp32|"} if tolerances else
            {"kind": "fp32 noise floor", "floor_multiple": FLOOR_MULTIPLE, "scale_term": SCALE_TERM,
             "formula": "|candidate - fp64| <= floor_multiple * max|fp32 - fp64| + "
                        "scale_term * max|fp64|"})
    report = ParityReport(rule=rule, integrity=integrity,
                          gate_rule={"max_top1_drop_points": max_top1_drop,
                                     "min_top1_agreement": min_agreement,
                                     "decides_exit": GATE_VERDICT_RULE})
    model = load_model(checkpoint=bundle.path(WEIGHTS)).model.eval()
    inputs = random_inputs(int(manifest["model"]["input_size"]))
    evaluation, no_evaluation = evaluation_images(bundle, manifest, images)
    if evaluation is not None and len(evaluation.batch):
        inputs["images"] = evaluation.batch[:16]
    fp32, fp64 = _eager_references(model, inputs)

    factories, report.skipped = parity_candidates(bundle, with_cuda=with_cuda)
    for key, make in factories.items():
        rows = _pair_rows(key, make, inputs, fp32, fp64, tolerances, known)
        if "cuda" in key and rows and all(r.environment for r in rows):
            report.skipped[key] = rows[0].error or "unavailable"  # only GPU pairs may be skipped
            continue
        report.pairs += rows

    gates, skipped = gate_candidates(bundle, with_cuda=with_cuda)
    report.skipped.update(skipped)
    if gates and evaluation is None:
        report.not_verified = {target_name(b.name, p): no_evaluation for b, p in gates}
    elif gates and evaluation is not None:
        report.evaluation = evaluation.describe(held_apart(bundle, evaluation))
        reference = _eager_logits(model, evaluation.batch)
        random = (manifest["model"].get("weights") or {}).get("source") == "random"
        report.gates = [_gate(b, p, bundle, evaluation, reference, max_top1_drop, min_agreement,
                              known, NOT_MEANINGFUL_RANDOM if random else None) for b, p in gates]
    write_json_atomic(bundle.path(PARITY), report.to_dict())
    return report


def _check_options(atol: float | None, rtol: float | None, max_drop: float,
                   min_agreement: float) -> tuple[float, float] | None:
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise InputError(f"tolerances must be >= 0 (got --atol {atol}, --rtol {rtol})")
    if max_drop < 0:
        raise InputError(f"--max-top1-drop {max_drop} must be >= 0 points")
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement {min_agreement} must be a share between 0 and 1, e.g. 0.99")
    if atol is None and rtol is None:
        return None
    return (atol or 0.0, rtol or 0.0)


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


# ----------------------------------------------------------------------------- presenting
def format_table(report: ParityReport) -> str:
    rule = report.rule
    title = (f"parity vs eager PyTorch fp64 (tolerance {rule['floor_multiple']:g} x the fp32 noise "
             f"floor + {rule['scale_term']:g} x max|logit|)" if rule["kind"] == "fp32 noise floor"
             else f"parity vs eager PyTorch fp32 (atol {rule['atol']:g}, rtol {rule['rtol']:g})")
    header = (f"{'candidate':<24} {'inputs':<11} {'max abs':>9} {'floor':>9} {'tolerance':>9} "
              f"{'margin':>7} {'top1':>5}  result")
    lines = [title, header]
    for pair in report.pairs:
        if pair.max_abs is None:
            lines.append(f"{pair.candidate:<24} {pair.inputs:<11} FAIL  {pair.error}")
            continue
        floor = f"{pair.fp32_floor:9.2e}" if pair.fp32_floor is not None else f"{'':>9}"
        tol = f"{pair.tolerance:9.2e}" if pair.tolerance is not None else f"{'':>9}"
        margin = f"{pair.margin:6.1f}x" if pair.margin is not None and pair.margin != float("inf") else f"{'':>7}"
        shown = pair.max_abs_vs_fp64 if pair.max_abs_vs_fp64 is not None else pair.max_abs
        lines.append(f"{pair.candidate:<24} {pair.inputs:<11} {shown:9.2e} {floor} {tol} {margin} "
                     f"{pair.top1:5.2f}  {'ok' if pair.passed else 'FAIL'}")
    lines += [f"{key:<24} skipped: {reason}" for key, reason in report.skipped.items()]
    lines += gate_lines(report)
    return "\n".join(lines)


def gate_lines(report: ParityReport) -> list[str]:
    if not report.gates and not report.not_verified:
        return []
    rule = report.gate_rule
    lines = ["", f"accuracy gate vs eager fp32 (top-1 drop <= {rule['max_top1_drop_points']:g} "
                 f"points, agreement >= {100 * rule['min_top1_agreement']:g}%)"]
    if report.evaluation:
        ev = report.evaluation
        lines.append(f"evaluation: {ev['images']} images from {ev['source']}; held apart from "
                     f"calibration: {ev['held_apart_from_calibration']}")
    lines.append(f"{'candidate':<24} {'ran as':<8} {'agree':>7} {'top5':>6} {'cosine':>8} "
                 f"{'fp32 acc':>8} {'acc':>7} {'drop':>6}  result")
    for gate in report.gates:
        if gate.error:
            lines.append(f"{gate.candidate:<24} {gate.not_meaningful or 'FAIL'}  {gate.error}")
            continue
        acc = (f"{100 * gate.fp32_top1:7.2f}% {100 * gate.candidate_top1:6.2f}% "
               f"{gate.top1_drop_points:6.2f}" if gate.fp32_top1 is not None else f"{'—':>8} {'—':>7} {'—':>6}")
        lines.append(f"{gate.candidate:<24} {gate.precision or '':<8} {100 * gate.top1_agreement:6.2f}% "
                     f"{100 * gate.top5_agreement:5.1f}% {gate.cosine_mean:8.5f} {acc}  "
                     f"{gate_verdict(gate)}")
    lines += [f"{key:<24} not verified: {reason}" for key, reason in report.not_verified.items()]
    return lines


def gate_verdict(gate: GateResult) -> str:
    if gate.not_meaningful:
        return gate.not_meaningful
    if gate.passed:
        return "ok"
    return ("FAIL: " if gate.decides_exit else "advisory FAIL (not recommended): ") + \
        (gate.failed_on or "")


def failure_summary(report: ParityReport) -> str:
    if not report.has_cpu_onnx_pair:
        return "parity FAILED: no CPU ONNX comparison ran, so nothing was verified"
    pairs = [p for p in report.pairs if not p.passed]
    gates = [g for g in report.binding_gates if not g.passed]
    parts = []
    if pairs:
        worst = max(pairs, key=lambda p: p.max_abs_vs_fp64 if p.max_abs_vs_fp64 is not None
                    else (p.max_abs if p.max_abs is not None else float("inf")))
        if worst.max_abs is None:
            detail = worst.error or "no result"
        elif worst.tolerance is not None:
            detail = (f"max abs error vs fp64 {worst.max_abs_vs_fp64:.3e} > tolerance "
                      f"{worst.tolerance:.3e} (fp32 floor {worst.fp32_floor:.2e})")
        else:
            detail = (f"max abs error {worst.max_abs:.3e} (atol {report.rule['atol']:g}, "
                      f"rtol {report.rule['rtol']:g})")
        parts.append(f"parity FAILED for {len(pairs)} pair(s); worst: {worst.candidate} on "
                     f"{worst.inputs}: {detail}")
    for gate in gates:
        parts.append(f"accuracy gate FAILED for {gate.candidate}: {gate.failed_on}"
                     + (f" ({gate.error})" if gate.error else ""))
    return "; ".join(parts)
