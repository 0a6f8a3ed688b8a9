"""Reduced-precision variants of the exported fp32 ONNX model: int8 (static QDQ) and fp16.

int8, with ``onnxruntime.quantization``:

- ``quant_pre_process`` first (shape inference and graph optimisation for the quantizer);
- QDQ format with per-channel weights, which every runtime that reads int8 ONNX understands
  (ONNX Runtime, OpenVINO, TensorRT);
- unsigned 8-bit activations with signed 8-bit weights (U8S8). On x86 that is the fast pair:
  VNNI's ``vpdpbusd`` multiplies u8 by s8, and ORT's MLAS kernels are built around it. S8S8 was
  measured 3.6x slower than U8S8 on a Xeon with VNNI (issue 7), because MLAS shifts s8
  activations to u8 on every call;
- calibration ``minmax`` by default, ``entropy`` or ``percentile`` on request, on images
  preprocessed exactly as the bundle's metadata says.

fp16 converts weights and compute to float16 and keeps fp32 inputs and outputs
(``keep_io_types``), so callers feed the same arrays; ONNX Runtime's converter keeps its block
list of ops that must stay fp32 (Resize among them, whose scales must stay float).

A failure at any point leaves neither the variant nor a manifest entry for it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core import machine
from pipeline.core.bundle import (
    CALIBRATION,
    ONNX_FP16,
    ONNX_INT8,
    Bundle,
    save_atomic,
    sha256_of,
)
from pipeline.core.console import captured
from pipeline.core.records import CalibrationRecord, ModelSection, QuantizedVariant, TrainSection
from pipeline.data.datasets import (
    SYNTHETIC_CLASSES,
    labelled_folder,
    preprocess_samples,
    recorded_split,
    synthetic_samples,
)
from pipeline.data.images import find_images
from pipeline.errors import InputError
from pipeline.formats.onnx import graph_input, set_metadata
from pipeline.models.archs import Preprocessing
from pipeline.options import QuantizeOptions

MIN_CALIBRATION_IMAGES = 100
CALIBRATION_BATCH = 16
SYNTHETIC_CALIBRATION_SEED = 10_007  # not a training seed: synthetic calibration never repeats val
ACTIVATION_TYPE, WEIGHT_TYPE = "QUInt8", "QInt8"
# ORT's quantizer handles opsets 10 and up; QDQ with per-channel axes needs 13.
MIN_QUANT_OPSET = 13


@dataclass
class Calibration:
    batch: np.ndarray
    source: str
    split: str | None  # "train" when it is the recorded training split
    files_sha256: list[str] | None
    repair: "Calibration | None" = None  # --repair-images, once read

    def record(self, method: str, requested: int) -> CalibrationRecord:
        return CalibrationRecord(source=self.source, split=self.split, count=int(len(self.batch)),
                                 requested=requested, method=method,
                                 files_sha256=self.files_sha256)


# ----------------------------------------------------------------------------- calibration data
def calibration_images(bundle: Bundle, manifest: dict[str, Any], options: QuantizeOptions,
                       log: Callable[[str], None]) -> Calibration:
    """The calibration batch from a folder, the recorded training split, or synthetic shapes."""
    model = ModelSection.of(manifest, str(bundle.manifest_path))
    prep, names = Preprocessing.from_dict(model.preprocessing), model.class_names
    source = options.calibration
    trained = TrainSection.of(manifest) is not None
    if source is None:
        if not trained:
            raise InputError(f"{bundle.root} was not trained here, so there is no training split "
                             f"to calibrate on; give --calibration DIR (images like the ones it "
                             f"will see) or --calibration synthetic for an offline demo")
        source = "train"
    rng = np.random.default_rng(options.seed)
    if source == "train":
        samples, _, what = recorded_split(manifest, "train", warn=log)
        split: str | None = "train"
    elif source == "synthetic":
        per_class = -(-options.count // len(SYNTHETIC_CLASSES))
        samples = synthetic_samples(per_class, SYNTHETIC_CALIBRATION_SEED + options.seed)
        what, split = f"synthetic shapes (seed {SYNTHETIC_CALIBRATION_SEED + options.seed})", None
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"--calibration {source!r} is not a folder; give an image folder, "
                             f"'train' (the bundle's training split) or 'synthetic'")
        _warn_on_foreign_classes(folder, names, log)
        samples = [(p, -1) for p in find_images([folder], what="--calibration")]
        what, split = f"image folder {folder}", None
    if len(samples) > options.count:
        keep = np.sort(rng.permutation(len(samples))[:options.count])
        samples = [samples[i] for i in keep]
    batch, _, bad = preprocess_samples(samples, prep)
    for reason in bad:
        log(f"warning: calibration skips {reason}")
    if not len(batch):
        raise InputError(f"--calibration {source!r}: none of the {len(samples)} files is a usable "
                         f"image; point it at a folder of images")
    if len(batch) < MIN_CALIBRATION_IMAGES:
        log(f"warning: calibrating on {len(batch)} images (fewer than {MIN_CALIBRATION_IMAGES}); "
            f"int8 ranges from few images are fragile, and verify's gate will tell")
    files = [sha256_of(Path(p)) for p, _ in samples if isinstance(p, (str, Path))] or None
    return Calibration(batch, what, split, files)


def _warn_on_foreign_classes(folder: Path, class_names: list[str], log: Callable[[str], None]) -> None:
    """Calibration needs representative pixels, not labels: class folders that are not the
    model's classes (a user's own photos for an ImageNet model) are worth a line, not a refusal."""
    subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
    if subfolders and labelled_folder(folder, class_names) is None:
        strangers = sorted(set(subfolders) - set(class_names))
        log(f"warning: --calibration {str(folder)!r} has class folders {', '.join(strangers[:5])}"
            f"{' ...' if len(strangers) > 5 else ''} that are not this model's classes; "
            f"calibrating on their pixels all the same (labels are not used)")


class _BatchReader:
    """``CalibrationDataReader`` over a preprocessed batch, in chunks of one size: the
    histogram calibrators (entropy, percentile) stack every chunk's activations into one
    array, which a shorter last chunk made ragged (a ValueError inside onnxruntime)."""

    def __init__(self, batch: np.ndarray, input_name: str) -> None:
        size = max(d for d in range(1, CALIBRATION_BATCH + 1) if len(batch) % d == 0)
        self.chunks = iter([{input_name: batch[i:i + size]} for i in range(0, len(batch), size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.chunks, None)


# ----------------------------------------------------------------------------- variants
def reduce_range_choice(requested: bool | None) -> tuple[bool, str]:
    """7-bit weights or 8? And why, for the manifest.

    Without VNNI, ORT's u8 x s8 kernels multiply with ``vpmaddubsw``, whose int16 pair sums
    saturate: the same QDQ model then loses accuracy on an AVX2 CPU that it keeps on a VNNI one
    (measured here: 2.5 points on an AVX2 Zen 3, where OpenVINO on the same file lost none).
    7-bit weights (``reduce_range``) cannot saturate. VNNI accumulates in int32 and needs no such
    sacrifice. The choice follows the CPU that quantizes, since it is usually the one that
    serves; ``verify`` gates the result on the CPU it runs on.
    """
    if requested is not None:
        return requested, "requested on the command line"
    if machine.cpu_has_fast_int8():
        return False, "this CPU has VNNI (int32 accumulation): full 8-bit weights"
    return True, ("this CPU lacks VNNI: 7-bit weights avoid the int16 saturation of "
                  "vpmaddubsw in ORT's AVX2 int8 kernels")


def quantize_int8(source: Path, target: Path, calibration: Calibration, method: str,
                  input_name: str, reduce_range: bool | None = None,
                  exclude: list[str] | None = None) -> QuantizedVariant:
    """Static QDQ int8 of ``source`` into ``target``; ``exclude`` names nodes kept in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    reader_type = type("Reader", (_BatchReader, CalibrationDataReader), {})
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    reduce, why_reduce = reduce_range_choice(reduce_range)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize.") as scratch:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(source), str(pre))
        save_atomic(target, lambda tmp: quantize_static(
            str(pre), str(tmp), reader_type(calibration.batch, input_name),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce,
            activation_type=getattr(QuantType, ACTIVATION_TYPE),
            weight_type=getattr(QuantType, WEIGHT_TYPE), calibrate_method=methods[method],
            nodes_to_exclude=list(exclude or []), extra_options={"CalibMovingAverage": False}))
    return QuantizedVariant(
        precision="int8", format="QDQ", per_channel=True, activations="uint8", weights="int8",
        why_u8s8="VNNI multiplies u8 x s8 natively and ORT's MLAS kernels expect it; S8S8 "
                 "measured 3.6x slower than U8S8 on a Xeon with VNNI",
        reduce_range=reduce, why_reduce_range=why_reduce,
        pre_process="onnxruntime.quantization.quant_pre_process", calibrate_method=method)


