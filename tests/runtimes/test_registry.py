"""The registry: the one place that names backends and constructs runners."""

from __future__ import annotations

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
