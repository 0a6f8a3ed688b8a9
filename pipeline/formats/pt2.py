"""The PyTorch artifacts of torch.export: ``model.pt2`` (an ExportedProgram) and AOTInductor
packages (``model.aoti-cpu.pt2``, ``model.aoti-cuda.pt2``).

Loading safety. ``torch.export.load`` (torch 2.14) is not a safe loader: weights or constants
flagged ``use_pickle`` go through ``torch.load(weights_only=False)``, opaque constants through
``pickle.loads``, and the sample inputs are retried with ``weights_only=False`` when the safe
unpickler refuses them. A crafted archive therefore runs code on load. ``load_program`` reads
the archive once into memory, refuses every record that would reach an unrestricted unpickler,
proves the sample inputs load with ``weights_only=True`` (so torch never falls back), and only
then hands those same bytes to ``torch.export.load``.

An AOTInductor package is different in kind: it is a compiled shared library, and loading it
runs its code by design. It is loaded only from a bundle whose manifest matched its sha256,
and only on a CPU with the instruction set it was compiled for.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.bundle import atomic_path, save_atomic
from pipeline.core.machine import cpu_flag_set
from pipeline.core.records import AotiPackage
from pipeline.errors import EnvironmentUnavailable, InputError

if TYPE_CHECKING:
    import torch

METADATA_FILE = "pipeline.json"  # extra/pipeline.json inside the archive
MAX_BATCH = 4096
# Constants stored as pickled objects (torch 2.11 has only the first name; 2.14 both).
PICKLED_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


@dataclass
class Archive:
    """A .pt2 file read once: its bytes, the zip over them, and its records by name (the
    archive's root folder stripped)."""

    path: Path
    data: bytes
    zip: zipfile.ZipFile
    records: dict[str, str] = field(default_factory=dict)  # record -> zip member name

    @property
    def is_aoti(self) -> bool:
        return is_aoti_records(self.records)

    def read(self, record: str) -> bytes:
        return self.zip.read(self.records[record])

    def metadata(self) -> dict[str, str]:
        """``extra/pipeline.json``: the same keys as the ONNX file's metadata_props."""
        record = f"extra/{METADATA_FILE}"
        if record not in self.records:
            return {}
        try:
            return {key: str(value) for key, value in json.loads(self.read(record)).items()}
        except (ValueError, AttributeError):
            raise InputError(f"{str(self.path)!r}: its extra/{METADATA_FILE} is not a JSON "
                             f"object") from None


def is_aoti_records(records: Any) -> bool:
    return any(name.startswith("data/aotinductor/") for name in records)


def _records(path: Path, archive: zipfile.ZipFile) -> dict[str, str]:
    """Member names by record name, or an InputError when this is no PT2 archive."""
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise InputError(_not_pt2(path, "no single archive root folder"))
    root = roots.pop()
    return {name[len(root) + 1:]: name for name in names}


def _not_pt2(path: Path, why: str) -> str:
    return (f"{str(path)!r} is not a .pt2 archive written by torch.export ({why}); give a "
            f"model.pt2 written by `python -m pipeline export`")


def read_archive(path: Path | str) -> Archive:
    """The file as a PT2 archive, or one clear InputError (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f".pt2 file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise InputError(_not_pt2(path, "not a zip archive")) from None
    found = Archive(path, data, archive, _records(path, archive))
    from torch.export.pt2_archive.constants import (
        ARCHIVE_FORMAT_PATH,
        ARCHIVE_FORMAT_VALUE,
    )

    if (ARCHIVE_FORMAT_PATH not in found.records
            or found.read(ARCHIVE_FORMAT_PATH).decode(errors="replace").strip() != ARCHIVE_FORMAT_VALUE):
        raise InputError(_not_pt2(path, "no archive_format 'pt2' record"))
    return found


def unsafe_records(archive: Archive) -> list[str]:
    """Records that ``torch.export.load`` would give to an unrestricted unpickler."""
    import torch
    from torch.export.pt2_archive import constants as c

    problems = []
    models = [r[len("models/"):-len(".json")] for r in archive.records
              if r.startswith("models/") and r.endswith(".json")]
    for model in models:
        for directory, config_format in ((c.WEIGHTS_DIR, c.WEIGHTS_CONFIG_FILENAME_FORMAT),
                                         (c.CONSTANTS_DIR, c.CONSTANTS_CONFIG_FILENAME_FORMAT)):
            legacy = f"{directory}{model}.pt"
            if legacy in archive.records:
                problems.append(f"{legacy} (a legacy pickled payload)")
            config = config_format.format(model)
            if config not in archive.records:
                continue
            try:
                entries = json.loads(archive.read(config)).get("config", {})
            except (ValueError, AttributeError):
                problems.append(f"{config} (not JSON)")
                continue
            for fqn, meta in entries.items():
                name = str(meta.get("path_name", ""))
                if meta.get("use_pickle"):
                    problems.append(f"{directory}{name} for {fqn} (pickled)")
                elif name.startswith(PICKLED_OBJECT_PREFIXES):
                    problems.append(f"{directory}{name} for {fqn} (a pickled object)")
        sample = c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if sample in archive.records:
            try:
                torch.load(io.BytesIO(archive.read(sample)), weights_only=True)
            except Exception as exc:  # the safe unpickler refused it: torch would retry unsafely
                problems.append(f"{sample} (refused by torch.load(weights_only=True): "
                                f"{type(exc).__name__})")
    if not models:
        problems.append("no models/*.json: not an ExportedProgram archive")
    return problems


def load_program(path: Path | str) -> "torch.export.ExportedProgram":
    """An ExportedProgram from ``path``, refusing archives that would run code on load."""
    return open_program(path)[0]


def open_program(path: Path | str) -> tuple["torch.export.ExportedProgram", dict[str, str]]:
    """The program and its ``extra/pipeline.json`` metadata, from one read of the file."""
    import torch

    archive = read_archive(path)
    if archive.is_aoti:
        raise InputError(f"{str(path)!r} is an AOTInductor package (compiled code), not an "
                         f"ExportedProgram; give the bundle's model.pt2")
    problems = unsafe_records(archive)
    if problems:
        raise InputError(f"refusing {str(path)!r}: loading it would unpickle arbitrary objects "
                         f"({'; '.join(problems[:3])}); re-export it with python -m pipeline export")
    metadata = archive.metadata()
    try:
        with warnings.catch_warnings():
            # torch.frombuffer on the archive's read-only bytes; the tensors are copied on use
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.export.load(io.BytesIO(archive.data)), metadata
    except Exception as exc:  # torch raises many kinds on a damaged archive
        raise InputError(f"{str(path)!r} is not a loadable ExportedProgram "
                         f"({type(exc).__name__}: {str(exc)[:160]})") from None


def read_metadata(path: Path | str) -> dict[str, str]:
    """The ``extra/pipeline.json`` metadata (the same keys as the ONNX file's metadata_props)."""
    return read_archive(path).metadata()


# ----------------------------------------------------------------------------- export
def export_program(model: "torch.nn.Module", example: "torch.Tensor") -> "torch.export.ExportedProgram":
    """torch.export with a dynamic batch dimension (the example batch must not be 1)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def save_program(program: "torch.export.ExportedProgram", path: Path,
                 metadata: dict[str, str]) -> None:
    import torch

    extra = {METADATA_FILE: json.dumps(metadata)}

    def save(tmp: Path) -> None:
        named = tmp.with_suffix(".pt2")  # torch.export.save warns about any other suffix
        try:
            torch.export.save(program, str(named), extra_files=extra)
            named.replace(tmp)
        finally:
            named.unlink(missing_ok=True)

    save_atomic(path, save)


def reload_difference(path: Path, model: "torch.nn.Module", probe: "torch.Tensor") -> float:
    """Load ``path`` back the safe way and return its largest difference from ``model``."""
    import torch

    module = load_program(path).module()
    with torch.no_grad():
        return float((module(probe) - model(probe)).abs().max())


# ----------------------------------------------------------------------------- AOTInductor
def require_compiler() -> str:
    """The C++ compiler AOTInductor will use, or exit 3 naming the fix."""
    try:
        compiler = cxx_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or a search that found nothing runnable
        problem = f"{type(exc).__name__}: {str(exc)[:160]}"
    else:
        if shutil.which(compiler):
            return compiler
        problem = f"{compiler!r} is not on PATH"
    raise EnvironmentUnavailable(f"--aoti: no working C++ compiler for AOTInductor ({problem}); "
                                 f"{NO_COMPILER_FIX}")


def cxx_compiler() -> str:
    from torch._inductor.cpp_builder import get_cpp_compiler

    return get_cpp_compiler()


def compiler_version(compiler: str) -> str:
    import subprocess

    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def vector_isa() -> str:
    """The SIMD instruction set Inductor compiles CPU kernels for on this machine."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or "none"
    except Exception:  # very old torch, or no vector ISA
        return "none"


NO_COMPILER_FIX = ("install one (Debian/Ubuntu: apt install g++) or point CXX at it, then "
                   "run export --aoti again")


def compile_aoti(program: "torch.export.ExportedProgram", path: Path, device: str) -> AotiPackage:
    """AOTInductor-compile ``program`` (already on ``device``) into a package at ``path``."""
    import torch

    compiler = require_compiler()
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        tmp.unlink()  # the packager writes the file itself and wants the name free
        target = tmp.with_suffix(".pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(target))
        except Exception as exc:
            target.unlink(missing_ok=True)
            if "CppCompileError" in type(exc).__name__ or "InvalidCxxCompiler" in type(exc).__name__:
                raise EnvironmentUnavailable(f"export --aoti: the C++ compiler {compiler!r} failed "
                                             f"({str(exc).splitlines()[0][:200]}); "
                                             f"{NO_COMPILER_FIX}") from None
            raise
        target.replace(tmp)
    return AotiPackage(device=device, compile_s=round(time.perf_counter() - started, 2),
                       compiler=compiler, compiler_version=compiler_version(compiler),
                       vector_isa=vector_isa() if device == "cpu" else None,
                       isa_flags=isa_flags() if device == "cpu" else None,
                       torch=torch.__version__, max_batch=MAX_BATCH)


ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "popcnt", "movbe", "lzcnt",
                "abm", "vpclmul", "gfni", "vaes", "sha_ni")


def isa_flags() -> list[str]:
    """This CPU's instruction-set flags: Inductor compiles with -march=native, so a CPU package
    may use any of them."""
    return sorted(flag for flag in cpu_flag_set() if flag.startswith(ISA_PREFIXES))


def isa_problem(recorded: list[str] | None) -> str | None:
    """Why a CPU package compiled where ``recorded`` flags held cannot run here (it would die
    of an illegal instruction), or None."""
    if not recorded:
        return None
    here = isa_flags()
    if not here:
        return None  # cannot tell (no /proc/cpuinfo): let the loader try
    missing = sorted(set(recorded) - set(here))
    if missing:
        return (f"it was compiled (-march=native) on a CPU with {', '.join(missing[:6])}, which "
                f"this CPU lacks; recompile here with python -m pipeline export --aoti")
    return None


def load_aoti(path: Path, device: str) -> Any:
    """The compiled model of an AOTInductor package (native code: trusted bundles only)."""
    import torch

    try:  # the zip directory is enough to tell; the loader reads the rest itself
        with zipfile.ZipFile(path) as archive:
            aoti = is_aoti_records(_records(path, archive))
    except (zipfile.BadZipFile, OSError):
        aoti = False
    if not aoti:
        raise InputError(f"{str(path)!r} is not an AOTInductor package (no data/aotinductor/); "
                         f"make one with python -m pipeline export --aoti")
    try:
        return torch._inductor.aoti_load_package(str(path), device_index=0 if device == "cuda" else -1)
    except Exception as exc:
        raise EnvironmentUnavailable(f"aoti-{device}: cannot load {path.name} here "
                                     f"({type(exc).__name__}: {str(exc)[:200]})") from None
