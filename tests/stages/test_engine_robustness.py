"""predict's streaming engine survives what a plain loop survives: links that loop or dangle,
folders it cannot read, callers without a ``__main__`` guard, and a decode worker that dies.
Every case runs the real engine (real decode worker processes, a real ORT session), through
the CLI or the API in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.stages.decoders import KILL_HOOK, KILL_ONCE_HOOK
from pipeline.stages.stream import walk
from tests.conftest import run_module, write_images

REPO = Path(__file__).resolve().parents[2]
# root ignores file permissions; without these two capabilities it obeys them, as a user does.
AS_A_USER = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
             if os.geteuid() == 0 and shutil.which("setpriv") else [])


def _predict_json(bundle: Path, *inputs: Path, env: dict | None = None,
                  extra: tuple[str, ...] = ()) -> tuple[int, list[dict], str]:
    done = subprocess.run([*AS_A_USER, sys.executable, "-m", "pipeline", "predict", str(bundle),
                           *map(str, inputs), "--json", "-q", *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    return done.returncode, json.loads(done.stdout or "[]"), done.stderr


@pytest.fixture
def tangled(tmp_path):
    """Six photos beside a self-loop link, a link to an ancestor, a dangling link, a link back
    into the tree and a folder nobody may read."""
    root = tmp_path / "photos"
    write_images(root, count=4, seed=11)
    write_images(root / "nested", count=2, seed=12)
    (root / "loop").symlink_to("loop")
    (root / "up").symlink_to("..")
    (root / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "nested" / "back").symlink_to("..")
    locked = root / "locked"
    write_images(locked, count=1, seed=13)
    locked.chmod(0)
    yield root
    locked.chmod(0o755)


def test_links_and_unreadable_folders_are_error_lines_and_the_photos_are_classified(tiny_bundle, tangled):
    if os.geteuid() == 0 and not AS_A_USER:
        pytest.skip("root without setpriv reads any folder")
    code, items, stderr = _predict_json(tiny_bundle, tangled)
    assert code == 1, stderr  # some entries failed; never 4, never a trace
    assert "Traceback" not in stderr and "internal error" not in stderr
    errors = {Path(i["file"]).name: i["error"] for i in items if "error" in i}
    assert "symbolic link loop" in errors.pop("loop")
    assert "ancestor" in errors.pop("up")
    assert "dangling symbolic link" in errors.pop("gone.jpg")
    assert "ancestor" in errors.pop("back")
    assert "cannot list folder" in errors.pop("locked") and "Permission denied" in stderr
    assert not errors
    classified = sorted(Path(i["file"]).relative_to(tangled).as_posix() for i in items if "top" in i)
    assert classified == ["img0.png", "img1.png", "img2.png", "img3.png",
                          "nested/img0.png", "nested/img1.png"]


def test_the_walk_never_raises_and_enters_each_real_folder_once(tmp_path):
    root = tmp_path / "tree"
    write_images(root / "a", count=1)
    (root / "b").symlink_to("a")  # the same real folder under another name
    (root / "self").symlink_to("self")
    levels = [root]
    for _ in range(1200):  # deeper than Python's recursion limit (and than mkdir -p's)
        levels.append(levels[-1] / "d")
        os.mkdir(levels[-1])
    deep = levels[-1]
    write_images(deep, count=1)
    try:
        found = list(walk([root, tmp_path / "missing", root / "self"]))
    finally:
        (deep / "img0.png").unlink()
        for level in reversed(levels[1:]):  # pytest's clean-up would recurse too deep
            os.rmdir(level)
    good = [p for p, problem in found if problem is None]
    assert good == [root / "a" / "img0.png", deep / "img0.png"]
    problems = [problem for _, problem in found if problem]
    assert any("already walked" in p for p in problems)
    assert sum("symbolic link loop" in p for p in problems) == 2  # inside the tree and given
    assert any("no such file or folder" in p for p in problems)


# ----------------------------------------------------------------------------- callers
CALLERS = {
    "script": "unguarded script",
    "dash-c": "python -c",
    "stdin": "standard input",
    "notebook": "a notebook (nbclient + ipykernel)",
    "web-thread": "a request thread of a web server",
}

PREDICT = """
import json, pathlib, pipeline
preds = pipeline.predict(pathlib.Path({bundle!r}), [pathlib.Path({photos!r})], workers=2, threads=1)
print("RESULT " + json.dumps([[p.file, p.top[0].label] for p in preds]))
"""

WEB = """
import json, pathlib, threading, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pipeline

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        assert threading.current_thread() is not threading.main_thread()
        preds = pipeline.predict(pathlib.Path({bundle!r}), [pathlib.Path({photos!r})], workers=2, threads=1)
        body = json.dumps([[p.file, p.top[0].label] for p in preds]).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
with urllib.request.urlopen(f"http://127.0.0.1:{{server.server_port}}/", timeout=240) as reply:
    print("RESULT " + reply.read().decode())
