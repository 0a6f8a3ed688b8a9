"""The registry: the one place that names backends and constructs runners."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.runtimes.base import Runner
from pipeline.runtimes.registry import (
    BACKENDS,
    VariantMissing,
    get_backend,
    parse_targets,
    registry_help,
)
from tests.conftest import run_module


def test_a_bare_backend_means_every_precision_it_runs_but_untimed_ones():
    assert parse_targets("ort-cpu") == (("ort-cpu", "fp32"), ("ort-cpu", "int8"))
    assert parse_targets("ort-cpu:fp16,openvino-cpu:auto") == (("ort-cpu", "fp16"),
                                                               ("openvino-cpu", "auto"))
    assert parse_targets("ort-cpu,torch-cpu", "bf16") == (("torch-cpu", "bf16"),)


@pytest.mark.parametrize("text, precisions, message", [
    ("ort-gpu", None, "unknown backend 'ort-gpu'; choose from: torch-cpu"),
    ("ort-cpu:bf16", None, "ort-cpu does not run precision 'bf16'; it runs: fp32, int8, fp16"),
    ("ort-cpu", "fp8", "unknown precision 'fp8'; choose from: fp32"),
    ("torchscript-cpu", "int8", "leaves nothing to run"),
])
def test_a_wrong_name_says_what_exists(text, precisions, message):
    with pytest.raises(InputError, match=message):
        parse_targets(text, precisions)


def test_help_lists_every_backend_with_its_extra():
    text = registry_help()
    assert all(name in text for name in BACKENDS)
    assert "openvino-cpu (fp32, auto, int8) [extra openvino]" in text


def test_a_missing_variant_names_the_command_that_makes_it(tiny_bundle):
    from pipeline.core.bundle import Bundle

    with pytest.raises(VariantMissing, match="make it with: python -m pipeline quantize .* "
                                             "--precision int8"):
        get_backend("ort-cpu").model_file(Bundle.open(tiny_bundle), "int8")
    with pytest.raises(VariantMissing, match="--aoti"):
        get_backend("aoti-cpu").model_file(Bundle.open(tiny_bundle), "fp32")


def test_availability_names_what_is_missing():
    assert get_backend("ort-cuda").availability_problem(with_cuda=False) == "--cpu-only"
    assert get_backend("ort-cpu").availability_problem() is None
    assert get_backend("openvino-cpu").availability_problem() is None  # the dev extra has it


def test_bf16_is_a_reason_exactly_where_the_cpu_lacks_the_units(forced_bf16):
    problem = get_backend("torch-cpu").precision_problem("bf16")
    assert (problem is None) == forced_bf16
    if problem:
        assert "no bf16 units" in problem
    assert get_backend("torch-cpu").precision_problem("fp32") is None


@pytest.mark.parametrize("name", ["torch-cpu", "torchscript-cpu", "torch-export-cpu", "ort-cpu",
                                  "openvino-cpu"])
def test_every_cpu_backend_makes_a_runner_that_closes(tiny_bundle, name):
    import numpy as np

    from pipeline.core.bundle import Bundle

    with get_backend(name).make(Bundle.open(tiny_bundle)) as runner:
        assert isinstance(runner, Runner) and runner.name == name
        assert runner.model_path is not None and runner.model_path.parent == tiny_bundle
        logits = runner.infer(np.zeros((2, 3, 32, 32), np.float32))
        assert logits.shape == (2, 10)
    with pytest.raises(Exception):
        runner.infer(np.zeros((1, 3, 32, 32), np.float32))  # closed: its session is gone


# ----------------------------------------------------------------------------- a new backend
PLUGIN = '''
"""A runtime added from outside: ONNX Runtime's CPU provider under other names."""
from pipeline.runtimes.ort import OrtRunner
from pipeline.runtimes.registry import FP32_ONNX, ONNX_FILES, Backend

def open_runner(backend, path, precision, *, threads=None, bundle=None):
    return OrtRunner(path, provider="cpu", threads=threads, precision=precision)

CHECKED = Backend("ort-cpu-alt", "ort-alt", "cpu", ("fp32",), "ORT CPU, under another name",
                  __name__, {"fp32": FP32_ONNX}, parity=ONNX_FILES, predict=True)
UNCHECKED = Backend("ort-cpu-unchecked", "ort-alt", "cpu", ("fp32",), "ORT CPU, never verified",
                    __name__, {"fp32": FP32_ONNX})
'''


def _install_plugin(site: Path) -> dict:
    """A real installed distribution: a module, and its two entry points."""
    (site / "ortalt").mkdir(parents=True)
    (site / "ortalt" / "__init__.py").write_text(PLUGIN)
    info = site / "ortalt-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ortalt\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pipeline.backends]\nort-cpu-alt = ortalt:CHECKED\n"
                                           "ort-cpu-unchecked = ortalt:UNCHECKED\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                                     os.environ.get("PYTHONPATH")])))


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_a_backend_added_by_one_entry_point_is_parity_checked_timed_and_recommended(tiny_bundle, tmp_path):
    """No edit anywhere in pipeline: verify parity-checks the new backend at fp32 because its
    entry says so, bench times it (in its own worker process), and the recommendation may
    pick it; a backend whose entry asks for no parity check is timed, said to be not verified,
    and never recommended."""
    env = _install_plugin(tmp_path / "site")
    verify = run_module("verify", tiny_bundle, "--cpu-only", env=env)
    assert verify.returncode == 0, verify.stderr
    parity = json.loads((tiny_bundle / "parity.json").read_text())
    alt = [p for p in parity["pairs"] if p["backend"] == "ort-cpu-alt"]
    assert {p["candidate"] for p in alt} == {"onnx-ort-cpu-alt", "onnx-sim-ort-cpu-alt"}
    assert alt and all(p["passed"] for p in alt)
    assert not [p for p in parity["pairs"] if p["backend"] == "ort-cpu-unchecked"]

    bench = run_module("bench", tiny_bundle, "--backends", "ort-cpu-alt,ort-cpu-unchecked",
                       "--batch-sizes", "1", "--seconds", "0.3", "--json", env=env)
    assert bench.returncode == 0, bench.stderr
    latency = json.loads((tiny_bundle / "latency.json").read_text())
    verified = {row["backend"]: row["verified"] for row in latency["rows"]}
    assert verified == {"ort-cpu-alt": "parity passed",
                        "ort-cpu-unchecked": "not verified on this machine"}
    recommendation = latency["recommendation"]
    assert recommendation["fastest_batch1"]["backend"] == "ort-cpu-alt"
    assert "ort-cpu-unchecked:fp32" in recommendation["not_verified"]


def test_the_registry_answers_what_each_backend_can_do():
    from pipeline.runtimes.registry import (
        int8_layer_backend,
        parity_backends,
        predict_backend,
        served_backend,
    )

    assert {b.name for b in parity_backends(with_cuda=False)} == {
        "torchscript-cpu", "torch-export-cpu", "aoti-cpu", "ort-cpu", "openvino-cpu"}
    assert served_backend().name == "ort-cpu"
    assert int8_layer_backend().name == "ort-cpu"
    assert predict_backend("openvino", "cpu").name == "openvino-cpu"
    assert predict_backend("torch-export", "cuda").name == "torch-export-cuda"
    with pytest.raises(InputError, match="predict has no backend for --runtime openvino --provider cuda"):
        predict_backend("openvino", "cuda")
    for backend in BACKENDS.values():  # every backend is compared at fp32, or stands for one
        assert backend.parity or backend.gate_as or backend.runtime == "torch" \
            or backend.name == "ort-tensorrt", backend.name
