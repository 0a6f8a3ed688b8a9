"""Client errors are 4xx: inference requests checked against the served model's contract.

The Triton that PyTriton 0.7 bundles (2.51) answers a malformed request 500 (``failed to parse
the request JSON buffer``, ``Unable to parse 'data': Shape does not match``). A 5xx says the
server failed: clients and proxies retry it, load balancers count it against the server's
health, alerts page someone. So the fronts check each inference request before Triton sees it,
against what the model declares (one FP32 input ``[batch, 3, H, W]`` with batch up to
``max_batch_size``, one output), and answer as KServe's v2 protocol does, with a message naming
the field:

- **400 Bad Request**: the body cannot be read: not JSON, not an object, a bad
  ``Inference-Header-Content-Length``, binary tensor sizes that do not add up;
- **422 Unprocessable Content**: a well-formed request this model cannot take: an unknown or
  missing input, an unknown output, the wrong datatype, shape or batch, data of the wrong size.

Over gRPC the same checks answer ``INVALID_ARGUMENT``. Whatever Triton still answers 5xx is
passed on, except the answers in ``CLIENT_FAULTS``, whose messages prove the client's fault.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")
HEADER_LENGTH = "inference-header-content-length"

# Triton 2.51's own answers that are the client's fault, and the status they deserve. Matched
# against the message of a 5xx answer (HTTP) or an INTERNAL/UNKNOWN status (gRPC); keep every
# entry tested with Triton's real message (tests/serving/test_client_errors.py).
CLIENT_FAULTS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"failed to parse the request JSON buffer"), 400),
    (re.compile(r"Unable to parse '(data|inputs|outputs|shape|datatype)'"), 422),
    (re.compile(r"unexpected (datatype|shape|number of inputs)"), 422),
    (re.compile(r"input byte size mismatch|unexpected total byte size"), 400),
    (re.compile(r"expected \d+ inputs but got \d+"), 422),
    (re.compile(r"(unknown|unexpected) (input|output)"), 422),
    (re.compile(r"batch-size must be <="), 422),
)


@dataclass(frozen=True)
class Contract:
    """What the served model takes and gives."""

    model: str
    input: str
    output: str
    shape: tuple[int, ...]  # one sample, without the batch axis
    max_batch: int
    datatype: str = "FP32"

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * 4


class ClientError(Exception):
    """A request the server cannot accept: its HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def client_fault(message: str) -> int | None:
    """The 4xx status for a Triton error message that proves the client's fault, or None."""
    for pattern, status in CLIENT_FAULTS:
        if pattern.search(message):
            return status
    return None


def check_http(method: str, path: str, headers: dict[str, str], body: bytes,
               contract: Contract) -> None:
    """Raise ``ClientError`` for an inference request this model cannot take; anything that
    is not an inference request passes (Triton answers health and metadata itself)."""
    match = INFER_PATH.match(path)
    if method != "POST" or not match:
        return
    if match.group("model") != contract.model:
        return  # Triton's own 404 names the models it has
    lowered = {k.lower(): v for k, v in headers.items()}
    header_bytes, binary = body, b""
    if HEADER_LENGTH in lowered:
        try:
            length = int(lowered[HEADER_LENGTH])
        except ValueError:
            raise ClientError(400, f"Inference-Header-Content-Length "
                                   f"{lowered[HEADER_LENGTH]!r} is not a number") from None
        if not 0 <= length <= len(body):
            raise ClientError(400, f"Inference-Header-Content-Length {length} does not fit the "
                                   f"{len(body)}-byte body")
        header_bytes, binary = body[:length], body[length:]
    try:
        request = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"the request body is not valid JSON ({exc}); send a KServe v2 "
                               f"inference request") from None
    check_request(request, binary, contract)


