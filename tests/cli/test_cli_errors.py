"""Bad input: one clear line, the documented exit code, no traceback, nothing half-written."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli, run_module


def _assert_user_error(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(("error:", "Error:"))
    for needle in needles:
        assert needle in result.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from pipeline.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','onnx','onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["archs", "export", "verify", "train", "run", "bench", "report", "predict"])
def test_every_command_help_has_an_example(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "Example:" in result.output


def test_unknown_arch(tmp_path):
    result = run_cli("export", "--arch", "resnet19", "--out", tmp_path / "x")
    _assert_user_error(result, 2, "unknown arch 'resnet19'", "resnet18, resnet34")
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint(tmp_path):
    result = run_cli("export", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "x")
    _assert_user_error(result, 2, "nope.pt", "does not exist")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    result = run_cli("export", "--checkpoint", bad, "--out", tmp_path / "x")
    _assert_user_error(result, 2, "bad.pt", "cannot be read")


def test_checkpoint_of_another_arch(tmp_path):
    import torch

    from pipeline.models.archs import get_arch

    ckpt = tmp_path / "r34.pt"
    torch.save(get_arch("resnet34_cifar").build().state_dict(), ckpt)
    result = run_cli("export", "--arch", "resnet18_cifar", "--checkpoint", ckpt, "--out", tmp_path / "x")
    _assert_user_error(result, 2, "does not fit arch 'resnet18_cifar'")
    torch.save({"state_dict": get_arch("resnet34_cifar").build().state_dict(),
                "arch": "resnet34_cifar", "num_classes": 10}, ckpt)
    result = run_cli("export", "--arch", "resnet18_cifar", "--checkpoint", ckpt, "--out", tmp_path / "x")
    _assert_user_error(result, 2, "is for arch 'resnet34_cifar'")


def test_checkpoint_class_count_mismatch(tmp_path):
    import torch

    from pipeline.models.archs import get_arch

    ckpt = tmp_path / "c3.pt"
    torch.save(get_arch("resnet18_cifar").build(3).state_dict(), ckpt)
    result = run_cli("export", "--arch", "resnet18_cifar", "--checkpoint", ckpt,
                     "--num-classes", "10", "--out", tmp_path / "x")
    _assert_user_error(result, 2, "has 3 classes, not --num-classes 10")


@pytest.mark.parametrize("args,needle", [
    (["--opset", "12"], "--opset 12 is outside what the dynamo exporter supports: 18.."),
    (["--opset", "99", "--exporter", "legacy"], "--opset 99 is outside what the legacy exporter"),
])
def test_opset_out_of_range(tmp_path, args, needle):
    result = run_cli("export", "--arch", "resnet18_cifar", "--out", tmp_path / "x", *args)
    _assert_user_error(result, 2, needle)
    assert not (tmp_path / "x").exists()


def test_class_names_count_mismatch(tmp_path):
    result = run_cli("export", "--arch", "resnet18_cifar", "--class-names", "a,b", "--out", tmp_path / "x")
    _assert_user_error(result, 2, "2 class names given for 10 classes")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_unwritable_output_dir_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli("export", "--arch", "resnet18_cifar", "--out", locked / "b")
    _assert_user_error(result, 2, "cannot be written")


def test_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("export", "--arch", "resnet18_cifar", "--out", blocker / "bundle")
    _assert_user_error(result, 2, "cannot be written", "--out")


def test_bundle_missing(tmp_path):
    _assert_user_error(run_cli("verify", tmp_path / "nowhere"), 2, "does not exist")


def test_bundle_without_manifest(tmp_path):
    _assert_user_error(run_cli("verify", tmp_path), 2, "has no manifest.json")


def test_manifest_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{ not json")
    _assert_user_error(run_cli("verify", tmp_path), 2, "is not valid JSON")


def test_onnx_file_that_is_not_onnx(tiny_bundle):
    from pipeline.core.bundle import Bundle

    (tiny_bundle / "model.onnx").write_bytes(b"\x00garbage, definitely not protobuf" * 10)
    bundle = Bundle(tiny_bundle)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, "model.onnx", stage="export"))
    result = run_cli("verify", tiny_bundle)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model.onnx" in result.stderr and "is not an ONNX model" in result.stderr


def test_images_empty_folder(tiny_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(run_cli("verify", tiny_bundle, "--images", empty), 2, "holds no image files")


def test_images_that_are_not_images(tiny_bundle, tmp_path):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "a.jpg").write_text("this is text")
    _assert_user_error(run_cli("verify", tiny_bundle, "--images", folder), 2, "a.jpg", "not an image")


def test_imagenet_weights_offline_fail_fast(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub")}
    start = time.monotonic()
    result = run_module("export", "--arch", "resnet18", "--weights", "imagenet",
                        "--out", tmp_path / "x", env=env, timeout=60)
    elapsed = time.monotonic() - start
    if result.returncode == 0:
        pytest.skip("this machine reached download.pytorch.org; the offline path cannot be shown")
    assert result.returncode == 3, result.stderr
    assert "--checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 10 + 5  # 10 s budget for the download attempt, plus interpreter start-up
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_imagenet_weights_for_arch_without_them(tmp_path):
    result = run_cli("export", "--arch", "resnet18_cifar", "--weights", "imagenet", "--out", tmp_path / "x")
    _assert_user_error(result, 2, "not available for 'resnet18_cifar'", "--checkpoint")


def test_interrupted_export_leaves_nothing_verify_accepts(tiny_bundle):
    """A crash between artifact writes: the new file's hash no longer matches the manifest."""
    from pipeline.core.bundle import Bundle

    manifest = Bundle(tiny_bundle).read_manifest()
    # simulate: export rewrote model.onnx (different weights) and died before the manifest
    (tiny_bundle / "model.onnx").write_bytes((tiny_bundle / "model.onnx").read_bytes()[:-10])
    assert json.loads((tiny_bundle / "manifest.json").read_text()) == manifest
    assert run_cli("verify", tiny_bundle).exit_code == 1


def test_a_reader_that_goes_away_ends_quietly():
    """`python -m pipeline archs | head -1`: the reader closes the pipe before the table is
    written; the command stops with 141 (SIGPIPE's shell code), no trace and no second
    complaint from the interpreter's last flush."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "archs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141, stderr
    assert b"Traceback" not in stderr and b"internal error" not in stderr
