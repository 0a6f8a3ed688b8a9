import json

import numpy as np
import torch

from pipeline.data.images import eval_transform, open_rgb
from pipeline.models.archs import Preprocessing
from pipeline.models.weights import load_model
from tests.conftest import requires_cuda, run_cli, write_images


def _eager_top1(bundle, paths):
    loaded = load_model(checkpoint=bundle / "weights.pt")
    manifest = json.loads((bundle / "manifest.json").read_text())
    transform = eval_transform(Preprocessing.from_dict(manifest["model"]["preprocessing"]))
    batch = torch.stack([transform(open_rgb(p)) for p in paths])
    with torch.no_grad():
        return [loaded.class_names[i] for i in loaded.model(batch).argmax(1).tolist()]


def test_predict_matches_eager_pytorch(tiny_bundle, tmp_path):
    paths = write_images(tmp_path / "photos", count=6, size=48)
    result = run_cli("predict", tiny_bundle, tmp_path / "photos", "--top-k", "3", "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert [p["file"] for p in predictions] == [str(p) for p in paths]
    assert [p["top"][0]["label"] for p in predictions] == _eager_top1(tiny_bundle, paths)
    for p in predictions:
        assert len(p["top"]) == 3
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_bare_onnx_file_uses_its_metadata(tiny_bundle, tmp_path):
    paths = write_images(tmp_path / "photos", count=3)
    lone = tmp_path / "lone.onnx"
    lone.write_bytes((tiny_bundle / "model.onnx").read_bytes())
    result = run_cli("predict", lone, *paths, "--top-k", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    expected = _eager_top1(tiny_bundle, paths)
    assert [line.split(": ")[1].split()[0] for line in lines] == expected
    assert all(name.startswith("c") for name in expected)  # class names came from metadata


def test_bad_files_are_reported_and_the_rest_classified(tiny_bundle, tmp_path):
    from PIL import Image

    paths = write_images(tmp_path / "photos", count=2)
    corrupt = tmp_path / "photos" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 20)
    palette = tmp_path / "photos" / "palette.png"
    Image.fromarray(np.arange(40 * 40, dtype=np.uint8).reshape(40, 40) % 7).convert("P").save(palette)
    sixteen = tmp_path / "photos" / "deep.png"
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(sixteen)
    result = run_cli("predict", tiny_bundle, tmp_path / "photos", tmp_path / "missing.jpg")
    assert result.exit_code == 1
    assert "corrupt.jpg" in result.stderr and "missing.jpg" in result.stderr
    classified = {line.split(":")[0] for line in result.stdout.splitlines()}
    assert classified == {str(p) for p in paths} | {str(palette), str(sixteen)}
    assert "Traceback" not in result.output


def test_decompression_bomb_is_refused(tiny_bundle, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (12000, 8000)).save(big)  # 96 Mpx > PIL's 89 Mpx guard
    result = run_cli("predict", tiny_bundle, big)
    assert result.exit_code == 1 and "decompression bomb" in result.stderr


def test_not_an_onnx_model(tmp_path):
    fake = tmp_path / "fake.onnx"
    fake.write_text("hello")
    result = run_cli("predict", fake, tmp_path)
    assert result.exit_code == 2 and "is not an ONNX model" in result.stderr


def test_cuda_provider_is_refused_not_faked(tiny_bundle, tmp_path, cuda_available):
    paths = write_images(tmp_path / "photos", count=1)
    result = run_cli("predict", tiny_bundle, *paths, "--provider", "cuda", "--json")
    if cuda_available:
        assert result.exit_code == 0, result.output
        cpu = json.loads(run_cli("predict", tiny_bundle, *paths, "--json").stdout)
        gpu = json.loads(result.stdout)
        assert [p["top"][0]["label"] for p in gpu] == [p["top"][0]["label"] for p in cpu]
        assert abs(gpu[0]["top"][0]["probability"] - cpu[0]["top"][0]["probability"]) < 1e-3
    else:
        assert result.exit_code == 3 and "ort-cuda" in result.stderr and result.stdout == ""


def test_a_cuda_session_that_falls_back_to_cpu_is_refused(tiny_bundle, tmp_path, monkeypatch):
    """CUDA listed and a GPU "visible", but the session really runs on the CPU (e.g. libcudnn
    missing): refused with exit 3, never reported as CUDA."""
    import onnxruntime as ort

    from pipeline.runtimes import ort as runners

    monkeypatch.setattr(runners, "ort_provider_problem", lambda provider: None)
    monkeypatch.setattr(runners, "_preload_cuda_libraries", lambda: None)
    real_session = ort.InferenceSession

    def cpu_only_session(path, sess_options=None, providers=None):
        session = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        return session  # its get_providers() says CPUExecutionProvider only, as a fallback would

    monkeypatch.setattr(ort, "InferenceSession", cpu_only_session)
    paths = write_images(tmp_path / "photos", count=1)
    result = run_cli("predict", tiny_bundle, *paths, "--provider", "cuda")
    assert result.exit_code == 3, result.output
    assert "CUDAExecutionProvider was requested but the session runs on CPUExecutionProvider" in result.stderr
    assert result.stdout == ""


@requires_cuda()
def test_predict_on_cuda_matches_cpu(tiny_bundle, tmp_path):
    paths = write_images(tmp_path / "photos", count=3)
    cpu = json.loads(run_cli("predict", tiny_bundle, *paths, "--json").stdout)
    gpu = json.loads(run_cli("predict", tiny_bundle, *paths, "--json", "--provider", "cuda").stdout)
    assert [p["top"][0]["label"] for p in cpu] == [p["top"][0]["label"] for p in gpu]
