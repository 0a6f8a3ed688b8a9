"""PyTorch runners: eager modules, TorchScript files and ``model.pt2`` programs, on the CPU
(fp32, or bf16 autocast) or a CUDA GPU (fp32, TF32 off)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.formats.pt2 import open_program
from pipeline.models.weights import load_model
from pipeline.runtimes.base import Runner, cuda_problem, use_strict_fp32

if TYPE_CHECKING:
    import torch


def require_device(name: str, device: str) -> None:
    """Refuse a CUDA runner where torch has no GPU; turn TF32 off where it has one."""
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            raise EnvironmentUnavailable(f"{name}-cuda: {problem}")
        use_strict_fp32()


class TorchCallRunner(Runner):
    """A callable that takes and returns tensors (a module, or a compiled package)."""

    def __init__(self, call: Any, *, name: str, device: str, precision: str,
                 model_path: Path | None, metadata: dict[str, str] | None = None) -> None:
        import torch

        self.torch = torch
        self.model = call
        self.name = f"{name}-{device}"
        self.device = device
        self.provider = f"{'aoti' if name == 'aoti' else 'torch'}:{device}"
        self.precision = precision
        self.model_path = model_path
        self._metadata = metadata or {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.precision == "bf16":
                tensor = tensor.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device, dtype=torch.bfloat16):
                    return self.model(tensor).float().cpu().numpy()
            return self.model(tensor).float().cpu().numpy()

    def metadata(self) -> dict[str, str]:
        return self._metadata

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        self.model = None


class TorchRunner(TorchCallRunner):
    """Eager PyTorch or a TorchScript file, on ``cpu`` or ``cuda``; fp32, or bf16 autocast."""

    def __init__(self, model: "torch.nn.Module", *, device: str = "cpu", name: str = "torch",
                 precision: str = "fp32", model_path: Path | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise InputError(f"{name}-{device} runs fp32 or bf16, not {precision!r}")
        require_device(name, device)
        super().__init__(_in_eval_mode(model).to(device), name=name, device=device,
                         precision=precision, model_path=model_path, metadata=metadata)
        if precision == "bf16":
            # autocast runs convolutions and matmuls in bf16 (oneDNN picks AMX/AVX512-BF16 where
            # present); channels_last is the layout those kernels want.
            self.model = self.model.to(memory_format=self.torch.channels_last)

    @classmethod
    def from_torchscript(cls, path: Path | str, *, device: str = "cpu") -> "TorchRunner":
        import warnings

        import torch

        require_device("torchscript", device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation notice
            # map_location moves the constants that freezing folded into the graph as well;
            # a later .to(device) would move only parameters, and a frozen module has none.
            module = torch.jit.load(str(path), map_location=device)
        return cls(module, device=device, name="torchscript", model_path=Path(path))

    @classmethod
    def from_program(cls, path: Path | str, *, device: str = "cpu") -> "TorchRunner":
        """``model.pt2`` (a torch.export ExportedProgram), loaded the safe way, run eagerly."""
        require_device("torch-export", device)
        program, metadata = open_program(path)
        if device == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        runner = cls(program.module(), device=device, name="torch-export", model_path=Path(path),
                     metadata=metadata)
        runner.graph_module = runner.model
        return runner

    graph_module: Any = None  # the program's fx GraphModule (a .pt2 only)

    def intermediates(self, batch: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
        """Every named fx node's value for ``batch``, copied as it is made: in-place ops
        (``relu_``) would otherwise rewrite an earlier node's tensor."""
        if self.graph_module is None:
            return super().intermediates(batch, tensors)
        values = record_nodes(self.graph_module, self.torch.from_numpy(batch).to(self.device),
                              set(tensors))
        return {name: values[name] for name in tensors if name in values}

    @classmethod
    def from_weights(cls, path: Path | str, *, device: str = "cpu",
                     precision: str = "fp32") -> "TorchRunner":
        """Eager PyTorch rebuilt from a bundle's ``weights.pt`` (a training checkpoint form)."""
        return cls(load_model(checkpoint=Path(path)).model, device=device, precision=precision,
                   model_path=Path(path))


def _in_eval_mode(model: "torch.nn.Module") -> "torch.nn.Module":
    try:
        return model.eval()
    except NotImplementedError:  # an ExportedProgram's module: exported in eval, it has no modes
        return model


def record_nodes(graph_module: Any, batch: Any, names: set[str] | None = None,
                 replace: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, np.ndarray]:
    """Run an fx GraphModule node by node, keeping a numpy copy of every tensor-valued node
    (or of ``names``); ``replace`` maps a node name to a function applied to its value before
    later nodes see it (to inject one layer's quantization error)."""
    import torch

    kept: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            value = super().run_node(node)
            if replace and node.name in replace:
                value = replace[node.name](value)
            if isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and (names is None or node.name in names):
                kept[node.name] = value.detach().cpu().numpy().copy()
            return value

    with torch.inference_mode():
        Recorder(graph_module).run(batch)
    return kept


def open_runner(backend: Any, path: Path, precision: str, *, threads: int | None = None,
                bundle: Any = None) -> TorchRunner:
    """The registry's way in: eager weights, TorchScript or a .pt2, by ``backend.runtime``."""
    if backend.runtime == "torchscript":
        return TorchRunner.from_torchscript(path, device=backend.device)
    if backend.runtime == "torch-export":
        return TorchRunner.from_program(path, device=backend.device)
    return TorchRunner.from_weights(path, device=backend.device, precision=precision)
