"""Classify image files with an exported model: a bundle, a bare .onnx or a bare model.pt2.

A bare .onnx carries its preprocessing and class names in ``metadata_props``, a model.pt2 the
same keys in its ``extra/pipeline.json`` (both written by export), so nothing else is needed.
Bad files get a per-file error and the rest still run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.bundle import ONNX, Bundle
from pipeline.data.images import is_image_name, load_batch
from pipeline.errors import InputError
from pipeline.models.archs import Preprocessing
from pipeline.runtimes.base import Runner
from pipeline.runtimes.registry import (
    Backend,
    check_precision_name,
    get_backend,
    remote,
    served_model,
)

CHUNK = 16


@dataclass
class Prediction:
    file: str
    top: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


RUNTIMES = ("ort", "openvino", "torch-export")


def backend_for(runtime: str, provider: str) -> Backend:
    """The registry entry for ``--runtime``/``--provider``."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown --runtime {runtime!r}; choose from: {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        if provider != "cpu":
            raise InputError(f"--runtime openvino runs on the CPU here; drop --provider {provider}")
        return get_backend("openvino-cpu")
    if runtime == "torch-export":
        return get_backend(f"torch-export-{provider}")
    return get_backend(f"ort-{provider}")


def make_runner(target: Path, backend: Backend, precision: str) -> Runner:
    """A runner on a bundle's model at ``precision``, or on a bare .onnx file as it is."""
    check_precision_name(precision)
    if target.is_dir():
        bundle = Bundle.open(target)
        if ONNX not in bundle.read_manifest().get("artifacts", {}):
            raise InputError(f"bundle {str(target)!r} has no exported ONNX model; run "
                             f"python -m pipeline export --out {target}")
        return backend.make(bundle, precision)
    if not target.is_file():
        raise InputError(f"model file {str(target)!r} does not exist")
    if target.suffix == ".pt2" or backend.runtime == "torch-export":
        if precision != "fp32" or backend.runtime == "openvino":
            raise InputError(f"a .pt2 runs in PyTorch at fp32; drop --precision {precision} "
                             f"and --runtime {backend.runtime}")
        return get_backend(f"torch-export-{backend.device}").make_file(target)
    if precision not in ("fp32", "auto"):
        raise InputError(f"--precision {precision} chooses a variant inside a bundle; a bare "
                         f".onnx runs as it is: give the bundle folder, or the variant's file")
    if backend.runtime != "openvino" and precision != "fp32":
        raise InputError(f"--precision {precision} is OpenVINO's own choice; add --runtime openvino")
    return backend.make_file(target, precision)


def labels_and_preprocessing(runner: Any, target: Path) -> tuple[list[str], Preprocessing]:
    """From the model's own metadata_props (written by export), read once from the runtime."""
    meta = runner.metadata()
    missing = [key for key in ("class_names", "preprocessing") if key not in meta]
    if missing:
        raise InputError(f"{str(target)!r} lacks metadata {', '.join(missing)}; export it with "
                         f"python -m pipeline export")
    return json.loads(meta["class_names"]), Preprocessing.from_dict(json.loads(meta["preprocessing"]))


def collect_files(inputs: list[Path]) -> tuple[list[Path], list[Prediction]]:
    """Files named directly, and image files under folders; anything else is a per-file error."""
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


def server_runner(target: Path, url: str, precision: str) -> Any:
    """A runner that sends each batch to the Triton server at ``url`` serving this bundle."""
    if not Path(target).is_dir():
        raise InputError(f"--server needs the bundle folder the server serves (for its "
                         f"preprocessing and classes), not {str(target)!r}")
    return remote(url, served_model(Bundle.open(target), precision))


def predict(target: Path, inputs: list[Path], *, k: int = 5, provider: str = "cpu",
            runtime: str = "ort", precision: str = "fp32", server: str | None = None) -> list[Prediction]:
    if k < 1:
        raise InputError(f"--top-k {k} must be at least 1")
    with (server_runner(Path(target), server, precision) if server else
          make_runner(Path(target), backend_for(runtime, provider), precision)) as runner:
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
