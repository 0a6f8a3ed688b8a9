"""Cross-layer equalization of an fp32 ONNX graph (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019).

For two convolutions joined by a ReLU, ``B(relu(A(x)))``, scaling output channel i of A by
1/s_i and input channel i of B by s_i leaves the network unchanged for any s_i > 0, because
``relu(x / s) = relu(x) / s``. Choosing ``s_i = sqrt(r1_i / r2_i)``, where r1_i is the largest
|weight| of A's output channel i (bias included) and r2_i of B's input channel i, gives both
the same range. A channel whose activations are far larger than its neighbours' (an outlier
channel, which makes int8's per-tensor activation scale coarse for the whole tensor) comes
from an output channel of A with large weights, and is scaled back into line, its size moved
into B's weights, which int8 quantizes per channel. Nothing is added to the graph, so the
speed is unchanged.

Pairs are found in the exported graph (BatchNorm already folded into each Conv): a Conv whose
only consumer is a Relu whose only consumer is another Conv, both with group 1. Chains
(a Bottleneck's conv1 -> conv2 -> conv3) are equalized in a few sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

SWEEPS = 3


@dataclass(frozen=True)
class EqualizedPair:
    first: str  # the Conv node whose output channels were scaled down
    second: str  # the Conv node whose input channels were scaled up
    largest_scale: float  # the most uneven s_i of the first sweep, against their median (1: even)


def _attribute(node: "onnx.NodeProto", name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def relu_pairs(model: "onnx.ModelProto") -> list[tuple["onnx.NodeProto", "onnx.NodeProto"]]:
    """(A, B) for every Conv A -> Relu -> Conv B with no other consumer in between."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    consumers: dict[str, list["onnx.NodeProto"]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    pairs = []
    for first in graph.node:
        if first.op_type != "Conv" or _attribute(first, "group", 1) != 1 \
                or len(first.input) < 2 or first.input[1] not in initializers:
            continue
        after = consumers.get(first.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu" or first.output[0] in outputs:
            continue
        relu = after[0]
        following = consumers.get(relu.output[0], [])
        if len(following) != 1 or relu.output[0] in outputs:
            continue
        second = following[0]
        if second.op_type == "Conv" and _attribute(second, "group", 1) == 1 and \
                second.input[0] == relu.output[0] and second.input[1] in initializers:
            pairs.append((first, second))
    return pairs


def equalize(model: "onnx.ModelProto") -> list[EqualizedPair]:
    """Equalize ``model``'s Conv-Relu-Conv pairs in place; what was done, pair by pair."""
    from onnx import numpy_helper

    tensors = {i.name: i for i in model.graph.initializer}
    pairs = relu_pairs(model)
    largest: dict[tuple[str, str], float] = {}
    for sweep in range(SWEEPS):
        for first, second in pairs:
            w1 = numpy_helper.to_array(tensors[first.input[1]]).astype(np.float64)
            w2 = numpy_helper.to_array(tensors[second.input[1]]).astype(np.float64)
            bias = (numpy_helper.to_array(tensors[first.input[2]]).astype(np.float64)
                    if len(first.input) > 2 and first.input[2] in tensors else None)
            if w2.shape[1] != w1.shape[0]:
                continue
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            if bias is not None:
                r1 = np.maximum(r1, np.abs(bias))
            r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(axis=1)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            if sweep == 0:
                spread = scale / np.median(scale)
                largest[(first.name, second.name)] = float(max(spread.max(), 1 / spread.min()))
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            shape2 = (1, -1) + (1,) * (w2.ndim - 2)
            _store(tensors[first.input[1]], w1 / scale.reshape(shape1))
            _store(tensors[second.input[1]], w2 * scale.reshape(shape2))
            if bias is not None:
                _store(tensors[first.input[2]], bias / scale)
    return [EqualizedPair(a, b, round(s, 3)) for (a, b), s in largest.items()]


def _store(tensor: "onnx.TensorProto", values: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
