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
class ModelCard:
    onnx_path: Path
    class_names: list[str]
    preprocessing: Preprocessing


@dataclass
class Prediction:
    file: str
    top: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def model_card(target: Path) -> ModelCard:
    """Where the model is and how to feed it, from a bundle or from ONNX metadata."""
    from pipeline.export import read_onnx_metadata

    if target.is_dir():
        bundle = Bundle.open(target)
        model = bundle.read_manifest().get("model")
        path = bundle.path(ONNX_SIMPLIFIED)
        path = path if path.is_file() else bundle.path(ONNX)
        if not model or not path.is_file():
            raise InputError(f"bundle {str(target)!r} has no exported ONNX model; run "
                             f"python -m pipeline export --out {target}")
        read_onnx_metadata(path)  # a damaged file is an input error here, not an ORT crash
        return ModelCard(path, model["class_names"], Preprocessing.from_dict(model["preprocessing"]))
    meta = read_onnx_metadata(target)
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise InputError(f"{str(target)!r} lacks metadata {', '.join(missing)}; export it with "
                         f"python -m pipeline export, or predict with its bundle directory")
    return ModelCard(target, json.loads(meta["class_names"]),
                     Preprocessing.from_dict(json.loads(meta["preprocessing"])))


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
    card = model_card(target)
    runner = OrtRunner(card.onnx_path, provider=provider)
    files, results = collect_files(inputs)
    if not files and not results:
        raise InputError("no images given; pass image files or folders")
    k = min(k, len(card.class_names))
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        batch, good, errors = load_batch(chunk, card.preprocessing)
        results += [Prediction(str(path), error=message) for path, message in errors]
        if len(good):
            probabilities = softmax(runner.infer(batch))
            results += [Prediction(str(path), top_k(row, card.class_names, k))
                        for path, row in zip(good, probabilities)]
    order = {str(path): index for index, path in enumerate(files)}
    return sorted(results, key=lambda p: order.get(p.file, -1))
