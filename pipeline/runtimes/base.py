"""The one interface every runtime is used through, and what the runtimes share.

Like Polygraphy's ``BaseRunner``, a runner is made ready when it is constructed (by
``pipeline.runtimes.registry``, the only place that constructs one), answers ``infer``, and
releases its session on ``close()``; it is a context manager, so ``with registry.open(...) as
runner:`` closes it on every path. Runners say which device, provider and precision they really
use: read back from the runtime, never assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np


class Runner:
    """Base of every runner: ``infer(batch) -> logits``, ``timed_step``, ``metadata``,
    ``synchronize`` and ``close``.

    Subclasses set ``name`` (the backend name, e.g. ``ort-cpu``), ``device`` (cpu, cuda,
    server), ``provider`` (what really runs it), ``precision`` (what really ran) and
    ``model_path`` (the file it read, or None).
    """

    name: str = "runner"
    device: str = "cpu"
    provider: str = ""
    precision: str = "fp32"
    model_path: Path | None = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def intermediates(self, batch: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
        """The named intermediate tensors for ``batch`` (``verify --localize``); a runtime
        that cannot expose them says so."""
        raise NotImplementedError(f"{self.name} cannot return intermediate tensors")

    def timed_step(self, batch: np.ndarray) -> tuple[Callable[[], None], str]:
        """The call to time for ``batch`` and where its input and output live (host/device)."""
        return (lambda: self.infer(batch)), "host"

    def images_per_step(self, batch: int) -> int:
        """Images one ``timed_step`` call processes (more than ``batch`` when a step keeps
        several requests in flight, as OpenVINO's throughput mode does)."""
        return batch

    def metadata(self) -> dict[str, str]:
        """The model file's metadata (class names, preprocessing ...), if it has any."""
        return {}

    def synchronize(self) -> None:
        """Wait for device work; ``infer`` is synchronous for host runtimes."""

    def close(self) -> None:
        """Release the session or module; the runner cannot infer afterwards."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can."""
    import torch

    if not torch.backends.cuda.is_built():
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def use_strict_fp32() -> None:
    """Turn TF32 off so GPU numbers are fp32 like the CPU's (parity and fair timing)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