server.shutdown()
"""

NOTEBOOK = """
import nbformat
from nbclient import NotebookClient
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CODE)])
NotebookClient(nb, timeout=240, kernel_name="python3").execute()
for output in nb.cells[0].outputs:
    if output.get("name") == "stdout":
        print(output["text"], end="")
"""


def _run_caller(kind: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    python = sys.executable
    if kind == "script":
        script = cwd / "classify_photos.py"
        script.write_text(code)
        command, stdin = [python, str(script)], None
    elif kind == "dash-c":
        command, stdin = [python, "-c", code], None
    elif kind == "stdin":
        command, stdin = [python, "-"], code
    elif kind == "notebook":
        command, stdin = [python, "-c", f"CODE = {code!r}\n" + NOTEBOOK], None
    else:
        raise AssertionError(kind)
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.mark.parametrize("kind", list(CALLERS), ids=list(CALLERS))
def test_the_api_works_from_every_kind_of_caller(tiny_bundle, tmp_path, kind):
    """No ``if __name__ == "__main__"`` guard anywhere: the decode workers must not re-run the
    caller. Same predictions as the CLI."""
    photos = tmp_path / "photos"
    write_images(photos, count=7, seed=21)
    code = textwrap.dedent((WEB if kind == "web-thread" else PREDICT)
                           .format(bundle=str(tiny_bundle), photos=str(photos)))
    if kind == "web-thread":
        script = tmp_path / "web.py"
        script.write_text(code)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    else:
        done = _run_caller(kind, code, tmp_path)
    assert done.returncode == 0, f"{CALLERS[kind]}: {done.stderr[-3000:]}"
    assert "BrokenProcessPool" not in done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    got = [tuple(pair) for pair in json.loads(line[len("RESULT "):])]
    _, expected, _ = _predict_json(tiny_bundle, photos, extra=("--workers", "2", "--threads", "1"))
    assert got == [(item["file"], item["top"][0]["label"]) for item in expected]


@pytest.mark.slow  # quick coverage: the caller-kind test (script) and the worker killed twice
def test_classify_and_bench_offline_work_from_an_unguarded_script(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, count=9, seed=22)
    script = tmp_path / "offline.py"
    script.write_text(textwrap.dedent(f"""
        import pipeline
        summary = pipeline.classify({str(tiny_bundle)!r}, {str(photos)!r}, output="labels.jsonl",
                                    workers=2, threads=1, progress=False)
        run = pipeline.bench_offline({str(tiny_bundle)!r}, {str(photos)!r}, workers=2, threads=1,
                                     seconds=0.5)
        print("RESULT", summary.classified, run.classified, run.decode_only_per_s > 0)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT 9 9 True" in done.stdout
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 9


# ----------------------------------------------------------------------------- dying workers
def _killing_env(name: str, once_marker: Path | None = None) -> dict:
    env = dict(os.environ, PYTEST_CURRENT_TEST="engine robustness", **{KILL_HOOK: name})
    if once_marker is not None:
        env[KILL_ONCE_HOOK] = str(once_marker)
    return env


def test_a_file_that_kills_its_decoder_twice_is_one_error_line(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, count=12, seed=31)
    code, items, stderr = _predict_json(tiny_bundle, photos, env=_killing_env("img5.png"),
                                        extra=("--workers", "2", "--threads", "1",
                                               "--batch-size", "4"))
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert [Path(i["file"]).name for i in items] == [p.name for p, _ in walk([photos])]
    (dead,) = [i for i in items if "error" in i]
    assert dead["file"].endswith("img5.png")
    assert "decoder crashed: signal 9 (SIGKILL)" in dead["error"] and "fresh worker" in dead["error"]
    assert sum("top" in i for i in items) == 11


@pytest.mark.slow  # quick coverage: the caller-kind test (script) and the worker killed twice
def test_a_worker_killed_once_costs_nothing(tiny_bundle, tmp_path):
    """Killed once (say by the OOM killer), the file is decoded again on a fresh worker: the
    run's output equals an undisturbed run's."""
    photos = tmp_path / "photos"
    write_images(photos, count=12, seed=32)
    args = ("--workers", "2", "--threads", "1", "--batch-size", "4")
    code, items, stderr = _predict_json(tiny_bundle, photos, extra=args,
                                        env=_killing_env("img3.png", tmp_path / "killed"))
    assert (tmp_path / "killed").exists()  # the worker really died
    assert code == 0, stderr
    _, undisturbed, _ = _predict_json(tiny_bundle, photos, extra=args)
    assert items == undisturbed


def test_the_kill_hook_is_inert_outside_tests(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, count=3, seed=33)
    env = {k: v for k, v in _killing_env("img1.png").items() if k != "PYTEST_CURRENT_TEST"}
    done = run_module("predict", tiny_bundle, photos, "--workers", "1", "--threads", "1", "-q",
                      env=env)
    assert done.returncode == 0, done.stderr
