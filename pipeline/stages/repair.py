"""``quantize --repair``: int8 that meets the gate's limit on the images it is repaired on.

The plain int8 model is judged against fp32 on the repair images (top-1 agreement needs no
labels; by default they are the calibration images). If it falls short of ``min_agreement``:

1. **Cross-layer equalization** (``pipeline.formats.equalize``), free at run time: each
   Conv-Relu-Conv pair's channels are rescaled so that an outlier channel no longer makes the
   activation scale coarse for its whole tensor; then int8 is calibrated again. Kept only if
   it raised the agreement.
2. **Layers kept in float**, at most ``max_float_share`` of the quantized Conv/Gemm nodes: in
   the order of their share of plain int8's logit error (the ranking ``verify --localize``
   computes), one at a time, each re-checked; a revert that did not raise the agreement is
   undone. It stops at the first model that meets the limit.

The result is still a plain QDQ ``model.int8.onnx`` (the reverted nodes simply have no
Quantize/Dequantize pair), which ONNX Runtime, OpenVINO and TensorRT read. The choice is made
on the repair images only; verify then gates the file on evaluation images held apart from
both the calibration and the repair images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.bundle import ONNX, WEIGHTS, Bundle
from pipeline.core.records import FloatLayer, RepairRecord
from pipeline.runtimes.registry import int8_layer_backend

RANKING_ROWS = 8  # images the layer ranking runs on (the ones plain int8 gets wrong first)
MAX_TRIALS = 8  # nodes tried in float, at most (each is one more calibration and check)


@dataclass
class Attempt:
    path: Path
    agreement: float
    logits: np.ndarray


class Repair:
    """The repair loop over one bundle's fp32 source; ``quantize`` makes each int8 attempt."""

    def __init__(self, bundle: Bundle, source: Path, images: np.ndarray, what: str,
                 quantize: Callable[[Path, Path, list[str]], None], scratch: Path,
                 log: Callable[[str], None]) -> None:
        self.bundle, self.source, self.images, self.what = bundle, source, images, what
        self.quantize, self.scratch, self.log = quantize, scratch, log
        self.backend = int8_layer_backend()
        self.fp32 = self.logits(source, "fp32")
        self.tries = 0

    def logits(self, path: Path, precision: str) -> np.ndarray:
        with self.backend.make_file(path, precision) as runner:
            return np.concatenate([runner.infer(self.images[i:i + 64])
                                   for i in range(0, len(self.images), 64)])

    def attempt(self, source: Path, exclude: list[str]) -> Attempt:
        self.tries += 1
        target = self.scratch / f"try{self.tries}.int8.onnx"
        self.quantize(source, target, exclude)
        logits = self.logits(target, "int8")
        agreement = float(np.mean(logits.argmax(1) == self.fp32.argmax(1)))
        return Attempt(target, agreement, logits)

    def run(self, plain: Attempt, min_agreement: float, max_float_share: float, *,
            equalize: bool = True) -> tuple[Attempt, RepairRecord]:
        started = time.perf_counter()
        record = RepairRecord(images=len(self.images), source=self.what, min_agreement=min_agreement,
                              agreement_before=plain.agreement, agreement_after=plain.agreement,
                              met=plain.agreement >= min_agreement)
        quantized = _quantized_nodes(plain.path)
        record.quantized_nodes = len(quantized)
        record.max_in_float = max(1, math.floor(max_float_share * len(quantized) + 1e-9))
        if record.met:
            record.note = "plain int8 already met the limit: nothing repaired"
            return plain, record
        current, base = plain, self.source
        equalized = self.scratch / "equalized.onnx"
        pairs = _equalized_copy(self.source, equalized) if equalize else []
        record.equalized_pairs = len(pairs)
        if pairs:
            record.largest_channel_scale = max(p.largest_scale for p in pairs)
            trial = self.attempt(equalized, [])
            record.agreement_equalized = trial.agreement
            self.log(f"  repair: cross-layer equalization of {len(pairs)} pair(s): agreement "
                     f"{100 * plain.agreement:.2f}% -> {100 * trial.agreement:.2f}%")
            if trial.agreement > current.agreement:
                current, base, record.equalization_kept = trial, equalized, True
        if current.agreement < min_agreement:
            ranking = self._ranking(plain)
            if not ranking:
                record.note = "no layer ranking (the export lacks PyTorch module scopes)"
            excluded: list[str] = []
            for group, share in ranking:
                if current.agreement >= min_agreement:
                    break
                new = [(name, node) for name, node in group if node in quantized and node not in excluded]
                if not new or len(excluded) + len(new) > record.max_in_float:
                    continue
                names = " + ".join(name for name, _ in new)
                trial = self.attempt(base, excluded + [node for _, node in new])
                self.log(f"  repair: {names} in float: agreement {100 * current.agreement:.2f}% "
                         f"-> {100 * trial.agreement:.2f}%")
                if trial.agreement > current.agreement:
                    excluded += [node for _, node in new]
                    current = trial
                    record.kept_in_float += [FloatLayer(name, node, share, trial.agreement)
                                             for name, node in new]
                else:
                    record.undone.append(names)
        record.agreement_after = current.agreement
        record.met = current.agreement >= min_agreement
        record.seconds = round(time.perf_counter() - started, 2)
        return current, record

    def _ranking(self, plain: Attempt) -> list[tuple[list[tuple[str, str]], float | None]]:
        """Groups of (pytorch, node) to try in float, with the layer's error share: for each of
        plain int8's layers by its share of the logit error (measured on the repair images it
        gets wrong, then others), the Conv that makes it (its weights' error), then that Conv
        with the Convs that consume it: a QDQ graph quantizes an activation both as its
        producer's output and as its consumers' input, so a coarse activation is float only
        when all of them are."""
        import onnx

        from pipeline.formats.layers import DEQUANTIZED
        from pipeline.models.weights import load_model
        from pipeline.stages.localize import Reference, int8_shares

        wrong = np.flatnonzero(plain.logits.argmax(1) != self.fp32.argmax(1))
        rows = np.concatenate([wrong, np.setdiff1d(np.arange(len(self.images)), wrong)])[:RANKING_ROWS]
        batch = self.images[np.sort(rows)]
        model = load_model(checkpoint=self.bundle.path(WEIGHTS)).model.eval()
        reference = Reference.capture(model, batch)
        raw = onnx.load(str(self.bundle.path(ONNX)))
        with self.backend.make_file(plain.path, "int8") as runner:
            found = int8_shares("repair", runner, reference, batch, "repair images", raw)
        graph = _Graph(self.source)
        groups: list[tuple[list[tuple[str, str]], float | None]] = []
        for layer in found.largest:
            producer = graph.by_weight.get(f"{layer.pytorch.split(' ')[0]}.weight")
            consumers = graph.consumers.get(layer.tensor.removesuffix(DEQUANTIZED), [])
            for nodes in ([producer] if producer else [], ([producer] if producer else []) + consumers):
                group = [(graph.module[n], n) for n in nodes]
                if group and group not in [g for g, _ in groups]:
                    groups.append((group, layer.logit_error_share))
        return groups[:MAX_TRIALS]


