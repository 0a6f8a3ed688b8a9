"""Each runtime module on its own: what it reads back, what it refuses, and close()."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.runtimes.base import Runner


def test_runner_base_closes_on_every_path():
    closed = []

    class Probe(Runner):
        def close(self) -> None:
            closed.append(True)

    with pytest.raises(RuntimeError):
        with Probe():
            raise RuntimeError("boom")
    assert closed == [True]


def test_ort_reads_its_provider_and_metadata_back(tiny_bundle):
    from pipeline.runtimes.ort import OrtRunner

    runner = OrtRunner(tiny_bundle / "model.sim.onnx", threads=1)
    assert runner.provider == "CPUExecutionProvider" and runner.device == "cpu"
    assert json.loads(runner.metadata()["class_names"])[0] == "c0"
    runner.close()
    assert runner.session is None


def test_ort_refuses_a_file_that_is_not_onnx(tmp_path):
    from pipeline.runtimes.ort import OrtRunner

    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="is not an ONNX model"):
        OrtRunner(tmp_path / "x.onnx")


def test_openvino_reads_the_precision_it_chose(tiny_bundle):
    """In a fresh interpreter, as bench's workers run it: an f32 and a bf16 compiled model
    in one pytest process made a later test's SIGINT crash that process (seen on an AMD Zen 4,
    OpenVINO 2026.4), so OpenVINO's process-wide state stays out of the suite's process."""
    code = f"""
import json, numpy as np
from pipeline.runtimes.openvino import OpenVinoRunner
path = {str(tiny_bundle / "model.sim.onnx")!r}
pinned = OpenVinoRunner(path, precision="fp32", threads=1)
auto = OpenVinoRunner(path, precision="auto", threads=1)
batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
shape = list(pinned.infer(batch).shape)
facts = dict(pinned=pinned.precision, auto=auto.precision, chosen=auto.inference_precision,
             provider=auto.provider, meta="class_names" in pinned.metadata(), shape=shape)
pinned.close(); auto.close()
print(json.dumps(facts))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["pinned"] == "fp32" and facts["auto"] in ("fp32", "bf16")
    assert facts["provider"] == f"openvino:CPU ({facts['chosen']})"
    assert facts["meta"] and facts["shape"] == [2, 10]


def test_torch_runners_agree_on_the_same_weights(tiny_bundle):
    from pipeline.runtimes.torch import TorchRunner

    batch = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    eager = TorchRunner.from_weights(tiny_bundle / "weights.pt")
    program = TorchRunner.from_program(tiny_bundle / "model.pt2")
    script = TorchRunner.from_torchscript(tiny_bundle / "model.ts")
    assert (eager.provider, program.name, script.name) == ("torch:cpu", "torch-export-cpu",
                                                            "torchscript-cpu")
    assert "class_names" in program.metadata()  # extra/pipeline.json of the .pt2
    np.testing.assert_allclose(program.infer(batch), eager.infer(batch), atol=1e-4)
    np.testing.assert_allclose(script.infer(batch), eager.infer(batch), atol=1e-4)
    for runner in (eager, program, script):
        runner.close()
        assert runner.model is None


def test_torch_refuses_a_precision_it_cannot_run(tiny_bundle):
    from pipeline.runtimes.torch import TorchRunner

    with pytest.raises(InputError, match="runs fp32 or bf16, not 'int8'"):
        TorchRunner.from_weights(tiny_bundle / "weights.pt", precision="int8")


def test_aoti_refuses_a_package_built_for_instructions_this_cpu_lacks(tmp_path):
    from pipeline.runtimes.aoti import AotiRunner

    with pytest.raises(EnvironmentUnavailable, match="avx9000_imaginary, which this CPU lacks"):
        AotiRunner(tmp_path / "model.aoti-cpu.pt2", isa_flags=["avx9000_imaginary"])


def test_triton_client_says_when_no_server_answers(tiny_bundle):
    from pipeline.runtimes.triton import ServedModel, TritonHttpRunner
    from pipeline.serving.serve import free_port

    model = ServedModel.from_onnx("resnet18_cifar", tiny_bundle / "model.sim.onnx")
    assert (model.input_name, model.input_shape, model.classes) == ("input", (3, 32, 32), 10)
    with pytest.raises(EnvironmentUnavailable, match="no Triton server answers"):
        TritonHttpRunner(f"http://127.0.0.1:{free_port()}", model, timeout_s=2)
