"""AOTInductor packages (``model.aoti-cpu.pt2``, ``model.aoti-cuda.pt2``): compiled kernels
behind one call, no Python model code. Loaded only after the manifest vouched for the file,
and on the CPU only where it has every instruction-set flag the package was compiled for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import EnvironmentUnavailable
from pipeline.formats.pt2 import isa_problem, load_aoti
from pipeline.runtimes.torch import TorchCallRunner, require_device


class AotiRunner(TorchCallRunner):
    """Called like a module, so the shared tensor call path (infer, synchronize) serves it."""

    def __init__(self, path: Path | str, *, device: str = "cpu",
                 isa_flags: list[str] | None = None) -> None:
        import torch

        require_device("aoti", device)
        if device == "cuda":
            # The package's kernels are loaded through the driver API, which needs a current
            # context; in a fresh process (bench's worker) nothing has made one yet, and the
            # load crashed there (SIGSEGV on an H200) while it ran after other CUDA work.
            torch.cuda.init()
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
        else:
            problem = isa_problem(isa_flags)
            if problem:
                raise EnvironmentUnavailable(f"aoti-cpu: {Path(path).name}: {problem}")
        super().__init__(load_aoti(Path(path), device), name="aoti", device=device,
                         precision="fp32", model_path=Path(path))


def open_runner(backend: Any, path: Path, precision: str, *, threads: int | None = None,
                bundle: Any = None) -> AotiRunner:
    """The registry's way in: a bundle's package is checked against the instruction-set flags
    its manifest says it was compiled for."""
    isa_flags = None
    if bundle is not None:
        record = bundle.read_manifest().get("export", {}).get("aoti", {}).get(backend.device, {})
        isa_flags = record.get("isa_flags")
    return AotiRunner(path, device=backend.device, isa_flags=isa_flags)
