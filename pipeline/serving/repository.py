"""Triton model repositories: ``deploy triton``'s, for a standalone Triton, and ``serve``'s own.

``deploy triton`` writes a standard repository for the ONNX Runtime backend:

    DIR/<name>/config.pbtxt     platform onnxruntime_onnx, batching, dynamic batching, instances
    DIR/<name>/1/model.onnx     the bundle's simplified model (or the variant the target needs)
    DIR/<name>/labels.txt       one class name per line (label_filename of the output)
    DIR/README.md               how to start tritonserver on it

The config is written in protobuf text format and reads back with Triton's own
``ModelConfig`` message (tests parse it with ``tritonclient``'s ``model_config_pb2``).

``serve`` starts the Triton that PyTriton bundles on a repository of its own
(``served_repository``): the same batching and tensors, run by Triton's Python backend through
``pipeline.serving.backend``, so that the bundle's file runs in the runtime and precision the
rest of the pipeline measured.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.bundle import (
    LATENCY,
    ONNX_INT8,
    Bundle,
    atomic_path,
    ensure_writable_dir,
)
from pipeline.core.records import LatencyDoc, ModelSection, TritonRepository
from pipeline.errors import InputError
from pipeline.formats.onnx import io_spec
from pipeline.options import ServeOptions, TritonOptions
from pipeline.runtimes.triton import ServedModel
from pipeline.serving.backend import PARAMETERS
from pipeline.serving.guard import default_limit


def preferred_batch_sizes(bundle: Bundle, max_batch: int) -> list[int]:
    """Batch sizes the bench sweep measured on this machine (above 1, within max_batch)."""
    try:
        rows = LatencyDoc.load(bundle.path(LATENCY)).rows
    except InputError:  # no sweep yet, or one this version cannot read
        return []
    sizes = {r.batch for r in rows if r.ok and r.backend.startswith("ort-")}
    return sorted(size for size in sizes if 1 < size <= max_batch)


def _model_for(bundle: Bundle, options: TritonOptions) -> tuple[Path, str]:
    """The ONNX file to serve and the TensorRT precision (GPU target) it is meant for."""
    if options.target == "cpu":
        return bundle.path(bundle.fp32_onnx()), "fp32"
    precision = options.precision
    if precision is None:  # the best variant the bundle has, for the GPU
        precision = "fp16"
    if precision == "int8":
        if not bundle.path(ONNX_INT8).is_file():
            raise InputError(f"{bundle.root} has no {ONNX_INT8} for a TensorRT int8 target; make it "
                             f"with: python -m pipeline quantize {bundle.root} --precision int8")
        return bundle.path(ONNX_INT8), "int8"
    # TensorRT builds its fp16 engine from the fp32 graph (an fp16 ONNX would add casts).
    return bundle.path(bundle.fp32_onnx()), precision


def _dims(values: Any) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _model_lines(head: list[str], max_batch_size: int, tensors: tuple[str, list[int], str, list[int]],
                 preferred: list[int], queue_delay_us: int, instances: int, kind: str,
                 label_file: str | None = None) -> list[str]:
    """What every config.pbtxt here has: batching, the input and output, dynamic batching and
    the instances, after the lines that say what runs the model (``head``)."""
    input_name, input_dims, output_name, output_dims = tensors
    lines = [*head, f"max_batch_size: {max_batch_size}",
             "input [", "  {", f'    name: "{input_name}"', "    data_type: TYPE_FP32",
             f"    dims: {_dims(input_dims)}", "  }", "]",
             "output [", "  {", f'    name: "{output_name}"', "    data_type: TYPE_FP32",
             f"    dims: {_dims(output_dims)}"]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    lines += ["  }", "]", "dynamic_batching {"]
    if preferred:
        lines.append(f"  preferred_batch_size: {_dims(preferred)}")
    lines += [f"  max_queue_delay_microseconds: {queue_delay_us}", "}",
              "instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]"]
    return lines


def config_text(name: str, spec: dict[str, Any], options: TritonOptions, preferred: list[int],
                precision: str) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig message)."""
    lines = _model_lines([f'name: "{name}"', 'platform: "onnxruntime_onnx"'], options.max_batch_size,
                         (spec["input"], spec["input_dims"], spec["output"], spec["output_dims"]),
                         preferred, options.queue_delay_us, options.instances,
                         "KIND_GPU" if options.target == "gpu" else "KIND_CPU", "labels.txt")
    if options.threads is not None:  # the ONNX Runtime backend's session threads
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: '
                     f'"{options.threads}" }} }}')
    if options.target == "gpu":
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator [",
                  "      {", '        name: "tensorrt"',
                  f'        parameters {{ key: "precision_mode" value: "{precision.upper()}" }}',
                  '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
                  '        parameters { key: "trt_engine_cache_enable" value: "1" }',
                  "      }", "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def served_config_text(model: ServedModel, options: ServeOptions, preferred: list[int]) -> str:
    """config.pbtxt for ``serve``: Triton's Python backend runs ``pipeline.serving.backend`` on
    the model file (see its ``PARAMETERS``)."""
    values = {"model_file": str(model.model_file.resolve()), "precision": options.precision,
              "threads": "" if options.threads is None else str(options.threads)}
    lines = _model_lines([f'name: "{model.name}"', 'backend: "python"'], options.max_batch_size,
                         (model.input_name, list(model.input_shape), model.output_name,
                          [model.classes]),
                         preferred, options.queue_delay_us, options.instances, "KIND_CPU")
    lines += [f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(values[key])} }} }}'
              for key in PARAMETERS]
    return "\n".join(lines) + "\n"