def convert_fp16(source: Path, target: Path) -> QuantizedVariant:
    import onnx
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    casts = sum(node.op_type == "Cast" for node in model.graph.node)
    save_atomic(target, lambda tmp: onnx.save(model, str(tmp)))
    return QuantizedVariant(
        precision="fp16", keep_io_types=True, cast_nodes=casts,
        fp32_ops_kept=sorted(set(DEFAULT_OP_BLOCK_LIST) & {n.op_type for n in model.graph.node}))


def _stamp(target: Path, source_meta: dict[str, str], variant: QuantizedVariant) -> None:
    """Carry the fp32 model's metadata (classes, preprocessing) and say what this file is."""
    import onnx

    model = onnx.load(str(target))
    set_metadata(model, {**source_meta, "precision": variant.precision,
                         "quantization": json.dumps(variant.stamp())})
    save_atomic(target, lambda tmp: onnx.save(model, str(tmp)))


def _source_facts(path: Path) -> tuple[int, str, dict[str, str]]:
    """(opset, input name, metadata_props) of the fp32 model, from one read of its graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return opset, graph_input(model.graph).name, {p.key: p.value for p in model.metadata_props}


def quantize_bundle(path: Path | str, options: QuantizeOptions,
                    log: Callable[[str], None] | None = None) -> dict[str, QuantizedVariant]:
    """Write the requested variants into the bundle and record them; returns them by precision."""
    log = log or (lambda message: None)
    options.check()
    bundle = Bundle.open(path)
    manifest = bundle.read_manifest()
    bundle.require_export(manifest)
    source_name = bundle.fp32_onnx()
    bundle.check_integrity([source_name])
    source = bundle.path(source_name)
    opset, input_name, meta = _source_facts(source)
    if "int8" in options.precisions and opset < MIN_QUANT_OPSET:
        raise InputError(f"{source_name} has opset {opset}; ONNX Runtime's QDQ per-channel "
                         f"quantization needs >= {MIN_QUANT_OPSET}: re-export with --opset 17 or higher")
    calibration = (calibration_images(bundle, manifest, options, log)
                   if "int8" in options.precisions else None)
    record: dict[str, QuantizedVariant] = {}
    started = time.perf_counter()
    for precision in options.precisions:
        target = bundle.path(ONNX_INT8 if precision == "int8" else ONNX_FP16)
        _forget(bundle, target.name)
        step = time.perf_counter()
        try:
            if precision == "int8":
                assert calibration is not None
                info = _int8_variant(bundle, manifest, source, target, calibration, input_name,
                                     options, log)
            else:
                with captured():
                    info = convert_fp16(source, target)
            with captured():
                _stamp(target, meta, info)
        except Exception:
            target.unlink(missing_ok=True)
            raise
        info = replace(info, source=source_name, source_sha256=sha256_of(source),
                       duration_s=round(time.perf_counter() - step, 3))
        record[precision] = info
        log(f"  {precision:<5} {target.name} ({info.duration_s:.1f}s)")
    if calibration is not None:
        described = calibration.record(options.method, options.count)
        if calibration.repair is not None:
            described.repair_source = calibration.repair.source
            described.repair_files_sha256 = calibration.repair.files_sha256
        described.dump(bundle.path(CALIBRATION))
    _record(bundle, record, time.perf_counter() - started)
    return record


def _int8_variant(bundle: Bundle, manifest: dict[str, Any], source: Path, target: Path,
                  calibration: Calibration, input_name: str, options: QuantizeOptions,
                  log: Callable[[str], None]) -> QuantizedVariant:
    """model.int8.onnx as always; then, with ``options.repair``, repaired until it meets the
    gate's agreement limit on the repair images, or without it a quick check on the
    calibration images that says when ``--repair`` is worth running."""
    from pipeline.stages.repair import Attempt, Repair, agreement_with_fp32

    def make(src: Path, dst: Path, exclude: list[str]) -> None:
        with captured():
            quantize_int8(src, dst, calibration, options.method, input_name,
                          options.reduce_range, exclude)

    with captured():
        info = quantize_int8(source, target, calibration, options.method, input_name,
                             options.reduce_range)
    described = calibration.record(options.method, options.count).to_dict()
    info.calibration = {k: v for k, v in described.items()
                        if k not in ("files_sha256", "schema_version")}
    if not options.repair:
        agreement = agreement_with_fp32(source, target, calibration.batch)
        info.agreement_on_calibration_images = round(agreement, 6)
        if agreement < options.min_agreement:
            log(f"warning: int8 agrees with fp32 on {100 * agreement:.2f}% of the "
                f"{len(calibration.batch)} calibration images, below the gate's "
                f"{100 * options.min_agreement:g}%; verify will likely not pass it: run "
                f"python -m pipeline quantize {bundle.root} --repair")
        return info
    repair_set = calibration  # by default; calibration.json's sha256 list already guards them
    if options.repair_images is not None:
        repair_set = calibration_images(bundle, manifest,
                                        replace(options, calibration=options.repair_images), log)
        calibration.repair = repair_set
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".repair.") as scratch:
        repair = Repair(bundle, source, repair_set.batch, repair_set.source, make, Path(scratch), log)
        plain_logits = repair.logits(target, "int8")  # the plain file, as made
        plain = Attempt(target, float(np.mean(plain_logits.argmax(1) == repair.fp32.argmax(1))),
                        plain_logits)
        chosen, record = repair.run(plain, options.min_agreement, options.max_float_share)
        if chosen.path != target:
            save_atomic(target, lambda tmp: shutil.copyfile(chosen.path, tmp))
    info.repair = record
    verdict = "met" if record.met else "NOT met"
    if record.agreement_before >= options.min_agreement:
        log(f"  repair: int8 agrees with fp32 on {100 * record.agreement_before:.2f}% of the "
            f"{record.images} repair images, within the {100 * options.min_agreement:g}% "
            f"limit: nothing to repair")
        return info
    log(f"  repair: agreement with fp32 on {record.images} repair images "
        f"{100 * record.agreement_before:.2f}% -> {100 * record.agreement_after:.2f}% "
        f"(limit {100 * options.min_agreement:g}%: {verdict}); "
        f"equalization {'kept' if record.equalization_kept else 'not kept'}, "
        f"{len(record.kept_in_float)} layer(s) in float"
        + (f": {', '.join(f.pytorch for f in record.kept_in_float)}" if record.kept_in_float else ""))
    return info


def _forget(bundle: Bundle, name: str) -> None:
    """Drop a variant and its manifest entry before it is rebuilt (no stale hash survives)."""
    bundle.forget_stage((name,), entries=(("quantize", "variants", name),))


def _record(bundle: Bundle, record: dict[str, QuantizedVariant], duration_s: float) -> None:
    section = bundle.read_manifest().get("quantize", {"variants": {}})
    names = []
    for precision, info in record.items():
        name = ONNX_INT8 if precision == "int8" else ONNX_FP16
        section.setdefault("variants", {})[name] = info.to_dict()
        names.append(name)
    if "int8" in record:
        names.append(CALIBRATION)
    section["versions"] = machine.library_versions()
    bundle.record_stage("quantize", files=names, summary={"duration_s": round(duration_s, 3)},
                        sections={"quantize": section})
