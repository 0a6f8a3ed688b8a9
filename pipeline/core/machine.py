"""What this machine and its libraries are: versions, CPU model, GPU and driver."""

from __future__ import annotations

import os
import platform
from typing import Any

from pipeline.version import __version__

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
    import re

    found = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", first)
    return found.group(1) if found else first.strip() or None


def machine_block() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_info(),
        "versions": library_versions(),
    }
