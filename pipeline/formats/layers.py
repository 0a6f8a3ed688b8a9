"""Which tensor of an artifact is which layer of the PyTorch model: the map ``verify
--localize`` compares through.

Two graphs of the same model rarely share tensor names (torch.export's training IR says
``conv2d``/``batch_norm``, the ONNX exporter's decomposed graph ``getitem``/``relu``, and the
exporter folds each BatchNorm into its Conv). What they share is the module each node came
from: torch.export records it in ``nn_module_stack``, and the ONNX exporter copies it into
each node's ``pkg.torch.onnx.name_scopes`` metadata. So a layer is keyed by
``(module path, k)``: the k-th time a tensor leaves that module (a node of the module whose
result is used outside it). ``layer1.0.relu`` is called twice in a BasicBlock and gives keys
``(layer1.0.relu, 0)`` and ``(layer1.0.relu, 1)``; a Conv with its BatchNorm folded in leaves
through ``layer1.0.bn1``, as the BatchNorm does in PyTorch.

onnxsim and the int8 quantizer drop node metadata but keep tensor names, so their layers are
read through the raw ``model.onnx`` beside them. In an int8 QDQ graph the layer's tensor is
its ``DequantizeLinear`` output: the value the next layer really consumes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import onnx

DEQUANTIZED = "_DequantizeLinear_Output"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class Layer:
    """One comparable tensor: its key, its name in the artifact, and names for people."""

    key: tuple[str, int]  # (module path, occurrence)
    tensor: str  # the artifact's tensor (ONNX) or node (fx) name
    node: str  # the artifact's node that makes it (ONNX node name, fx node name)
    op: str
    pytorch: str  # the layer in PyTorch terms, e.g. layer3.1.conv2 (folded with layer3.1.bn2)


def exits(nodes: Iterable[tuple[str, str, list[str], list[str]]],
          outputs: Iterable[str]) -> dict[str, tuple[str, int]]:
    """``(name, scope, inputs, outputs)`` nodes in topological order -> {tensor: (scope, k)}
    for every tensor that leaves its scope (used by another scope, or a graph output)."""
    nodes = list(nodes)
    scope_of = {out: scope for _, scope, _, outs in nodes for out in outs}
    leaves: set[str] = set(outputs)
    for _, scope, inputs, _ in nodes:
        leaves.update(t for t in inputs if t in scope_of and scope_of[t] != scope)
    counts: dict[str, int] = {}
    keys: dict[str, tuple[str, int]] = {}
    for _, scope, _, outs in nodes:
        for out in outs:
            if out in leaves and scope:
                keys[out] = (scope, counts.get(scope, 0))
                counts[scope] = counts.get(scope, 0) + 1
    return keys


# ----------------------------------------------------------------------------- torch.export
def fx_layers(graph_module: Any) -> list[Layer]:
    """The layers of a torch.export graph (``ExportedProgram.module()``), in graph order."""
    entries = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        scope = stack[-1][0] if stack else ""
        inputs = [a.name for a in node.all_input_nodes]
        entries.append((node.name, scope, inputs, [node.name]))
    outputs = [a.name for node in graph_module.graph.nodes if node.op == "output"
               for a in node.all_input_nodes]
    keys = exits(entries, outputs)
    ops = {n.name: str(getattr(n.target, "__name__", n.target)) for n in graph_module.graph.nodes}
    return [Layer(keys[name], name, name, ops[name], keys[name][0])
            for name, *_ in entries if name in keys]


# ----------------------------------------------------------------------------- ONNX
def _onnx_scope(node: "onnx.NodeProto") -> str:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # ['', 'layer1', 'layer1.0', 'layer1.0.bn1', '<fx node>']: the module is the
            # last entry before the fx node's own name.
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _weight_module(node: "onnx.NodeProto", initializers: set[str]) -> str | None:
    """``layer3.1.conv2`` for a Conv/Gemm whose weight is ``layer3.1.conv2.weight``."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    weight = node.input[1].removesuffix(DEQUANTIZED)
    if weight in initializers and weight.endswith(".weight"):
        return weight.removesuffix(".weight")
    return None


def onnx_layers(source: "onnx.ModelProto", candidate: "onnx.ModelProto | None" = None) -> list[Layer]:
    """The layers of ``candidate`` (default ``source``), keyed through ``source``: the raw
    exporter output, whose nodes carry their PyTorch module. A tensor missing from the
    candidate (fused away) is not a layer of it; in a QDQ graph the dequantized tensor is."""
    graph = source.graph
    initializers = {i.name for i in graph.initializer}
    entries = [(n.name, _onnx_scope(n), list(n.input), list(n.output)) for n in graph.node]
    keys = exits(entries, [o.name for o in graph.output])
    producer = {out: n for n in graph.node for out in n.output}
    target = candidate if candidate is not None else source
    made = {out: n for n in target.graph.node for out in n.output}
    target_initializers = {i.name for i in target.graph.initializer}
    layers = []
    for tensor, key in keys.items():
        name = tensor + DEQUANTIZED if tensor + DEQUANTIZED in made else tensor
        if name not in made:
            continue
        node = made[tensor] if tensor in made else made[name]
        module = key[0]
        weight = (_weight_module(node, target_initializers | initializers)
                  or _weight_module(producer[tensor], initializers))
        pytorch = module if not weight or weight == module else f"{weight} (folded with {module})"
        layers.append(Layer(key, name, node.name, node.op_type, pytorch))
    order = {out: i for i, n in enumerate(target.graph.node) for out in n.output}
    return sorted(layers, key=lambda layer: order[layer.tensor])


def has_scopes(proto: "onnx.ModelProto") -> bool:
    """Did the exporter record PyTorch modules in this graph (the dynamo exporter does)?"""
    return any(p.key == SCOPES_KEY for n in proto.graph.node for p in n.metadata_props)


def with_outputs(proto: "onnx.ModelProto", tensors: list[str]) -> "onnx.ModelProto":
    """A copy of ``proto`` that also returns ``tensors`` (as Polygraphy's mark-all does)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy
