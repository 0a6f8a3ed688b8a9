"""The bundle directory: well-known file names, manifest.json, hashes and atomic writes.

Stages talk only through files here. ``manifest.json`` says what each file is; every file
listed under ``artifacts`` carries its byte size and sha256 so that ``verify`` can tell a
changed or truncated file from the one the stage wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import CheckFailed, InputError

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# Files each stage owns; re-running a stage replaces exactly these.
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
ONNX_SIMPLIFIED = "model.sim.onnx"
WEIGHTS = "weights.pt"
PARITY = "parity.json"
EXPORT_LOG = "export.log"
PT2 = "model.pt2"
AOTI_FILES = {"cpu": "model.aoti-cpu.pt2", "cuda": "model.aoti-cuda.pt2"}
EXPORT_FILES = (TORCHSCRIPT, ONNX, ONNX_SIMPLIFIED, WEIGHTS, PARITY, EXPORT_LOG, PT2,
                *AOTI_FILES.values())

ONNX_INT8 = "model.int8.onnx"
ONNX_FP16 = "model.fp16.onnx"
CALIBRATION = "calibration.json"
QUANTIZE_FILES = (ONNX_INT8, ONNX_FP16, CALIBRATION)
# The model file each precision reads; bf16 and OpenVINO's own choice are runtime settings
# applied to the fp32 model, not files.
PRECISION_FILES = {"int8": ONNX_INT8, "fp16": ONNX_FP16}

CHECKPOINT = "checkpoint.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY = "history.json"
HISTORY_PLOT = "history.png"
METRICS = "metrics.json"
TRAIN_FILES = (CHECKPOINT, LAST_CHECKPOINT, HISTORY, HISTORY_PLOT, METRICS)

LATENCY = "latency.json"
OFFLINE = "offline.json"
REPORT = "report.md"
LATENCY_PLOT = "latency.png"
BENCH_FILES = (LATENCY, REPORT, LATENCY_PLOT, OFFLINE)
# What a new export makes stale: results measured on the old models, and variants made from them.
DERIVED_FROM_EXPORT = QUANTIZE_FILES + BENCH_FILES


_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success.

    A crash or Ctrl-C leaves at most a ``.tmp`` file that nothing reads, never a
    half-written ``target``.
    """
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_atomic(target: Path, save: Callable[[Path], None]) -> None:
    """Run ``save(tmp_path)`` (``torch.save``, ``onnx.save`` ...) and rename into place."""
    with atomic_path(target) as tmp:
        save(tmp)


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(f"output directory {str(path)!r} cannot be written ({exc.strerror}); "
                         f"choose another with --out") from None
    return path


@dataclass(frozen=True)
class Artifact:
    """One file the manifest records: which stage wrote it, its size and its sha256."""

    path: str
    stage: str
    bytes: int
    sha256: str


