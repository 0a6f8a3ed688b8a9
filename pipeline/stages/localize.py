"""``verify --localize``: where does an export depart from the model that was trained?

The reference is the eager PyTorch model captured with ``torch.export`` (the same modules and
weights, op by op) and run node by node twice: in fp32 and in float64. Each layer gets the
parity rule of the whole model, applied to its own output: its tolerance is
``FLOOR_MULTIPLE x`` that layer's fp32 noise floor plus ``SCALE_TERM x max|fp64|``. The first
layer, in graph order, whose candidate error exceeds its tolerance is where the export went
wrong: a corrupted weight names its layer, a preprocessing slip baked into the graph names
the first one. Layers are matched by the PyTorch module they came from
(``pipeline.formats.layers``), never by tensor names, which differ between graphs.

int8 is expected to differ everywhere, so there is no "first" layer: each quantized layer's
share of the final logit error is measured by quantizing that layer alone in the eager fp32
model (its weights as the int8 file stores them, unfolded from the BatchNorm the exporter
folded in, and its output activation with the file's scale and zero point) and dividing the
logit error that makes by the whole int8 model's. Shares need not sum to 1 (errors interact);
the layers with the largest shares are where accuracy goes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.core.records import LayerError, Localization
from pipeline.formats.layers import (
    DEQUANTIZED,
    Layer,
    fx_layers,
    has_scopes,
    onnx_layers,
)
from pipeline.options import FLOOR_MULTIPLE, SCALE_TERM
from pipeline.runtimes.base import Runner

MAX_ROWS = 4  # images compared layer by layer (every activation is kept, in float64)
LARGEST = 5  # int8 layers reported


@dataclass
class Reference:
    """Eager PyTorch, node by node: fp32 and float64 values of every layer, keyed by module."""

    graph: Any  # the fp32 fx GraphModule
    layers: list[Layer]
    fp32: dict[tuple[str, int], np.ndarray]
    fp64: dict[tuple[str, int], np.ndarray]

    @classmethod
    def capture(cls, model: Any, batch: np.ndarray) -> "Reference":
        import torch

        from pipeline.runtimes.torch import record_nodes

        example = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        graph = torch.export.export(model.eval(), (example,)).module()
        layers = fx_layers(graph)
        exact = copy.deepcopy(graph).double()
        fp32 = record_nodes(graph, example)
        fp64 = record_nodes(exact, example.double())
        del exact
        return cls(graph, layers, {layer.key: fp32[layer.tensor] for layer in layers},
                   {layer.key: fp64[layer.tensor] for layer in layers})

    def logits(self, replace: dict[str, Callable[[Any], Any]], batch: np.ndarray) -> np.ndarray:
        """fp32 logits with ``replace`` applied to the named nodes."""
        import torch

        from pipeline.runtimes.torch import record_nodes

        output = next(n for n in self.graph.graph.nodes if n.op == "output").all_input_nodes[0].name
        return record_nodes(self.graph, torch.from_numpy(batch), {output}, replace)[output]


def candidate_layers(runner: Runner, raw_onnx: Any | None) -> tuple[list[Layer], str | None]:
    """The candidate's layers, or (empty, why not)."""
    graph_module = getattr(runner, "graph_module", None)
    if graph_module is not None:
        return fx_layers(graph_module), None
    path = runner.model_path
    if path is None or path.suffix != ".onnx":
        return [], f"{runner.name} cannot return intermediate layers; localize the ONNX or .pt2 file"
    import onnx

    candidate = onnx.load(str(path))
    source = candidate if has_scopes(candidate) else raw_onnx
    if source is None or not has_scopes(source):
        return [], ("the ONNX graph does not record its PyTorch modules (the dynamo exporter "
                    "does; re-export without --exporter legacy to localize)")
    return onnx_layers(source, candidate), None


def _error(layer: Layer, index: int, **figures: float | None) -> LayerError:
    return LayerError(layer.pytorch, layer.node, layer.tensor, layer.op, index, **figures)


def first_divergence(candidate: str, runner: Runner, reference: Reference, batch: np.ndarray,
                     label: str, raw_onnx: Any | None) -> Localization:
    """fp32: the first layer whose error against float64 exceeds that layer's tolerance."""
    result = Localization(candidate, runner.model_path.name if runner.model_path else None, label,
                          len(batch), "eager PyTorch in float64; per-layer fp32 noise floor",
                          layers_compared=0)
    layers, why = candidate_layers(runner, raw_onnx)
    layers = [layer for layer in layers if layer.key in reference.fp64]
    if not layers:
        result.note = why or "no layer of the candidate matches a PyTorch module"
        return result
    values = runner.intermediates(batch, [layer.tensor for layer in layers])
    closest, closest_ratio = None, -1.0  # the layer nearest its tolerance, when none exceeds it
    for index, layer in enumerate(layers):
        value = values.get(layer.tensor)
        fp64, fp32 = reference.fp64[layer.key], reference.fp32[layer.key]
        if value is None or value.shape != fp64.shape:
            continue
        result.layers_compared += 1
        floor = float(np.abs(fp32.astype(np.float64) - fp64).max()) if fp64.size else 0.0
        tolerance = FLOOR_MULTIPLE * floor + SCALE_TERM * float(np.abs(fp64).max(initial=0.0))
        error = float(np.abs(value.astype(np.float64) - fp64).max(initial=0.0))
        row = _error(layer, index, max_abs_vs_fp64=error, fp32_floor=floor, tolerance=tolerance)
        if not np.isfinite(value).all() or error > tolerance:
            result.first_divergent = row
            break
        if error / max(tolerance, 1e-30) > closest_ratio:
            closest, closest_ratio = row, error / max(tolerance, 1e-30)
    if result.first_divergent is None:
        result.note = "no layer exceeds its tolerance"
        result.largest = [closest] if closest is not None else []
    return result