def check_request(request: Any, binary: bytes, contract: Contract) -> None:
    """The JSON part of a v2 inference request (and its binary tensors)."""
    if not isinstance(request, dict):
        raise ClientError(400, "the request must be a JSON object with an 'inputs' list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ClientError(422, f"'inputs' must be a non-empty list; this model takes one input, "
                               f"{contract.input!r}")
    offset = 0
    seen = set()
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise ClientError(422, f"{where} must be an object with name, datatype, shape and data")
        name = tensor.get("name")
        if name != contract.input:
            raise ClientError(422, f"{where}: unknown input {name!r}; this model takes "
                                   f"{contract.input!r}")
        if name in seen:
            raise ClientError(422, f"{where}: input {name!r} is given twice")
        seen.add(name)
        datatype = tensor.get("datatype")
        if datatype != contract.datatype:
            raise ClientError(422, f"{where}: input {name!r} has datatype {datatype!r}; this "
                                   f"model takes {contract.datatype}")
        shape = _shape(tensor.get("shape"), where, name, contract)
        count = math.prod(shape)
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ClientError(422, f"{where}: 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ClientError(400, f"{where}: binary_data_size {size!r} is not a byte count")
            if size != count * 4:
                raise ClientError(422, f"{where}: binary_data_size {size} does not match shape "
                                       f"{shape} as FP32 ({count * 4} bytes)")
            if offset + size > len(binary):
                raise ClientError(400, f"{where}: the binary tensor is truncated: "
                                       f"{len(binary) - offset} of {size} bytes after the JSON "
                                       f"header")
            offset += size
        elif "data" not in tensor:
            raise ClientError(422, f"{where}: input {name!r} has no 'data' (or binary_data_size)")
        else:
            given = _count(tensor["data"])
            if given != count:
                raise ClientError(422, f"{where}: 'data' holds {given} values; shape {shape} needs "
                                       f"{count}")
    if offset != len(binary):
        raise ClientError(400, f"{len(binary) - offset} bytes after the binary tensors belong to "
                               f"no input")
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ClientError(422, "'outputs' must be a list")
        for index, wanted in enumerate(outputs):
            out_name = wanted.get("name") if isinstance(wanted, dict) else None
            if out_name != contract.output:
                raise ClientError(422, f"outputs[{index}]: unknown output {out_name!r}; this "
                                       f"model gives {contract.output!r}")


def _shape(value: Any, where: str, name: str, contract: Contract) -> list[int]:
    expected = ["batch", *contract.shape]
    if (not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in value)):
        raise ClientError(422, f"{where}: 'shape' must be a list of integers, {expected}")
    if len(value) != len(expected) or list(value[1:]) != list(contract.shape):
        raise ClientError(422, f"{where}: input {name!r} has shape {value}; this model takes "
                               f"{expected}")
    if not 1 <= value[0] <= contract.max_batch:
        raise ClientError(422, f"{where}: batch {value[0]} is outside 1..{contract.max_batch} "
                               f"(the server's max_batch_size)")
    return value


def _count(data: Any) -> int:
    """Values in a (possibly nested) JSON list; a scalar counts as one."""
    if isinstance(data, list):
        return sum(_count(item) for item in data)
    return 1


# ----------------------------------------------------------------------------- gRPC
def check_grpc_infer(raw: bytes, contract: Contract) -> None:
    """A ``ModelInferRequest`` in protobuf bytes: ``ClientError`` (sent as INVALID_ARGUMENT)
    when this model cannot take it."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise ClientError(400, f"the request is not a ModelInferRequest ({exc})") from None
    if request.model_name != contract.model:
        return
    if not request.inputs:
        raise ClientError(422, f"'inputs' is empty; this model takes {contract.input!r}")
    raw_contents = list(request.raw_input_contents)
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}]"
        if tensor.name != contract.input:
            raise ClientError(422, f"{where}: unknown input {tensor.name!r}; this model takes "
                                   f"{contract.input!r}")
        if tensor.datatype != contract.datatype:
            raise ClientError(422, f"{where}: input {tensor.name!r} has datatype "
                                   f"{tensor.datatype!r}; this model takes {contract.datatype}")
        shape = _shape([int(v) for v in tensor.shape], where, tensor.name, contract)
        need = math.prod(shape) * 4
        if raw_contents:
            if index >= len(raw_contents):
                raise ClientError(400, f"{where}: no raw_input_contents for it")
            if len(raw_contents[index]) != need:
                raise ClientError(400, f"{where}: raw_input_contents holds "
                                       f"{len(raw_contents[index])} bytes; shape {shape} as FP32 "
                                       f"needs {need}")
        elif len(tensor.contents.fp32_contents) != math.prod(shape):
            raise ClientError(422, f"{where}: contents hold {len(tensor.contents.fp32_contents)} "
                                   f"FP32 values; shape {shape} needs {math.prod(shape)}")
    for index, wanted in enumerate(request.outputs):
        if wanted.name != contract.output:
            raise ClientError(422, f"outputs[{index}]: unknown output {wanted.name!r}; this "
                                   f"model gives {contract.output!r}")
