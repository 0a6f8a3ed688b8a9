"""verify --localize: the first layer where an export departs from eager PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from pipeline.core.bundle import Bundle
from tests.conftest import run_cli


def _rehash(bundle_dir, name):
    """An exporter bug, not tampering: the manifest agrees with the broken file."""
    bundle = Bundle(bundle_dir)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, name, stage="export"))


def _localized(bundle_dir):
    parity = json.loads((bundle_dir / "parity.json").read_text())
    return {found["candidate"]: found for found in parity["localized"]}


def _corrupt_onnx_layer(path, weight):
    model = onnx.load(str(path))
    (target,) = [t for t in model.graph.initializer if t.name == weight]
    values = numpy_helper.to_array(target).copy()
    values[0] *= -1.0  # one output channel flipped: a bug a whole-model number cannot place
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    onnx.save(model, str(path))


# the raw export is slow: the simplified file runs the same localization in the quick suite
@pytest.mark.parametrize("name,candidate", [
    pytest.param("model.onnx", "onnx-ort-cpu", marks=pytest.mark.slow),
    ("model.sim.onnx", "onnx-sim-ort-cpu")])
def test_a_corrupted_onnx_layer_is_named(tiny_bundle, name, candidate):
    _corrupt_onnx_layer(tiny_bundle / name, "layer3.1.conv2.weight")
    _rehash(tiny_bundle, name)
    result = run_cli("verify", tiny_bundle, "--cpu-only", "--json")
    assert result.exit_code == 1
    json.loads(result.stdout)  # --json stays clean with localization on
    found = _localized(tiny_bundle)
    assert set(found) == {candidate}  # failed pairs are localized without being asked
    layer = found[candidate]["first_divergent"]
    assert layer["pytorch"].startswith("layer3.1.conv2")  # folded with layer3.1.bn2 in ONNX
    assert layer["op"] == "Conv" and layer["artifact"].startswith("node_Conv")
    assert layer["max_abs_vs_fp64"] > layer["tolerance"]
    table = run_cli("verify", tiny_bundle, "--cpu-only")
    assert f"localize {candidate}" in table.stdout and "first divergent layer" in table.stdout
    assert "layer3.1.conv2" in table.stdout


def test_a_corrupted_pt2_layer_is_named(tiny_bundle):
    program = torch.export.load(str(tiny_bundle / "model.pt2"))
    with torch.no_grad():
        program.state_dict["layer3.1.conv2.weight"][0] *= -1.0
    torch.export.save(program, str(tiny_bundle / "model.pt2"))
    _rehash(tiny_bundle, "model.pt2")
    result = run_cli("verify", tiny_bundle, "--cpu-only")
    assert result.exit_code == 1 and "torch-export-cpu" in result.stderr
    layer = _localized(tiny_bundle)["torch-export-cpu"]["first_divergent"]
    assert layer["pytorch"] == "layer3.1.conv2" and "conv" in layer["op"]


def test_a_preprocessing_slip_names_the_first_layer(tiny_bundle):
    """A graph that scales its input by 255 (forgot to normalise) diverges at the stem."""
    path = tiny_bundle / "model.sim.onnx"
    model = onnx.load(str(path))
    graph, name = model.graph, model.graph.input[0].name
    for node in graph.node:
        node.input[:] = ["scaled" if x == name else x for x in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array(255.0, np.float32), "by255"))
    graph.node.insert(0, helper.make_node("Mul", [name, "by255"], ["scaled"], name="slip"))
    onnx.save(model, str(path))
    _rehash(tiny_bundle, "model.sim.onnx")
    assert run_cli("verify", tiny_bundle, "--cpu-only").exit_code == 1
    layer = _localized(tiny_bundle)["onnx-sim-ort-cpu"]["first_divergent"]
    assert layer["index"] == 0 and layer["pytorch"].startswith("conv1")


def test_localize_on_a_sound_bundle_finds_nothing(tiny_bundle):
    """Asked for on a bundle that passes: every layer of every candidate within its own
    tolerance (no false alarm), and the exit code stays 0."""
    result = run_cli("verify", tiny_bundle, "--cpu-only", "--localize", "--json")
    assert result.exit_code == 0, result.output
    found = {f["candidate"]: f for f in json.loads(result.stdout)["parity"]["localized"]}
    assert {"onnx-ort-cpu", "onnx-sim-ort-cpu", "torch-export-cpu"} <= set(found)
    for entry in found.values():
        assert entry["first_divergent"] is None and entry["layers_compared"] >= 40, entry
        assert entry["note"] == "no layer exceeds its tolerance"