def _fake_quantize(scale: np.ndarray, zero_point: np.ndarray) -> Callable[[Any], Any]:
    """What the int8 file does to one activation: quantize with its scale and zero point, and
    dequantize (u8 or s8, by the zero point's type)."""
    import torch

    low, high = (0, 255) if zero_point.dtype == np.uint8 else (-128, 127)
    s, z = float(np.asarray(scale).reshape(-1)[0]), int(np.asarray(zero_point).reshape(-1)[0])

    def apply(value: Any) -> Any:
        return (torch.clamp(torch.round(value / s) + z, low, high) - z) * s

    return apply


def _dequantized_weight(constants: dict[str, np.ndarray], weight: str) -> np.ndarray | None:
    """The int8 file's weight ``weight`` as the runtime sees it: (q - zero point) x scale,
    per output channel."""
    q = constants.get(f"{weight}_quantized")
    scale, zero = constants.get(f"{weight}_scale"), constants.get(f"{weight}_zero_point")
    if q is None or scale is None or zero is None:
        return None
    shape = (-1,) + (1,) * (q.ndim - 1) if np.ndim(scale) else ()
    return ((q.astype(np.float64) - np.reshape(zero, shape)) * np.reshape(scale, shape))


def _weight_replacement(graph: Any, constants: dict[str, np.ndarray],
                        weight: str) -> tuple[str, Callable[[Any], Any]] | None:
    """Put the int8 file's weight into the eager graph: the exporter folded each BatchNorm into
    its Conv before quantizing, so the quantized weight is unfolded by that BatchNorm's
    ``gamma / sqrt(var + eps)`` to take the unfolded weight's place."""
    import torch

    values = _dequantized_weight(constants, weight)
    node = next((n for n in graph.graph.nodes if n.op == "get_attr" and n.target == weight), None)
    if values is None or node is None:
        return None
    for user in node.users:
        for norm in user.users:
            if "batch_norm" in str(norm.target) and len(norm.args) >= 8:
                gamma, var = (graph.get_parameter(a.target) if a.target in dict(graph.named_parameters())
                              else graph.get_buffer(a.target) for a in (norm.args[1], norm.args[4]))
                factor = (gamma / torch.sqrt(var + float(norm.args[7]))).detach().double().numpy()
                values = values / factor.reshape((-1,) + (1,) * (values.ndim - 1))
    quantized = torch.from_numpy(values)
    return node.name, (lambda value: quantized.to(value.dtype))


def _relative(candidate: np.ndarray, reference: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(candidate.astype(np.float64) - reference)) / max(norm, 1e-30)


def int8_shares(candidate: str, runner: Runner, reference: Reference, batch: np.ndarray,
                label: str, raw_onnx: Any | None) -> Localization:
    """int8: each quantized layer's relative error, and its share of the logit error."""
    import onnx
    from onnx import numpy_helper

    result = Localization(candidate, runner.model_path.name if runner.model_path else None, label,
                          len(batch), "eager PyTorch in fp32; each layer quantized alone",
                          layers_compared=0)
    layers, why = candidate_layers(runner, raw_onnx)
    layers = [layer for layer in layers if layer.key in reference.fp32
              and layer.tensor.endswith(DEQUANTIZED)]
    if not layers:
        result.note = why or "no quantized layer matches a PyTorch module"
        return result
    proto = onnx.load(str(runner.model_path))
    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {out: n for n in proto.graph.node for out in n.output}
    values = runner.intermediates(batch, [layer.tensor for layer in layers])
    logits = runner.infer(batch)
    output = reference.logits({}, batch)
    whole = _relative(logits, output)
    result.logit_relative_error = whole
    by_key = {layer.key: layer for layer in reference.layers}
    rows = []
    for index, layer in enumerate(layers):
        value = values.get(layer.tensor)
        fp32 = reference.fp32[layer.key]
        if value is None or value.shape != fp32.shape:
            continue
        result.layers_compared += 1
        base = layer.tensor.removesuffix(DEQUANTIZED)
        scale, zero = constants.get(f"{base}_scale"), constants.get(f"{base}_zero_point")
        replace: dict[str, Callable[[Any], Any]] = {}
        if scale is not None and zero is not None:
            replace[by_key[layer.key].tensor] = _fake_quantize(scale, zero)
        producer = producers.get(base)
        if producer is not None and producer.op_type in ("Conv", "Gemm") and len(producer.input) > 1:
            weight = _weight_replacement(reference.graph, constants,
                                         producer.input[1].removesuffix(DEQUANTIZED))
            if weight is not None:
                replace[weight[0]] = weight[1]
        share = None
        if replace and whole > 0:
            share = _relative(reference.logits(replace, batch), output) / whole
        rows.append(_error(layer, index, relative_error=_relative(value, fp32),
                           logit_error_share=share))
    rows.sort(key=lambda r: (r.logit_error_share or 0.0, r.relative_error or 0.0), reverse=True)
    result.largest = rows[:LARGEST]
    return result
