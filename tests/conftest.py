"""Shared fixtures: tiny real bundles and a way to call the CLI as a user does."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

TINY_ARCH = "resnet18_cifar"


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C tests need SIGINT to arrive. A shell without job control starts a background job
    (``pytest &`` in a script) with SIGINT ignored, and children inherit that across exec, so
    neither the suite nor the CLI it starts would ever see the signal: restore Python's own
    handler (a child then starts with the default action, and Python's KeyboardInterrupt)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(*args: str) -> "object":
    """Invoke the click app in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_module(*args: str, timeout: float = 300, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ...`` in a subprocess, exactly as a user types it (``env``: the
    whole environment)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="session")
def tiny_bundle_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / TINY_ARCH
    result = run_cli("export", "--arch", TINY_ARCH, "--out", out, "--class-names",
                     ",".join(f"c{i}" for i in range(10)))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def tiny_bundle(tiny_bundle_master: Path, tmp_path: Path) -> Path:
    """A private copy of an exported resnet18_cifar bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle_master, tmp_path / "bundle"))


def write_images(folder: Path, count: int = 3, size: int = 40, seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def fake_cifar_passes_md5(monkeypatch):
    """Tiny stand-in batches cannot carry the real files' md5 sums, which torchvision's
    CIFAR10 checks; everything else (the pickles, the layout, the parsing) is real."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def requires_cuda():
    """Mark a test ``gpu`` and skip it, saying why, where no CUDA GPU is present."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    return lambda test: pytest.mark.gpu(skip(test))


def copy_tree(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.fixture(params=[True, False], ids=["bf16-units", "no-bf16-units"])
def forced_bf16(request, monkeypatch) -> bool:
    """Make this CPU look as if it has bf16 units (AMX or AVX512-BF16), or as if it has none,
    for the code that decides which precisions to time and gate. The real runtime still runs:
    forced on a CPU without the units, torch emulates bf16 (slowly, but correctly)."""
    import pipeline.core.machine as machine

    present = request.param
    monkeypatch.setattr(machine, "cpu_has_fast_bf16", lambda flags=None: present)
    return present


@pytest.fixture(params=[True, False], ids=["vnni", "no-vnni"])
def forced_vnni(request, monkeypatch) -> bool:
    """Make this CPU look as if it has int8 dot-product units (VNNI or AMX-INT8), or none, for
    the code that picks quantize's weight range. ORT still runs with the CPU's real kernels."""
    import pipeline.core.machine as machine

    present = request.param
    monkeypatch.setattr(machine, "cpu_has_fast_int8", lambda flags=None: present)
    return present


def drift_onnx(bundle_dir: Path, name: str = "model.sim.onnx", factor: float = 1.5) -> None:
    """An ONNX file's first weights scaled by ``factor``, the manifest vouching for the new
    file: integrity passes, so parity must catch the drift."""
    import onnx
    from onnx import numpy_helper

    from pipeline.core.bundle import Bundle

    path = Path(bundle_dir) / name
    proto = onnx.load(str(path))
    weight = proto.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    onnx.save(proto, str(path))
    bundle = Bundle.open(bundle_dir)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, name, stage="export"))
