"""model.pt2 and AOTInductor: export, verify pairs, predict on a bare .pt2, load safety, and
the errors for corrupt archives and a missing compiler."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from tests.conftest import TINY_ARCH, requires_cuda, run_cli, run_module, write_images


def _pairs(bundle: Path) -> dict[str, list[dict]]:
    pairs: dict[str, list[dict]] = {}
    for row in json.loads((bundle / "parity.json").read_text())["pairs"]:
        pairs.setdefault(row["candidate"], []).append(row)
    return pairs


# ----------------------------------------------------------------------------- model.pt2
def test_export_writes_pt2_with_metadata_and_dynamic_batch(tiny_bundle_master: Path) -> None:
    import onnx
    import torch

    from pipeline.formats.pt2 import load_program, read_metadata
    from pipeline.models.weights import load_model

    manifest = json.loads((tiny_bundle_master / "manifest.json").read_text())
    entry = manifest["artifacts"]["model.pt2"]
    assert entry["stage"] == "export" and len(entry["sha256"]) == 64
    assert manifest["export"]["pt2"]["reload_max_abs_diff"] == 0.0

    onnx_meta = {p.key: p.value for p in onnx.load(str(tiny_bundle_master / "model.onnx"),
                                                   load_external_data=False).metadata_props}
    pt2_meta = read_metadata(tiny_bundle_master / "model.pt2")
    for key in ("arch", "class_names", "preprocessing", "weights", "pipeline_version"):
        assert pt2_meta[key] == onnx_meta[key], key
    assert json.loads(pt2_meta["class_names"]) == [f"c{i}" for i in range(10)]

    module = load_program(tiny_bundle_master / "model.pt2").module()
    eager = load_model(checkpoint=tiny_bundle_master / "weights.pt").model.eval()
    for batch in (1, 5):  # the example batch was 2: both sides of it must work
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(module(x), eager(x), atol=1e-5)


def test_verify_compares_pt2_at_batch_one_and_three(tiny_bundle_master: Path) -> None:
    rows = _pairs(tiny_bundle_master)["torch-export-cpu"]
    assert {row["batch"] for row in rows} == {1, 3}
    assert all(row["passed"] and row["model_file"] == "model.pt2" for row in rows)


def test_predict_accepts_a_bare_pt2(tiny_bundle_master: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "imgs", count=3)
    lone = Path(shutil.copy(tiny_bundle_master / "model.pt2", tmp_path / "lone.pt2"))
    from_pt2 = run_cli("predict", lone, *images, "--json")
    from_onnx = run_cli("predict", tiny_bundle_master, *images, "--json")
    assert from_pt2.exit_code == 0 and from_onnx.exit_code == 0, from_pt2.stderr
    pt2_rows, onnx_rows = json.loads(from_pt2.stdout), json.loads(from_onnx.stdout)
    for a, b in zip(pt2_rows, onnx_rows):
        assert a["file"] == b["file"] and a["top"][0]["label"] == b["top"][0]["label"]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)
    bundle_pt2 = run_cli("predict", tiny_bundle_master, *images, "--runtime", "torch-export", "--json")
    assert bundle_pt2.exit_code == 0 and json.loads(bundle_pt2.stdout) == pt2_rows


def test_bench_times_torch_export(tiny_bundle: Path) -> None:
    result = run_cli("bench", tiny_bundle, "--backends", "torch-export-cpu", "--batch-sizes", "1",
                     "--iterations", "5", "--seconds", "0", "--warmup-seconds", "0", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert row["backend"] == "torch-export-cpu" and row["status"] == "ok"
    assert row["model_file"] == "model.pt2" and row["p50_ms"] > 0


# ----------------------------------------------------------------------------- load safety
class _RunsCode:
    """A pickle that, when loaded by an unrestricted unpickler, creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a .pt2 archive, replacing the records named (relative to the archive root)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            record = info.filename.split("/", 1)[1]
            new.writestr(info, replace.get(record, old.read(info.filename)))
    return target


def _torch_save_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def crafted(tiny_bundle_master: Path, tmp_path: Path) -> tuple[Path, Path]:
    """model.pt2 whose sample inputs are a pickle that runs a command."""
    marker = tmp_path / "code-ran"
    payload = _torch_save_bytes(_RunsCode(marker))
    path = _rewrite(tiny_bundle_master / "model.pt2", tmp_path / "crafted.pt2",
                    {"data/sample_inputs/model.pt": payload})
    return path, marker


def test_torch_export_load_itself_runs_code_from_the_archive(crafted: tuple[Path, Path]) -> None:
    """The premise of our guard, in this torch version: torch.export.load retries the sample
    inputs with weights_only=False, so a crafted archive runs code. If a torch upgrade makes
    this fail, its loader became safe, and the guard can be revisited."""
    import torch

    path, marker = crafted
    with pytest.raises(Exception):
        torch.export.load(str(path))  # the payload is not a valid sample-inputs tuple ...
    assert marker.exists()  # ... but the command ran before that was noticed


