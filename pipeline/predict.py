"""Classify image files with an exported model: a bundle or a bare .onnx file.

A bare .onnx carries its preprocessing and class names in ``metadata_props`` (written by
export), so nothing else is needed. Bad files get a per-file error and the rest still run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.archs import Preprocessing
from pipeline.bundle import ONNX, ONNX_SIMPLIFIED, Bundle
from pipeline.errors import InputError

CHUNK = 16


@dataclass
class Prediction:
    file: str
    top: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def onnx_path(target: Path) -> Path:
    """The model to run: a bundle's simplified (else raw) ONNX, or the .onnx file itself."""
    if not target.is_dir():
        if not target.is_file():
            raise InputError(f"ONNX file {str(target)!r} does not exist")
        return target
    bundle = Bundle.open(target)
    for name in (ONNX_SIMPLIFIED, ONNX):
        if bundle.path(name).is_file():
            return bundle.path(name)
    raise InputError(f"bundle {str(target)!r} has no exported ONNX model; run "
                     f"python -m pipeline export --out {target}")


def labels_and_preprocessing(runner: Any, target: Path) -> tuple[list[str], Preprocessing]:
    """From the model's own metadata_props (written by export), read once from the session."""
    meta = runner.session.get_modelmeta().custom_metadata_map
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise InputError(f"{str(target)!r} lacks metadata {', '.join(missing)}; export it with "
                         f"python -m pipeline export")
    return json.loads(meta["class_names"]), Preprocessing.from_dict(json.loads(meta["preprocessing"]))


def collect_files(inputs: list[Path]) -> tuple[list[Path], list[Prediction]]:
    """Files named directly, and image files under folders; anything else is a per-file error."""
    from pipeline.images import is_image_name

    files, errors = [], []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p))
            files += found
            if not found:
                errors.append(Prediction(str(item), error=f"{item}: folder holds no image files"))
        elif item.is_file():
            files.append(item)
        else:
            errors.append(Prediction(str(item), error=f"{item}: no such file or folder"))
    return files, errors


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, names: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probabilities)[:k]
    return [{"index": int(i), "label": names[i], "probability": float(probabilities[i])} for i in order]


def predict(target: Path, inputs: list[Path], *, k: int = 5, provider: str = "cpu") -> list[Prediction]:
    from pipeline.images import load_batch
    from pipeline.runners import OrtRunner

    if k < 1:
        raise InputError(f"--top-k {k} must be at least 1")
    runner = OrtRunner(onnx_path(target), provider=provider)
    class_names, prep = labels_and_preprocessing(runner, target)
    files, results = collect_files(inputs)
    if not files and not results:
        raise InputError("no images given; pass image files or folders")
    k = min(k, len(class_names))
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        batch, good, errors = load_batch(chunk, prep)
        results += [Prediction(str(path), error=message) for path, message in errors]
        if len(good):
            probabilities = softmax(runner.infer(batch))
            results += [Prediction(str(path), top_k(row, class_names, k))
                        for path, row in zip(good, probabilities)]
    order = {str(path): index for index, path in enumerate(files)}
    return sorted(results, key=lambda p: order.get(p.file, -1))
