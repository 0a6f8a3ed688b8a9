"""What this machine and its libraries are: versions, CPU model, GPU and driver."""

from __future__ import annotations

import os
import platform
import re
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.version import __version__

if TYPE_CHECKING:
    from pipeline.core.records import Machine

LIBRARIES = ("torch", "torchvision", "onnx", "onnxsim", "onnxscript", "numpy")
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _version(distribution: str) -> str | None:
    from importlib import metadata  # 20 ms of imports: off the --help path

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_ort_distributions() -> list[str]:
    """Which ONNX Runtime wheels are installed; two means they overwrote each other."""
    return [name for name in ORT_DISTRIBUTIONS if _version(name)]


def library_versions() -> dict[str, str | None]:
    """Versions of what the results depend on; only ONNX Runtime wheels really installed."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "pipeline": __version__}
    versions.update({name: _version(name) for name in LIBRARIES})
    for name in installed_ort_distributions():
        versions[name] = _version(name)
    if _version("openvino"):
        versions["openvino"] = _version("openvino")
    return versions


# The flags that decide which reduced precisions a CPU runs fast (names as in /proc/cpuinfo).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flag_set() -> set[str]:
    """Every flag /proc/cpuinfo lists for this CPU; empty where it is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags() -> dict[str, bool]:
    """Which of ``CPU_FLAGS`` this CPU has; all False where /proc/cpuinfo is unreadable."""
    found = cpu_flag_set()
    return {flag: flag in found for flag in CPU_FLAGS}


def cpu_has_fast_bf16(flags: dict[str, bool] | None = None) -> bool:
    flags = flags if flags is not None else cpu_flags()
    return flags.get("amx_bf16", False) or flags.get("avx512_bf16", False)


def cpu_has_fast_int8(flags: dict[str, bool] | None = None) -> bool:
    flags = flags if flags is not None else cpu_flags()
    return any(flags.get(f, False) for f in ("amx_int8", "avx512_vnni", "avx_vnni"))


def cpu_summary() -> str:
    """'<model> [avx2 avx512f ...]': the model and the flags it has, for tables."""
    have = [flag for flag, present in cpu_flags().items() if present]
    return f"{cpu_model()} [{' '.join(have) or 'no AVX2'}]"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any] | None:
    """The first CUDA device as torch sees it, with the driver version; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "driver": _nvidia_driver(),
        "cuda_runtime": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            first = handle.readline()
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04 ..." or "... Open Kernel
    # Module for x86_64  580.159.04 ...": the first dotted number is the version.
    found = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", first)
    return found.group(1) if found else first.strip() or None


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,62}")


def check_label(label: str) -> str:
    """A machine label (``bench --machine``): report keys prices by it (``--price LABEL=USD``)."""
    if not LABEL.fullmatch(label):
        raise InputError(f"--machine {label!r} is not a usable label: give 1-63 letters, digits "
                         f"or . _ : / + - starting with a letter or digit, e.g. c7i.large")
    return label


def machine_block(label: str | None = None) -> "Machine":
    """This machine's facts, under ``label`` (the hostname when None)."""
    from pipeline.core.records import GpuFacts, Machine

    gpu = gpu_info()
    return Machine(hostname=platform.node(), platform=platform.platform(), cpu=cpu_model(),
                   cpu_flags=cpu_flags(), cpu_count=os.cpu_count(),
                   gpu=GpuFacts(**gpu) if gpu else None, versions=library_versions(),
                   label=check_label(label) if label is not None else platform.node())