def served_repository(root: Path, model: ServedModel, options: ServeOptions,
                      preferred: list[int]) -> Path:
    """The model repository ``serve`` starts Triton on, in ``root`` (a folder of its own)."""
    folder = root / model.name
    (folder / "1").mkdir(parents=True)
    package_parent = Path(__file__).resolve().parents[2]  # the folder that holds pipeline/
    (folder / "1" / "model.py").write_text(
        "# Written by `python -m pipeline serve`: Triton's Python backend runs this model.\n"
        "import sys\n\n"
        f"sys.path.insert(0, {json.dumps(str(package_parent))})\n\n"
        "from pipeline.serving.backend import TritonPythonModel  # noqa: E402,F401\n",
        encoding="utf-8")
    (folder / "config.pbtxt").write_text(served_config_text(model, options, preferred),
                                         encoding="utf-8")
    return root


def triton_repository(bundle_dir: Path | str, out: Path | str,
                      options: TritonOptions = TritonOptions()) -> TritonRepository:
    """Write the model repository; returns what was written."""
    options.check()
    bundle = Bundle.open(Path(bundle_dir))
    manifest = bundle.read_manifest()
    bundle.require_export(manifest)
    section = ModelSection.of(manifest, str(bundle.manifest_path))
    model, precision = _model_for(bundle, options)
    bundle.check_integrity([model.name])  # never ship a file that changed since export
    spec = io_spec(model)
    name = options.name or re.sub(r"[^A-Za-z0-9_.-]", "_", section.arch)
    preferred = preferred_batch_sizes(bundle, options.max_batch_size)
    class_names = section.class_names
    if len(class_names) != (spec["output_dims"] or [0])[-1]:
        raise InputError(f"{bundle.root}: {len(class_names)} class names for "
                         f"{spec['output_dims']} outputs; re-export the bundle")
    root = ensure_writable_dir(Path(out))
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "1" / "model.onnx") as tmp:
        shutil.copyfile(model, tmp)
    with atomic_path(folder / "labels.txt") as tmp:
        tmp.write_text("".join(f"{label}\n" for label in class_names), encoding="utf-8")
    text = config_text(name, spec, options, preferred, precision)
    with atomic_path(folder / "config.pbtxt") as tmp:  # last: a repository with a config is complete
        tmp.write_text(text, encoding="utf-8")

    limit = default_limit(options.max_batch_size, tuple(spec["input_dims"]))
    readme = (f"# Triton model repository\n\nMade by `python -m pipeline deploy triton "
              f"{bundle.root} --out {root}` from {model.name} (sha256 "
              f"{manifest['artifacts'].get(model.name, {}).get('sha256', '?')}).\n\n"
              f"Start it with:\n\n    tritonserver --model-repository {root.resolve()}\n\n"
              f"or in a container: `docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v "
              f"{root.resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver "
              f"--model-repository=/models`.\n\n"
              f"Bound the request size. The largest valid binary request for this model is "
              f"{limit} bytes (max_batch_size {options.max_batch_size} x "
              f"{' x '.join(map(str, spec['input_dims']))} float32, plus 1 MiB for the JSON "
              f"header). Triton releases with `--http-max-input-size` (64 MiB by default) take "
              f"`--http-max-input-size={limit}`; older ones (2.51, which PyTriton 0.7.0 bundles, "
              f"has no such flag) read any body whole, so keep them behind a proxy with a body "
              f"limit. `python -m pipeline serve` does this for you.\n")
    with atomic_path(root / "README.md") as tmp:
        tmp.write_text(readme, encoding="utf-8")
    return TritonRepository(repository=str(root), model=name, config=str(folder / "config.pbtxt"),
                            onnx=model.name, precision=precision, target=options.target,
                            max_batch_size=options.max_batch_size,
                            preferred_batch_size=list(preferred))

