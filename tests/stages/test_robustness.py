"""What a user of the real thing hits: interrupted exports, onnxsim failing, machine output
read by another program, preprocessing that must equal torchvision's, and hostile image files."""

import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.bundle import Bundle
from pipeline.models.archs import get_arch
from tests.conftest import TINY_ARCH, run_cli, run_module, write_images


def test_a_real_export_interrupted_by_a_signal_leaves_nothing_verify_accepts(tiny_bundle):
    """Ctrl-C part-way through re-exporting over a good bundle: the old export is already
    forgotten and the new one is not recorded, so verify refuses the folder (never exit 0)."""
    before = (tiny_bundle / "model.onnx").stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "export", "--arch", TINY_ARCH,
                             "--out", str(tiny_bundle), "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # wait until the new export has begun writing: the old model.onnx is gone or replaced
    while time.monotonic() < deadline and proc.poll() is None:
        path = tiny_bundle / "model.onnx"
        if not path.exists() or path.stat().st_mtime_ns != before:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    manifest = Bundle(tiny_bundle).read_manifest()
    assert "model.onnx" not in manifest.get("artifacts", {})
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 2 and "has no exported models" in result.stderr


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_onnxsim_failure_keeps_the_raw_model_with_a_warning(tmp_path, monkeypatch):
    import onnxsim

    from pipeline.core.console import StageTimer
    from pipeline.models.weights import load_model
    from pipeline.options import ExportOptions, VerifyOptions
    from pipeline.stages.export import export_bundle
    from pipeline.stages.verify import verify_bundle

    def broken(*args, **kwargs):
        raise RuntimeError("onnxsim could not fold a node")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    bundle = export_bundle(load_model(TINY_ARCH), tmp_path / "b", ExportOptions(), StageTimer(quiet=True))
    manifest = bundle.read_manifest()
    assert not bundle.path("model.sim.onnx").exists()
    assert "model.sim.onnx" not in manifest["artifacts"] and "model.onnx" in manifest["artifacts"]
    warnings = [w["message"] for w in manifest["warnings"] if w["stage"] == "export"]
    assert any("onnxsim failed, raw model kept" in w and "could not fold" in w for w in warnings)
    report = verify_bundle(bundle.root, VerifyOptions(cuda=False))
    assert report and {"onnx-ort-cpu", "onnx-openvino-cpu"} <= {p.candidate for p in report.pairs}


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
@pytest.mark.parametrize("command", [
    ["verify", "{bundle}", "--json"],
    ["bench", "{bundle}", "--json", "--backends", "ort-cpu:fp32", "--batch-sizes", "1",
     "--iterations", "3", "--seconds", "0", "--warmup-seconds", "0"],
    ["predict", "{bundle}", "{image}", "--json"],
])
def test_json_stdout_holds_only_json(tiny_bundle, tmp_path, command):
    """In a real process, where native libraries write straight to the file descriptors."""
    image = write_images(tmp_path / "p", count=1)[0]
    args = [a.format(bundle=tiny_bundle, image=image) for a in command]
    result = run_module(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    json.loads(result.stdout)  # nothing but JSON


def _jpeg(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth content with edges, like a photo, rather than white noise
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (17 + 5 * c)) * 80 + np.cos(y / (23 + 3 * c)) * 60 + 120
                     for c in range(3)], axis=-1)
    base += rng.normal(0, 12, base.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1024, 683), (224, 224), (640, 480)])
def test_eval_transform_equals_torchvision_resnet50_transforms(size):
    """Ours, numerically, against torchvision's own transform objects (built without a
    download): the arch default (256 -> 224, as IMAGENET1K_V1) and what --weights imagenet
    records for ResNet-50's DEFAULT weights (IMAGENET1K_V2: 232 -> 224)."""
    from torchvision.models import ResNet50_Weights

    from pipeline.data.images import eval_transform
    from pipeline.models.weights import weights_preprocessing

    image = _jpeg(*size, seed=size[0])
    pairs = [(get_arch("resnet50").preprocessing(), ResNet50_Weights.IMAGENET1K_V1),
             (weights_preprocessing(ResNet50_Weights.DEFAULT),
              ResNet50_Weights.DEFAULT)]
    assert pairs[1][0].resize == 232
    for prep, weights in pairs:
        ours = eval_transform(prep)(image)
        theirs = weights.transforms()(image)
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert float((ours - theirs).abs().max()) < 1e-5, weights


def _image_bytes(data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["random", "truncated", "mode", "extreme"]))
    if kind == "random":
        return data.draw(st.binary(max_size=2048))
    mode = data.draw(st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "I;16", "CMYK", "1", "F"]))
    if kind == "extreme":
        width = data.draw(st.sampled_from([1, 2, 3, 4000]))
        height = data.draw(st.sampled_from([1, 2, 3])) if width == 4000 else data.draw(st.sampled_from([1, 4000]))
    else:
        width, height = data.draw(st.integers(1, 64)), data.draw(st.integers(1, 64))
    image = Image.new(mode, (width, height))
    fmt = data.draw(st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # that mode cannot be written in that format
        image.convert("RGB").save(buffer, "PNG")
    blob = buffer.getvalue()
    if kind == "truncated":
        blob = blob[:data.draw(st.integers(0, max(0, len(blob) - 1)))]
    return blob


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_predict_never_crashes_on_hostile_files(tiny_bundle_master, tmp_path_factory, data):
    """Random bytes, truncated files, odd modes, extreme sizes: a prediction or a per-file
    error naming the file, never an exception."""
    from pipeline.options import PredictOptions
    from pipeline.stages.predict import predict

    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"file{data.draw(st.sampled_from(['.png', '.jpg', '.tif', '.gif', '.bin']))}"
    path.write_bytes(_image_bytes(data))
    results = predict(tiny_bundle_master, [path], PredictOptions(top_k=3, workers=0, threads=1))
    assert len(results) == 1
    result = results[0]
    if result.error:
        assert str(path) in result.error
    else:
        assert len(result.top) == 3 and all(np.isfinite(t.probability) for t in result.top)