class _Graph:
    """The fp32 source's Conv/Gemm nodes: by weight, their PyTorch module, and who reads a tensor."""

    def __init__(self, source: Path) -> None:
        import onnx

        model = onnx.load(str(source), load_external_data=False)
        weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1]
        self.by_weight = {n.input[1]: n.name for n in weighted}
        self.module = {n.name: n.input[1].removesuffix(".weight") for n in weighted}
        self.consumers: dict[str, list[str]] = {}
        for node in weighted:
            self.consumers.setdefault(node.input[0], []).append(node.name)


def _equalized_copy(source: Path, target: Path) -> list:
    import onnx

    from pipeline.formats.equalize import equalize

    model = onnx.load(str(source))
    pairs = equalize(model)
    onnx.save(model, str(target))
    return pairs


def _quantized_nodes(int8_path: Path) -> list[str]:
    """The Conv/Gemm nodes whose weights the int8 file quantizes."""
    import onnx

    model = onnx.load(str(int8_path))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in dequantized]


def agreement_with_fp32(source: Path, int8: Path, images: np.ndarray) -> float:
    """Top-1 agreement of an int8 file with its fp32 source on ``images`` (ONNX Runtime)."""
    backend = int8_layer_backend()
    shares = []
    with backend.make_file(source, "fp32") as fp32, backend.make_file(int8, "int8") as quant:
        for i in range(0, len(images), 64):
            chunk = images[i:i + 64]
            shares.append(fp32.infer(chunk).argmax(1) == quant.infer(chunk).argmax(1))
    return float(np.mean(np.concatenate(shares)))

