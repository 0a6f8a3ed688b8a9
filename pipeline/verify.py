"""Numerical parity of every exported model against eager PyTorch.

The report is truthy when every pair passes; the CLI turns a falsy report into exit 1.
A pair passes when every logit satisfies ``|candidate - reference| <= atol + rtol * |reference|``
(numpy's ``allclose`` rule).

Defaults and why: ``pipeline.tolerances``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.bundle import (ONNX, ONNX_SIMPLIFIED, PARITY, TORCHSCRIPT, WEIGHTS, Bundle,
                             write_json_atomic)
from pipeline.errors import CheckFailed, EnvironmentUnavailable, InputError
from pipeline.runners import OrtRunner, Runner, TorchRunner, ort_provider_problem
from pipeline.tolerances import DEFAULT_ATOL, DEFAULT_RTOL

RANDOM_BATCHES = (1, 3)


@dataclass
class PairResult:
    candidate: str
    inputs: str
    batch: int
    provider: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    top1: float | None = None
    top5: float | None = None
    passed: bool = False
    error: str | None = None
    reference: str = "torch-cpu"


@dataclass
class ParityReport:
    atol: float
    rtol: float
    pairs: list[PairResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    integrity: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.pairs) and all(pair.passed for pair in self.pairs)

    @property
    def failures(self) -> list[PairResult]:
        return [pair for pair in self.pairs if not pair.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "atol": self.atol, "rtol": self.rtol,
                "reference": "torch-cpu (eager PyTorch, fp32)",
                "rule": "|candidate - reference| <= atol + rtol * |reference|",
                "integrity_checked": self.integrity, "skipped": self.skipped,
                "pairs": [asdict(pair) for pair in self.pairs]}


def compare(candidate: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float) -> dict[str, Any]:
    """Largest absolute/relative error, top-1/top-5 agreement and the allclose verdict."""
    candidate = candidate.astype(np.float64)
    reference = reference.astype(np.float64)
    if candidate.shape != reference.shape:
        return {"passed": False, "error": f"shape {candidate.shape} != reference {reference.shape}"}
    diff = np.abs(candidate - reference)
    # Relative error over |reference| floored at atol, so near-zero logits do not divide by zero.
    rel = diff / np.maximum(np.abs(reference), atol)
    k = min(5, reference.shape[1])
    top_c = np.argsort(-candidate, axis=1)[:, :k]
    top_r = np.argsort(-reference, axis=1)[:, :k]
    top5 = np.mean([set(a) == set(b) for a, b in zip(top_c, top_r)])
    finite = bool(np.isfinite(candidate).all())
    return {"max_abs": float(diff.max()), "max_rel": float(rel.max()),
            "top1": float(np.mean(top_c[:, 0] == top_r[:, 0])), "top5": float(top5),
            "passed": finite and bool(np.all(diff <= atol + rtol * np.abs(reference)))}


def random_inputs(size: int) -> dict[str, np.ndarray]:
    """Fixed-seed batches; more than one sample proves the dynamic batch axis."""
    inputs = {}
    for seed, batch in enumerate(RANDOM_BATCHES):
        rng = np.random.default_rng(seed)
        inputs[f"random-b{batch}"] = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    return inputs


def image_inputs(images: Path, manifest: dict[str, Any]) -> np.ndarray:
    from pipeline.archs import Preprocessing
    from pipeline.images import find_images, load_batch

    prep = Preprocessing.from_dict(manifest["model"]["preprocessing"])
    batch, _, errors = load_batch(find_images([images]), prep)
    if errors:
        raise InputError(f"--images {str(images)!r}: {len(errors)} file(s) are not usable "
                         f"images, first: {errors[0][1]}")
    return batch


def candidate_factories(bundle: Bundle, *, with_cuda: bool) -> tuple[dict[str, Callable[[], Runner]], dict[str, str]]:
    """The exported models to compare, and why any were skipped."""
    factories: dict[str, Callable[[], Runner]] = {
        "torchscript-cpu": lambda: TorchRunner.from_torchscript(bundle.path(TORCHSCRIPT)),
    }
    onnx_files = {"onnx": ONNX}
    if bundle.path(ONNX_SIMPLIFIED).is_file():
        onnx_files["onnx-sim"] = ONNX_SIMPLIFIED
    skipped: dict[str, str] = {}
    providers = ["cpu"] + (["cuda"] if with_cuda else [])
    for provider in providers:
        problem = ort_provider_problem(provider) if provider != "cpu" else None
        for label, name in onnx_files.items():
            key = f"{label}-ort-{provider}"
            if problem:
                skipped[key] = problem
                continue
            factories[key] = (lambda n=name, p=provider:
                              OrtRunner(bundle.path(n), provider=p))
    return factories, skipped


def _run_pair(key: str, make: Callable[[], Runner], inputs: dict[str, np.ndarray],
              references: dict[str, np.ndarray], atol: float, rtol: float) -> list[PairResult]:
    runner = make()
    results = []
    for label, batch in inputs.items():
        result = PairResult(key, label, len(batch), provider=runner.provider)
        try:
            outcome = compare(runner.infer(batch), references[label], atol=atol, rtol=rtol)
        except Exception as exc:  # a runtime error in one backend is a failed row, not a crash
            outcome = {"passed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        for name, value in outcome.items():
            setattr(result, name, value)
        results.append(result)
    return results


def verify_bundle(path: Path | str, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  images: Path | None = None, with_cuda: bool = True) -> ParityReport:
    """Check integrity, then compare every exported model to eager PyTorch; write parity.json."""
    from pipeline.weights import load_model

    if atol < 0 or rtol < 0:
        raise InputError(f"tolerances must be >= 0 (got --atol {atol}, --rtol {rtol})")
    bundle = Bundle.open(path)
    manifest = bundle.read_manifest()
    exported = [name for name, entry in manifest.get("artifacts", {}).items()
                if entry.get("stage") == "export"]
    if ONNX not in exported:
        raise CheckFailed(f"{bundle.root} has no exported models in its manifest; "
                          f"run: python -m pipeline export --out {bundle.root}")
    report = ParityReport(atol=atol, rtol=rtol, integrity=bundle.check_integrity(exported))

    reference = TorchRunner(load_model(checkpoint=bundle.path(WEIGHTS)).model)
    inputs = random_inputs(int(manifest["model"]["input_size"]))
    if images is not None:
        inputs["images"] = image_inputs(images, manifest)
    references = {label: reference.infer(batch) for label, batch in inputs.items()}
    factories, report.skipped = candidate_factories(bundle, with_cuda=with_cuda)
    for key, make in factories.items():
        try:
            report.pairs += _run_pair(key, make, inputs, references, atol, rtol)
        except EnvironmentUnavailable as exc:
            # e.g. the CUDA provider is listed and a GPU is visible, but libcudnn is missing:
            # the session fell back to the CPU, so there is no CUDA result to compare.
            report.skipped[key] = str(exc)
    write_json_atomic(bundle.path(PARITY), report.to_dict())
    return report


def format_table(report: ParityReport) -> str:
    header = f"{'candidate':<22} {'inputs':<11} {'max abs':>9} {'max rel':>9} {'top1':>5} {'top5':>5}  result"
    lines = [f"parity vs eager PyTorch (atol {report.atol:g}, rtol {report.rtol:g})", header]
    for pair in report.pairs:
        if pair.error and pair.max_abs is None:
            lines.append(f"{pair.candidate:<22} {pair.inputs:<11} FAIL  {pair.error}")
            continue
        lines.append(f"{pair.candidate:<22} {pair.inputs:<11} {pair.max_abs:9.2e} "
                     f"{pair.max_rel:9.2e} {pair.top1:5.2f} {pair.top5:5.2f}  "
                     f"{'ok' if pair.passed else 'FAIL'}")
    lines += [f"{key:<22} skipped: {reason}" for key, reason in report.skipped.items()]
    return "\n".join(lines)


def failure_summary(report: ParityReport) -> str:
    worst = max(report.failures, key=lambda p: p.max_abs if p.max_abs is not None else float("inf"))
    detail = (f"max abs error {worst.max_abs:.3e}" if worst.max_abs is not None
              else worst.error or "no result")
    return (f"parity FAILED for {len(report.failures)} pair(s); worst: {worst.candidate} on "
            f"{worst.inputs}: {detail} (atol {report.atol:g}, rtol {report.rtol:g})")