class Bundle:
    """A bundle directory and its manifest."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def open(cls, root: Path | str) -> "Bundle":
        """An existing bundle; a missing directory or manifest is an input error."""
        bundle = cls(root)
        if not bundle.root.is_dir():
            raise InputError(f"bundle directory {str(bundle.root)!r} does not exist; "
                             f"create it with: python -m pipeline export --out {bundle.root}")
        if not bundle.manifest_path.is_file():
            raise InputError(f"{str(bundle.root)!r} has no {MANIFEST}; it is not a bundle. "
                             f"Create one with: python -m pipeline export --out {bundle.root}")
        bundle.read_manifest()
        return bundle

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return new_manifest()
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.manifest_path} is not valid JSON ({exc}); "
                             f"re-create the bundle with python -m pipeline export") from None
        if not isinstance(data, dict) or data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise InputError(f"{self.manifest_path} has schema_version "
                             f"{data.get('schema_version') if isinstance(data, dict) else None!r}; "
                             f"this pipeline reads {MANIFEST_SCHEMA_VERSION}. Re-export the bundle")
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def update_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        manifest = self.read_manifest()
        change(manifest)
        self.write_manifest(manifest)
        return manifest

    def record_artifact(self, manifest: dict[str, Any], name: str, *, stage: str) -> None:
        """Put ``name``'s size and sha256 into ``manifest['artifacts']``."""
        path = self.path(name)
        manifest.setdefault("artifacts", {})[name] = {
            "path": name,
            "stage": stage,
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
        }

    def forget_stage(self, files: Iterable[str], *, sections: tuple[str, ...] = (),
                     stages: tuple[str, ...] = (),
                     entries: tuple[tuple[str, ...], ...] = ()) -> None:
        """Drop a stage's files, their manifest entries, and any manifest ``sections``,
        ``stages`` records and nested ``entries`` (key paths such as ``("quantize",
        "variants", "model.int8.onnx")``) that described them, before the stage runs again."""
        files = tuple(files)

        def drop(manifest: dict[str, Any]) -> None:
            for name in files:
                manifest.get("artifacts", {}).pop(name, None)
            for key in sections:
                manifest.pop(key, None)
            for key in stages:
                manifest.get("stages", {}).pop(key, None)
            for *parents, last in entries:
                node: Any = manifest
                for key in parents:
                    node = node.get(key, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(last, None)
        if self.manifest_path.is_file():
            self.update_manifest(drop)
        for name in files:
            self.path(name).unlink(missing_ok=True)

    def record_stage(self, stage: str, *, files: Iterable[str], summary: dict[str, Any],
                     sections: dict[str, Any] | None = None,
                     warnings: list[str] | None = None) -> dict[str, Any]:
        """One stage's entry in the manifest, written once and atomically: its ``summary``
        under ``stages``, the top-level ``sections`` it owns, its ``warnings`` (replacing the
        ones it left before), and the size and sha256 of each of its ``files`` that exists."""
        def update(manifest: dict[str, Any]) -> None:
            manifest.update(sections or {})
            manifest.setdefault("stages", {})[stage] = summary
            if warnings is not None:
                kept = [w for w in manifest.get("warnings", []) if w.get("stage") != stage]
                manifest["warnings"] = kept + [{"stage": stage, "message": text} for text in warnings]
            for name in files:
                if self.path(name).is_file():
                    self.record_artifact(manifest, name, stage=stage)
        return self.update_manifest(update)

    def artifacts(self, manifest: dict[str, Any] | None = None) -> dict[str, Artifact]:
        """The files the manifest records (``manifest``: one already read), by name."""
        recorded = (manifest if manifest is not None else self.read_manifest()).get("artifacts", {})
        try:
            return {name: Artifact(**entry) for name, entry in recorded.items()}
        except TypeError as exc:  # a key renamed, missing or added by hand
            raise InputError(f"{self.manifest_path}: an artifacts entry does not read ({exc}); "
                             f"re-create the bundle with python -m pipeline export") from None

    def artifact_sha256(self, name: str) -> str | None:
        """The sha256 the manifest records for ``name`` (None when it is not recorded)."""
        entry = self.artifacts().get(name)
        return entry.sha256 if entry else None

    def require_export(self, manifest: dict[str, Any] | None = None) -> None:
        """Raise (exit 2, naming the command) unless ``export`` has written the ONNX model."""
        if ONNX not in self.artifacts(manifest):
            raise InputError(f"{self.root} has no exported ONNX model; run: python -m pipeline "
                             f"export --out {self.root}")

    def fp32_onnx(self) -> str:
        """The fp32 ONNX file runtimes use: the simplified model when there is one."""
        return ONNX_SIMPLIFIED if self.path(ONNX_SIMPLIFIED).is_file() else ONNX

    def check_integrity(self, names: list[str] | None = None) -> list[str]:
        """Check the listed artifacts (default all) against the manifest; raise on mismatch."""
        artifacts = self.artifacts()
        checked = []
        for name in names if names is not None else list(artifacts):
            entry = artifacts.get(name)
            if entry is None:
                raise CheckFailed(f"{name} is not recorded in {self.manifest_path}; "
                                  f"re-run the stage that makes it")
            path = self.path(entry.path)
            if not path.is_file():
                raise CheckFailed(f"integrity: {path} is missing")
            size = path.stat().st_size
            if size != entry.bytes:
                raise CheckFailed(f"integrity: {path} is {size} bytes, manifest says "
                                  f"{entry.bytes} (truncated or replaced)")
            if sha256_of(path) != entry.sha256:
                raise CheckFailed(f"integrity: {path} sha256 differs from the manifest "
                                  f"(the file was changed after export)")
            checked.append(name)
        return checked


def new_manifest() -> dict[str, Any]:
    return {"schema_version": MANIFEST_SCHEMA_VERSION, "artifacts": {}, "stages": {}, "warnings": []}
