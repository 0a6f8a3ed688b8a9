"""Export a model into a bundle: TorchScript (trace + freeze), ONNX, simplified ONNX.

Order matters for safety: the stage first forgets its old artifacts, then writes each file
atomically, and writes the manifest last. An interrupted export therefore leaves either no
manifest entry for a file or a hash that no longer matches, and ``verify`` rejects both.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pipeline.core.bundle import (
    AOTI_FILES,
    DERIVED_FROM_EXPORT,
    EXPORT_FILES,
    EXPORT_LOG,
    ONNX,
    ONNX_SIMPLIFIED,
    PARITY,
    PT2,
    TORCHSCRIPT,
    WEIGHTS,
    Bundle,
    ensure_writable_dir,
    save_atomic,
    write_text_atomic,
)
from pipeline.core.console import Captured, StageTimer, captured
from pipeline.core.machine import library_versions
from pipeline.core.records import AotiPackage, ExportSection, Pt2Export, Simplification
from pipeline.errors import InputError
from pipeline.formats.onnx import name_batch_axis, set_metadata
from pipeline.formats.pt2 import (
    MAX_BATCH,
    compile_aoti,
    export_program,
    reload_difference,
    require_compiler,
    save_program,
)
from pipeline.models.weights import LoadedModel
from pipeline.options import ExportOptions
from pipeline.runtimes.base import use_strict_fp32
from pipeline.version import __version__

if TYPE_CHECKING:
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The example batch is 2, not 1: torch.export specialises dimensions of size 1.
EXAMPLE_BATCH = 2


def opset_range(exporter: str) -> tuple[int, int]:
    """The opsets each exporter really produces (dynamo silently raises anything below 18)."""
    try:
        from torch.onnx import _constants as limits

        legacy = (limits.ONNX_MIN_OPSET, limits.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
        dynamo_max = limits.ONNX_MAX_OPSET
    except (ImportError, AttributeError):
        legacy, dynamo_max = (7, 20), 23
    return (18, dynamo_max) if exporter == "dynamo" else legacy


def check_options(options: ExportOptions) -> None:
    """The values, then what they need from this machine: a C++ compiler for --aoti, an
    opset the chosen exporter of this torch really writes."""
    options.check()
    if options.aoti:
        require_compiler()  # before any file is touched: exit 3, bundle unchanged
    low, high = opset_range(options.exporter)
    if not low <= options.opset <= high:
        hint = " (or --exporter legacy for older opsets)" if options.exporter == "dynamo" else ""
        raise InputError(f"--opset {options.opset} is outside what the {options.exporter} "
                         f"exporter supports: {low}..{high}; choose one in that range{hint}")


def example_input(size: int, batch: int = EXAMPLE_BATCH, seed: int = 0) -> "torch.Tensor":
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def save_weights(loaded: LoadedModel, path: Path) -> None:
    """Keep the PyTorch weights in checkpoint form so ``verify`` can rebuild the eager model."""
    import torch

    payload = {"state_dict": loaded.model.state_dict(), "arch": loaded.arch,
               "num_classes": loaded.num_classes, "class_names": loaded.class_names,
               "preprocessing": loaded.preprocessing.to_dict()}
    save_atomic(path, lambda tmp: torch.save(payload, tmp))


def trace_torchscript(model: "torch.nn.Module", example: "torch.Tensor", path: Path) -> float:
    """Trace, freeze and save; reload and return the largest difference at another batch size."""
    import torch

    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, example))
        save_atomic(path, lambda tmp: torch.jit.save(frozen, str(tmp)))
        reloaded = torch.jit.load(str(path), map_location="cpu")
        probe = example_input(example.shape[-1], batch=EXAMPLE_BATCH + 1, seed=1)
        return float((reloaded(probe) - model(probe)).abs().max())


def _torch_onnx_export(model: "torch.nn.Module", example: "torch.Tensor", path: Path,
                       options: ExportOptions,
                       program: "torch.export.ExportedProgram | None" = None) -> None:
    import torch

    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  opset_version=options.opset)
    if options.exporter == "dynamo" and program is not None:
        # The program model.pt2 came from, dynamic batch and all: no second torch.export.
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, **common)
        onnx_program.save(str(path), external_data=False)
    elif options.exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        program = torch.onnx.export(model, (example,), dynamo=True,
                                    dynamic_shapes=({0: batch},), **common)
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True, **common)


def write_program(program: "torch.export.ExportedProgram", loaded: LoadedModel,
                  example: "torch.Tensor", path: Path, options: ExportOptions) -> Pt2Export:
    """model.pt2 with the ONNX file's metadata in extra_files; loaded back the safe way and
    compared with the eager model at another batch size."""
    save_program(program, path, onnx_metadata(loaded, options))
    probe = example_input(example.shape[-1], batch=EXAMPLE_BATCH + 1, seed=1)
    return Pt2Export(enabled=True, dynamic_batch={"min": 1, "max": MAX_BATCH},
                     reload_max_abs_diff=reload_difference(path, loaded.model, probe))


def aoti_devices() -> list[str]:
    """The CPU always; CUDA too when torch sees a GPU."""
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def write_aoti(loaded: LoadedModel, example: "torch.Tensor", path: Path, device: str, *,
               program: "torch.export.ExportedProgram | None" = None) -> AotiPackage:
    """An AOTInductor package for ``device``, from ``program`` or a fresh torch.export on it."""
    import copy

    if device == "cuda":
        use_strict_fp32()  # Inductor's matmul and convolution choices follow these flags
    if program is None:
        model = loaded.model if device == "cpu" else copy.deepcopy(loaded.model).to(device)
        program = export_program(model, example.to(device))
    return compile_aoti(program, path, device)


def onnx_metadata(loaded: LoadedModel, options: ExportOptions) -> dict[str, str]:
    """What someone holding only the .onnx file needs to preprocess and label correctly."""
    prep = loaded.preprocessing
    return {
        "arch": loaded.arch,
        "num_classes": str(loaded.num_classes),
        "class_names": json.dumps(loaded.class_names),
        "input_size": str(prep.crop),
        "preprocessing": json.dumps(prep.to_dict()),
        "resize": str(prep.resize),
        "crop": str(prep.crop),
        "mean": json.dumps(list(prep.mean)),
        "std": json.dumps(list(prep.std)),
        "weights": json.dumps(loaded.weights),
        "exporter": options.exporter,
        "pipeline_version": __version__,
    }


def export_onnx(loaded: LoadedModel, example: "torch.Tensor", path: Path,
                options: ExportOptions, *,
                program: "torch.export.ExportedProgram | None" = None) -> int:
    """Export, stamp metadata, run the full checker, save atomically; return the node count."""
    import onnx

    raw = path.with_name(f".{path.name}.export.tmp")
    try:
        _torch_onnx_export(loaded.model, example, raw, options, program)
        proto = onnx.load(str(raw))
    finally:
        raw.unlink(missing_ok=True)
    set_metadata(proto, onnx_metadata(loaded, options))
    name_batch_axis(proto)

    def save_checked(tmp: Path) -> None:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)

    save_atomic(path, save_checked)
    return len(proto.graph.node)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), so
    each stage starts from the memory the model needs rather than the last stage's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def weights_offloaded(model: "torch.nn.Module", saved: Path) -> Iterator[None]:
    """Free the model's tensors while something else needs the memory, then reload them.

    The weights are already in ``saved`` (weights.pt), so nothing is lost: onnxsim's check,
    the peak of the export, runs without a second resident copy of a ResNet-152's 240 MB.
    """
    import torch

    model.to("meta")
    release_memory()
    try:
        yield
    finally:
        model.to_empty(device="cpu")
        state = torch.load(saved, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        model.eval()


def simplify_onnx(source: Path, target: Path) -> Simplification:
    """Run onnxsim; on failure keep the raw model and return the reason as a warning."""
    import onnx

    proto = onnx.load(str(source))
    info = Simplification(enabled=True, nodes_before=len(proto.graph.node))
    try:
        import onnxsim
    except ImportError as exc:  # a core dependency, but an install can still lack it
        info.warning = (f"onnxsim is not installed ({exc}); raw model kept: "
                        f"pip install onnxsim, or export with --no-simplify")
        return info
    metadata = {p.key: p.value for p in proto.metadata_props}
    del proto  # onnxsim reads the file itself; one copy fewer of the weights in memory
    release_memory()
    try:
        simplified, check_ok = onnxsim.simplify(str(source), check_n=3)
    except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++; any is a skip
        info.warning = f"onnxsim failed, raw model kept: {type(exc).__name__}: {exc}"
        return info
    info.check_ok = bool(check_ok)
    if not check_ok:
        info.warning = "onnxsim's own check failed; simplified model discarded, raw model kept"
        return info
    set_metadata(simplified, metadata)
    save_atomic(target, lambda tmp: onnx.save(simplified, str(tmp)))
    info.nodes_after = len(simplified.graph.node)
    return info


def export_bundle(loaded: LoadedModel, out: Path | str, options: ExportOptions,
                  timer: StageTimer | None = None) -> Bundle:
    """Write every export artifact and the manifest into ``out``; returns the bundle."""
    check_options(options)
    timer = timer or StageTimer()
    bundle = Bundle(ensure_writable_dir(Path(out)))
    # Variants made from the old models and results measured on them would now describe
    # models that no longer exist: they go with the old export.
    bundle.forget_stage(EXPORT_FILES + DERIVED_FROM_EXPORT, sections=("quantize",),
                        stages=("quantize", "bench", "verify"))
    start = time.perf_counter()
    example = example_input(loaded.preprocessing.crop)
    logs: list[tuple[str, Captured]] = []
    warnings: list[str] = []

    with timer.stage("weights") as step:
        save_weights(loaded, bundle.path(WEIGHTS))
        step["text"] = WEIGHTS
    # One torch.export serves model.pt2, the dynamo ONNX export and the CPU AOTInductor
    # package; it shares the model's weights, and goes before onnxsim moves them off.
    program, pt2_record = None, Pt2Export(enabled=False)
    if options.pt2:
        with timer.stage("pt2") as step, captured(passthrough=options.verbose) as chatter:
            program = export_program(loaded.model, example)
            pt2_record = write_program(program, loaded, example, bundle.path(PT2), options)
            step["text"] = (f"{PT2} (torch.export, dynamic batch, reload max |diff| "
                            f"{pt2_record.reload_max_abs_diff:.2e})")
        logs.append(("pt2", chatter))
    with timer.stage("onnx") as step, captured(passthrough=options.verbose) as chatter:
        nodes = export_onnx(loaded, example, bundle.path(ONNX), options, program=program)
        step["text"] = f"{ONNX} ({options.exporter}, opset {options.opset}, {nodes} nodes, checked)"
    logs.append(("onnx", chatter))
    aoti_record: dict[str, AotiPackage] = {}
    if options.aoti:
        for device in aoti_devices():
            with timer.stage(f"aoti-{device}") as step, captured(passthrough=options.verbose) as chatter:
                aoti_record[device] = write_aoti(loaded, example, bundle.path(AOTI_FILES[device]),
                                                 device, program=program if device == "cpu" else None)
                step["text"] = (f"{AOTI_FILES[device]} (AOTInductor, {aoti_record[device].compile_s:.1f} s "
                                f"with {aoti_record[device].compiler})")
            logs.append((f"aoti-{device}", chatter))
    del program
    release_memory()
    simplify_info = Simplification(enabled=False)
    if options.simplify:
        with timer.stage("simplify") as step, captured(passthrough=options.verbose) as chatter:
            with weights_offloaded(loaded.model, bundle.path(WEIGHTS)):
                simplify_info = simplify_onnx(bundle.path(ONNX), bundle.path(ONNX_SIMPLIFIED))
            step["text"] = _simplify_summary(simplify_info)
        logs.append(("simplify", chatter))
        if simplify_info.warning:
            warnings.append(simplify_info.warning)

    # TorchScript last: its trace and freeze leave the heap larger, and onnxsim's check (two
    # ORT sessions) is the peak of the whole export; run that peak from the smaller heap.
    with timer.stage("torchscript") as step, captured(passthrough=options.verbose) as chatter:
        ts_diff = trace_torchscript(loaded.model, example, bundle.path(TORCHSCRIPT))
        step["text"] = f"{TORCHSCRIPT} (reload max |diff| {ts_diff:.2e})"
    logs.append(("torchscript", chatter))
    release_memory()
    write_text_atomic(bundle.path(EXPORT_LOG), _format_log(logs))
    export_record = ExportSection(
        exporter=options.exporter, opset=options.opset, input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        dynamic_axes={INPUT_NAME: {"0": "batch"}, OUTPUT_NAME: {"0": "batch"}},
        onnx_nodes=nodes, torchscript_reload_max_abs_diff=ts_diff, simplify=simplify_info,
        pt2=pt2_record, aoti=aoti_record, captured_warnings=_captured_warnings(logs))
    _write_export_manifest(bundle, loaded, export_record, warnings,
                           {"duration_s": round(time.perf_counter() - start, 3),
                            "steps": dict(timer.durations)})
    return bundle


def _simplify_summary(info: Simplification) -> str:
    if info.warning:
        return f"skipped: {info.warning[:120]}"
    return (f"{ONNX_SIMPLIFIED} (nodes {info.nodes_before} -> {info.nodes_after}, "
            f"onnxsim check {'ok' if info.check_ok else 'FAILED'})")


def _captured_warnings(logs: list[tuple[str, Captured]]) -> list[str]:
    return [f"{step}: {message}" for step, chatter in logs for message in chatter.warnings]


def _format_log(logs: list[tuple[str, Captured]]) -> str:
    parts = []
    for step, chatter in logs:
        parts.append(f"===== {step} =====\n{chatter.text}")
        parts.extend(f"warning: {message}" for message in chatter.warnings)
    return "\n".join(parts) + "\n"


def _write_export_manifest(bundle: Bundle, loaded: LoadedModel, export_record: ExportSection,
                           warnings: list[str], stage: dict[str, object]) -> None:
    bundle.record_stage("export", files=[n for n in EXPORT_FILES if n != PARITY],  # verify's
                        summary=stage, warnings=warnings,
                        sections={"model": loaded.describe(), "export": export_record.to_dict(),
                                  "versions": library_versions()})
