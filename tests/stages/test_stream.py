"""The streaming engine behind predict: order, bad files, output files, Ctrl-C, --resume,
bounded memory, the core split, and --precision auto."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.data.images import decode_crop, eval_transform, normalise, open_rgb
from pipeline.models.archs import Preprocessing
from pipeline.stages.stream import split_rule, walk
from tests.conftest import run_cli, write_images

PREP = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """Images in nested folders with a bad file in the middle of the walk."""
    root = tmp_path_factory.mktemp("nested")
    write_images(root / "a", count=3, size=40, seed=1)
    write_images(root / "a" / "deeper", count=2, size=48, seed=2)
    (root / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_images(root / "c", count=4, size=36, seed=3)
    return root


def _expected_order(root):
    return [str(p) for p, _ in walk([root])]


def test_decode_crop_is_exactly_the_transform_the_model_was_checked_with(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, (w, h) in enumerate([(640, 480), (333, 517), (256, 256), (225, 1000), (100, 80)]):
        path = tmp_path / f"{index}.jpg"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        reference = eval_transform(PREP)(open_rgb(path)).numpy()
        ours = normalise(decode_crop(path, PREP)[None], PREP)[0]
        assert ours.shape == reference.shape and np.abs(ours - reference).max() < 1e-5


def test_split_rule_gives_each_side_cores_by_its_cost():
    assert split_rule(2, 0.004, 0.004) == (1, 1)
    assert split_rule(2, 0.014, 0.006) == (2, 1)  # decode-heavy: one core is shared
    assert split_rule(2, 0.002, 0.010) == (1, 2)
    assert split_rule(16, 0.004, 0.012) == (4, 12)
    assert split_rule(16, 0.012, 0.004) == (12, 4)
    assert split_rule(16, 0.004, 0.012, device="cuda") == (16, 1)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_output_keeps_input_order_and_places_bad_files(tiny_bundle, nested, tmp_path, workers):
    out = tmp_path / "labels.jsonl"
    result = run_cli("predict", tiny_bundle, nested, "--output", out, "--workers", workers,
                     "--threads", "1", "--batch-size", "3", "-q")
    assert result.exit_code == 1  # one file could not be classified
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["file"] for line in lines] == _expected_order(nested)
    broken = [line for line in lines if "error" in line]
    assert len(broken) == 1 and broken[0]["file"].endswith("b_broken.jpg")
    assert all(len(line["top"]) == 5 for line in lines if "error" not in line)
    assert "b_broken.jpg" in result.stderr


def test_stdout_stream_matches_the_file_and_json_is_one_array(tiny_bundle, nested, tmp_path):
    out = tmp_path / "labels.jsonl"
    run_cli("predict", tiny_bundle, nested, "--output", out, "-q")
    from_file = [json.loads(line) for line in out.read_text().splitlines()]
    printed = json.loads(run_cli("predict", tiny_bundle, nested, "--json", "-q").stdout)
    assert printed == from_file


def test_csv_output(tiny_bundle, nested, tmp_path):
    out = tmp_path / "labels.csv"
    assert run_cli("predict", tiny_bundle, nested, "--output", out, "--top-k", "2", "-q").exit_code == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == _expected_order(nested)
    good = [r for r in rows if not r["error"]]
    assert all(r["label"].startswith("c") and 0 < float(r["probability"]) <= 1 for r in good)
    assert all(r["top"].count("|") == 1 and r["top"].startswith(r["label"] + ":") for r in good)
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "not an image" in bad[0]["error"] or "corrupt" in bad[0]["error"]


@pytest.mark.parametrize("args,message", [
    (["--output", "labels.txt"], "the suffix chooses the format"),
    (["--resume"], "--resume needs --output"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
])
def test_bad_predict_options_are_exit_2(tiny_bundle, nested, tmp_path, args, message):
    result = run_cli("predict", tiny_bundle, nested, *[tmp_path / a if a.endswith(".txt") else a
                                                       for a in args])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "labels.txt").exists()


def test_an_existing_output_is_never_overwritten(tiny_bundle, nested, tmp_path):
    out = tmp_path / "labels.jsonl"
    out.write_text("precious\n")
    result = run_cli("predict", tiny_bundle, nested, "--output", out)
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert out.read_text() == "precious\n"


def test_resume_skips_what_is_done_and_drops_a_cut_line(tiny_bundle, nested, tmp_path):
    out = tmp_path / "labels.jsonl"
    run_cli("predict", tiny_bundle, nested, "--output", out, "-q")
    full = out.read_text().splitlines()
    # as a killed run leaves it: four whole lines and half of the fifth
    out.write_text("\n".join(full[:4]) + "\n" + full[4][:30])
    result = run_cli("predict", tiny_bundle, nested, "--output", out, "--resume")
    assert "4 already done" in result.stderr
    assert out.read_text().splitlines() == full


def test_ctrl_c_leaves_a_valid_partial_file_that_resume_completes(tiny_bundle, tmp_path):
    photos = tmp_path / "many"
    write_images(photos, count=400, size=40, seed=5)
    out = tmp_path / "labels.jsonl"
    command = [sys.executable, "-m", "pipeline", "predict", str(tiny_bundle), str(photos),
               "--output", str(out), "--batch-size", "1", "--workers", "1", "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "add --resume to continue" in stderr and "Traceback" not in stderr
    lines = out.read_text().splitlines()
    assert 20 <= len(lines) < 400 and out.read_text().endswith("\n")
    assert all("top" in json.loads(line) for line in lines)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    files = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert files == [str(p) for p, _ in walk([photos])]  # every file once, in order


def _peak_rss_mb(command):
    """Peak resident memory of a child process (Linux ru_maxrss is in KiB)."""
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
              "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow  # heavy; .ci/run runs it after the quick suite
def test_memory_does_not_grow_with_the_number_of_files(tiny_bundle, tmp_path):
    """At a small scale: 5x the files, the same peak (no list of results, a bounded window
    of decoded images). The engine decodes here (--workers 0) so one process is measured."""
    few, many = tmp_path / "few", tmp_path / "many"
    paths = write_images(few, count=60, size=300, seed=7)
    many.mkdir()
    for copy in range(5):
        for path in paths:
            os.link(path, many / f"{copy}-{path.name}")
    base = [sys.executable, "-m", "pipeline", "predict", str(tiny_bundle), "--workers", "0",
            "--threads", "1", "-q", "--output"]
    small = _peak_rss_mb(base + [str(tmp_path / "few.jsonl"), str(few)])
    large = _peak_rss_mb(base + [str(tmp_path / "many.jsonl"), str(many)])
    assert (tmp_path / "many.jsonl").read_text().count("\n") == 300
    assert large - small < 25, (small, large)


def test_auto_runs_fp32_when_nothing_was_gated(tiny_bundle, nested):
    result = run_cli("predict", tiny_bundle, nested / "a")
    assert result.exit_code == 0
    assert "precision auto: ort-cpu:fp32 (no reduced precision passed its gate here: fp32)" \
        in result.stderr
    (tiny_bundle / "parity.json").unlink()
    result = run_cli("predict", tiny_bundle, nested / "a")
    assert "precision auto: ort-cpu:fp32 (no verify results (parity.json): fp32)" in result.stderr


@pytest.mark.slow
def test_ray_data_gives_the_same_predictions_as_one_process(tiny_bundle, nested, tmp_path):
    """predict --ray on a local Ray (2 CPUs): decode in Ray tasks, an actor pool for the
    model; the JSONL it writes equals single-process predict's, bad file included."""
    pytest.importorskip("ray.data")
    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run_cli("predict", tiny_bundle, nested, "--output", local, "-q")
    result = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(tiny_bundle),
                             str(nested), "--ray", "--output", str(distributed)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # the broken file, as in one process
    assert "decode in tasks" in result.stderr
    assert distributed.read_text() == local.read_text()
