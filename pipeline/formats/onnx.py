"""ONNX helpers shared by export, quantize, the runtimes and serving: metadata_props, the data
input, the symbolic batch axis, and the input/output contract a server needs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError

if TYPE_CHECKING:
    import onnx


def set_metadata(proto: "onnx.ModelProto", metadata: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = proto.producer_name or "pipeline"


def name_batch_axis(proto: "onnx.ModelProto", name: str = "batch") -> None:
    """Call the input's symbolic batch dimension ``batch`` everywhere it appears (an exported
    program names it after its symbol, e.g. ``s77``), as Triton configs and readers expect."""
    graph = proto.graph
    first = graph_input(graph).type.tensor_type.shape.dim
    old = first[0].dim_param if first else ""
    if not old or old == name:
        return
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = name


def graph_input(graph: "onnx.GraphProto") -> "onnx.ValueInfoProto":
    """The model's data input: the first graph input that is not an initializer."""
    initializers = {t.name for t in graph.initializer}
    return next(i for i in graph.input if i.name not in initializers)


def read_onnx_metadata(path: Path | str) -> dict[str, str]:
    """The metadata_props of an ONNX file; a file that is not ONNX is an input error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {str(path)!r} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError or others on garbage
        raise InputError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__}); "
                         f"give a .onnx file written by `python -m pipeline export`") from None
    if not proto.graph.node:
        raise InputError(f"{str(path)!r} is not an ONNX model (it has no graph nodes)")
    return {p.key: p.value for p in proto.metadata_props}


def io_spec(model: Path) -> dict[str, Any]:
    """Input/output names, dims without the batch axis, and whether the batch axis is dynamic."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    first, out = graph_input(graph), graph.output[0]

    def dims(value: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    in_dims, out_dims = dims(first), dims(out)
    dynamic = bool(in_dims) and isinstance(in_dims[0], str)
    if not dynamic:
        raise InputError(f"{model.name} has a fixed batch axis ({in_dims[0]}); Triton batching needs "
                         f"the dynamic one that python -m pipeline export writes")
    if elem_type(first) != 1 or elem_type(out) != 1:
        raise InputError(f"{model.name}: input and output must be float32 (this one is not)")
    return {"input": first.name, "input_dims": in_dims[1:], "output": out.name,
            "output_dims": out_dims[1:]}


def elem_type(value: Any) -> int:
    return value.type.tensor_type.elem_type