def test_crafted_pickle_is_refused_before_any_code_runs(crafted: tuple[Path, Path]) -> None:
    from pipeline.formats.pt2 import load_program

    path, marker = crafted
    with pytest.raises(InputError, match="would unpickle arbitrary objects"):
        load_program(path)
    assert not marker.exists()
    result = run_module("predict", path, write_images(path.parent / "imgs", count=1)[0])
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "refusing" in result.stderr


def test_pickled_weight_entries_are_refused(tiny_bundle_master: Path, tmp_path: Path) -> None:
    from pipeline.formats.pt2 import load_program

    source = tiny_bundle_master / "model.pt2"
    with zipfile.ZipFile(source) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    path = _rewrite(source, tmp_path / "pickled.pt2",
                    {"data/weights/model_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(InputError, match="pickled"):
        load_program(path)


@pytest.mark.parametrize("kind", ["garbage", "onnx", "zip", "truncated"])
def test_corrupt_pt2_exits_2_with_one_line(kind: str, tiny_bundle_master: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt2"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "onnx":
        shutil.copy(tiny_bundle_master / "model.onnx", path)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("root/hello.txt", "not a model")
    else:
        data = (tiny_bundle_master / "model.pt2").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    image = write_images(tmp_path / "imgs", count=1)[0]
    result = run_module("predict", path, image)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "bad.pt2" in result.stderr


def test_verify_exits_2_when_the_recorded_pt2_is_not_a_program(tiny_bundle: Path) -> None:
    """A model.pt2 that the manifest vouches for (hash matches) but is not an ExportedProgram."""
    from pipeline.core.bundle import Bundle

    (tiny_bundle / "model.pt2").write_bytes(b"PK\x03\x04 this is not a model")
    bundle = Bundle.open(tiny_bundle)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, "model.pt2", stage="export"))
    result = run_module("verify", tiny_bundle)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.pt2" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- AOTInductor
def test_aoti_without_a_compiler_exits_3_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    result = run_module("export", "--arch", TINY_ARCH, "--out", out, "--aoti", env=env)
    assert result.returncode == 3, result.stderr
    assert "C++ compiler" in result.stderr and "CXX" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_aoti_refuses_a_package_compiled_for_another_cpu(aoti_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(aoti_bundle, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["export"]["aoti"]["cpu"]["isa_flags"].append("avx512_made_up")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_module("verify", bundle)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "avx512_made_up" in result.stdout + result.stderr


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real AOTInductor compile of the tiny model, shared by the tests below."""
    out = tmp_path_factory.mktemp("aoti") / TINY_ARCH
    result = run_module("export", "--arch", TINY_ARCH, "--out", out, "--aoti", "--no-simplify",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_aoti_cpu_package_is_recorded_verified_and_benched(aoti_bundle: Path) -> None:
    manifest = json.loads((aoti_bundle / "manifest.json").read_text())
    record = manifest["export"]["aoti"]["cpu"]
    assert record["compile_s"] > 0 and record["compiler"] and record["compiler_version"]
    assert manifest["artifacts"]["model.aoti-cpu.pt2"]["sha256"]
    rows = _pairs(aoti_bundle)["aoti-cpu"]
    assert {row["batch"] for row in rows} == {1, 3} and all(row["passed"] for row in rows)
    result = run_cli("bench", aoti_bundle, "--backends", "aoti-cpu,torch-export-cpu,ort-cpu:fp32",
                     "--batch-sizes", "1,4", "--iterations", "5", "--seconds", "0",
                     "--warmup-seconds", "0", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {(r["backend"], r["batch"]) for r in rows if r["status"] == "ok"} == {
        (b, n) for b in ("aoti-cpu", "torch-export-cpu", "ort-cpu") for n in (1, 4)}


@pytest.mark.slow
def test_aoti_package_is_not_an_exported_program(aoti_bundle: Path, tmp_path: Path) -> None:
    result = run_module("predict", aoti_bundle / "model.aoti-cpu.pt2",
                        write_images(tmp_path / "imgs", count=1)[0])
    assert result.returncode == 2 and "AOTInductor package" in result.stderr


@requires_cuda()
def test_pt2_and_aoti_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = run_module("export", "--arch", TINY_ARCH, "--out", out, "--aoti", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = _pairs(out)
    for key in ("torch-export-cuda", "aoti-cuda"):
        assert {row["batch"] for row in pairs[key]} == {1, 3}
        assert all(row["passed"] for row in pairs[key]), pairs[key]
