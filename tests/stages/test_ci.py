"""CI-native checks, as a CI job runs them: JUnit XML validated against the JUnit schema CI
systems read, the GitHub job summary, ``verify --recheck``, and bench's regression gate."""

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import xmlschema
from onnx import numpy_helper

from pipeline.core.bundle import Bundle
from tests.conftest import drift_onnx, run_cli, run_module

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "fixtures" / "junit-10.xsd"


def junit(path: Path) -> dict[str, dict]:
    """The file validated against the schema, then each case by name: its status and text."""
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(path))
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        status = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                status, text = kind, node.get("message", "")
                break
        else:
            text = case.findtext("system-out", "")
        cases[case.get("name")] = {"status": status, "text": text, "class": case.get("classname")}
    return cases


def _rehash(bundle_dir: Path, name: str, stage: str) -> None:
    bundle = Bundle(bundle_dir)
    bundle.update_manifest(lambda m: bundle.record_artifact(m, name, stage=stage))


def _break_int8_stem(bundle: Path) -> None:
    """The stem's weight scale negated and scaled: every feature downstream goes wrong."""
    path = bundle / "model.int8.onnx"
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and inits.get(n.input[0]) is not None and len(inits[n.input[0]].dims) == 4]
    scale = inits[weight_dq[0].input[1]]
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale) * 8, scale.name))
    onnx.save(model, str(path))
    _rehash(bundle, "model.int8.onnx", "quantize")


# ----------------------------------------------------------------------------- verify
def test_verify_junit_on_a_drifted_file_a_random_gate_and_no_gpu(tiny_bundle, tmp_path,
                                                                  cuda_available, monkeypatch):
    """The quick relative of the test below: a drifted fp32 file fails its pairs with their
    figures, a gate without evaluation images is skipped with that reason, the CUDA runtimes
    are skipped with the reason (on a machine without a GPU), the rest passes; the job summary
    has the same table, failures first."""
    drift_onnx(tiny_bundle)
    summary = tmp_path / "summary.md"
    report = tmp_path / "reports" / "verify.xml"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = run_cli("verify", tiny_bundle, "--junit-xml", report)
    assert result.exit_code == 1, result.output
    cases = junit(report)
    failed = {name for name, case in cases.items() if case["status"] == "failure"}
    assert failed and all(name.startswith("onnx-sim-") for name in failed)
    assert all("tolerance" in cases[name]["text"] and "margin" in cases[name]["text"]
               for name in failed)
    assert cases["gate torch-cpu:bf16"]["status"] == "skipped"
    assert "no evaluation images" in cases["gate torch-cpu:bf16"]["text"]
    assert cases["onnx-ort-cpu on random-b1"]["status"] == "passed"
    if not cuda_available:
        assert cases["onnx-ort-cuda"]["status"] == "skipped"
    lines = [line for line in summary.read_text().splitlines() if line.startswith("| ")]
    results = [line.split(" | ")[0].strip("| ") for line in lines[1:]]
    assert lines[0].startswith("| result | check |") and results[0] == "FAILED"
    assert results == sorted(results, key=["FAILED", "ERROR", "SKIPPED", "ok"].index)
    assert "verify FAILED:" in result.stdout and "FAILED   onnx-sim-" in result.stdout
    assert "error: parity FAILED" in result.stderr


@pytest.mark.slow  # heavy (a held-apart gate on 800 images); .ci/run runs it after the quick suite
def test_verify_junit_and_job_summary_name_each_failure(trained, held_apart, tmp_path,
                                                        cuda_available):
    """A drifted fp32 file, a broken int8 file and (on a machine without a GPU) the CUDA
    runtimes: the JUnit holds the drifted file's pairs and the int8 gate as failures with their
    figures, the CUDA pairs as skipped with the reason, everything else passing; the job
    summary holds the same table, failures first."""
    drift_onnx(trained)
    _break_int8_stem(trained)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    report = tmp_path / "reports" / "verify.xml"
    result = run_module("verify", trained, "--images", held_apart, "--junit-xml", report,
                        env={**os.environ, "GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 1, result.stderr[-2000:]
    cases = junit(report)
    failed = {name for name, case in cases.items() if case["status"] == "failure"}
    assert "gate ort-cpu:int8" in failed
    gate = cases["gate ort-cpu:int8"]["text"]
    assert "verdict fail" in gate and "agreement" in gate and "limit agreement >= 99%" in gate
    assert "at 95% confidence" in gate
    gates = {name for name in failed if name.startswith("gate ")}
    assert all(name.endswith(":int8") for name in gates)  # every runtime of the broken file
    drifted = {name for name in failed if name.startswith("onnx-sim-")}
    assert drifted and drifted == failed - gates
    assert all("tolerance" in cases[name]["text"] for name in drifted)
    assert cases["torchscript-cpu on random-b1"]["status"] == "passed"
    assert cases["gate ort-cpu:fp16"]["status"] == "passed"
    skipped = {name: case for name, case in cases.items() if case["status"] == "skipped"}
    if not cuda_available:
        # every GPU runtime gives the one reason, so reports can group them
        assert skipped["onnx-ort-cuda"]["text"].startswith("no CUDA GPU visible")
    assert not any(case["status"] == "error" for case in cases.values())
    text = summary.read_text()
    assert text.startswith("earlier step\n### verify FAILED: ")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| result | check |")
    results = [line.split(" | ")[0].strip("| ") for line in table[1:]]
    assert results == sorted(results, key=["FAILED", "ERROR", "SKIPPED", "ok"].index)
    assert "gate ort-cpu:int8" in text and "onnx-sim-ort-cpu on random-b1" in text


def test_no_job_summary_without_the_variable(tiny_bundle, tmp_path):
    """Unset (or empty, as a shell's ``VAR=``), the summary is not written anywhere; the
    terminal still ends with the checks table (through --recheck, the same finish as verify)."""
    here = tmp_path / "cwd"
    here.mkdir()
    for env in ({k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"},
                {**os.environ, "GITHUB_STEP_SUMMARY": ""}):
        result = run_module("verify", "--recheck", tiny_bundle / "parity.json", env=env, cwd=here)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "passed:" in result.stdout and not list(here.iterdir())


def test_a_changed_file_is_one_junit_error(tiny_bundle, tmp_path):
    with open(tiny_bundle / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    report = tmp_path / "verify.xml"
    result = run_cli("verify", tiny_bundle, "--junit-xml", report)
    assert result.exit_code == 1 and "integrity" in result.stderr
    (case,) = junit(report).values()
    assert case["status"] == "error" and "model.onnx" in case["text"]


# ----------------------------------------------------------------------------- --recheck
def _verdicts(parity: dict) -> dict:
    return ({(p["candidate"], p["inputs"]): p["passed"] for p in parity["pairs"]},
            {g["candidate"]: (g.get("verdict"), g["passed"]) for g in parity["gates"]})


def test_recheck_agrees_with_verify_and_follows_new_limits(trained_verified, tmp_path):
    bundle, verified = trained_verified
    assert verified.exit_code == 0, verified.output
    original = (bundle / "parity.json").read_bytes()
    stored = json.loads(original)

    same = run_cli("verify", "--recheck", bundle / "parity.json", "--out", tmp_path / "same.json",
                   "--junit-xml", tmp_path / "same.xml")
    assert same.exit_code == 0, same.output
    assert _verdicts(json.loads((tmp_path / "same.json").read_text())) == _verdicts(stored)
    assert all(c["status"] != "failure" for c in junit(tmp_path / "same.xml").values())

    tight = run_cli("verify", "--recheck", bundle / "parity.json", "--atol", "1e-9", "--rtol", "0",
                    "--min-agreement", "1.0", "--json")
    assert tight.exit_code == 1
    parity = json.loads(tight.stdout)["parity"]
    assert parity["rule"]["atol"] == 1e-9 and parity["gate_rule"]["min_top1_agreement"] == 1.0
    assert not all(p["passed"] for p in parity["pairs"] if p["candidate"] != "torch-export-cpu")
    assert parity["gate_rule"]["max_top1_drop_points"] == stored["gate_rule"]["max_top1_drop_points"]

    loose = run_cli("verify", "--recheck", bundle / "parity.json", "--atol", "1", "--rtol", "0.1",
                    "--max-top1-drop", "5", "--json")
    assert loose.exit_code == 0, loose.output
    assert all(p["passed"] for p in json.loads(loose.stdout)["parity"]["pairs"])
    assert (bundle / "parity.json").read_bytes() == original  # never rewritten


def test_recheck_refuses_what_the_file_cannot_answer(trained_verified, tmp_path):
    bundle, _ = trained_verified
    stored = json.loads((bundle / "parity.json").read_text())
    for pair in stored["pairs"]:
        pair.pop("allclose_hull", None)
        pair.pop("finite", None)
    old = tmp_path / "older.json"
    old.write_text(json.dumps(stored))
    refused = run_cli("verify", "--recheck", old, "--atol", "1e-4", "--rtol", "1e-3")
    assert refused.exit_code == 2 and "allclose points" in refused.stderr
    assert "Traceback" not in refused.output
    for gate in stored["gates"]:
        gate.pop("disagreements", None)
    old.write_text(json.dumps(stored))
    refused = run_cli("verify", "--recheck", old, "--min-agreement", "0.995")
    assert refused.exit_code == 2 and "counts" in refused.stderr
    same_file = run_cli("verify", "--recheck", bundle / "parity.json", "--out", bundle / "parity.json")
    assert same_file.exit_code == 2 and "never rewrites it" in same_file.stderr
    both = run_cli("verify", bundle, "--recheck", bundle / "parity.json")
    assert both.exit_code == 2 and "runs nothing" in both.stderr


# ----------------------------------------------------------------------------- bench
SHORT = ["--backends", "ort-cpu:fp32", "--batch-sizes", "1", "--seconds", "0.5",
         "--warmup-seconds", "0.1", "--threads", "1"]


def _export(out: Path, size: int) -> Path:
    made = run_cli("export", "--arch", "resnet18_cifar", "--input-size", str(size), "--out", out,
                   "--no-pt2", "--no-simplify")
    assert made.exit_code == 0, made.output
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny arch at 16 px, benched once: its latency.json is the baseline file."""
    bundle = _export(tmp_path_factory.mktemp("regression") / "r16", 16)
    timed = run_cli("bench", bundle, *SHORT)
    assert timed.exit_code == 0, timed.output
    return bundle


@pytest.fixture(scope="module")
def small_and_large(small, tmp_path_factory):
    """The same tiny arch at 16 px and at 32 px (4x the work)."""
    return small, _export(tmp_path_factory.mktemp("regression") / "r32", 32)


def test_the_gate_judges_windows_slower_beyond_the_noise():
    """The gate's statistics on window rates, without timing anything (the test below times
    real models): 20% slower with 2% noise regresses; 5% slower, or 20% slower on too few
    windows to tell, does not; the same windows never do."""
    from pipeline.stages.bench.regression import judge

    rng = np.random.default_rng(0)
    base = list(100 * (1 + 0.02 * rng.standard_normal(12)))
    slower = [rate / 1.20 for rate in base[::-1]]
    slowdown, p, regressed = judge(slower, base, 0.10)
    assert regressed and 0.15 < slowdown < 0.25 and p < 0.01
    assert not judge([rate / 1.05 for rate in base], base, 0.10)[2]
    assert not judge(base, base, 0.10)[2]
    assert not judge(slower[:2], base[:2], 0.10)[2]  # 2 against 2 windows: p >= 1/6


@pytest.mark.slow  # the quick suite validates bench's JUnit in the regression test below
def test_bench_junit_validates_and_skips_what_cannot_run(small, tmp_path, cuda_available):
    bundle = shutil.copytree(small, tmp_path / "b")
    report = tmp_path / "bench.xml"
    result = run_cli("bench", bundle, "--backends", "ort-cpu:fp32,ort-cuda:fp32", "--batch-sizes",
                     "1", "--seconds", "0.3", "--threads", "1", "--junit-xml", report,
                     "--budget-ms", "0.0001")
    assert result.exit_code == 0, result.output
    cases = junit(report)
    assert cases["ort-cpu:fp32 batch 1"]["status"] == "failure"  # over the tiny budget
    assert "p90 <=" in cases["ort-cpu:fp32 batch 1"]["text"]
    if not cuda_available:
        assert cases["ort-cuda:fp32 batch 1"]["status"] == "skipped"


@pytest.mark.slow  # real timing of two models; the quick suite judges windows above
def test_the_regression_gate_flags_a_slower_model_and_passes_the_same(small_and_large, tmp_path):
    small, large = small_and_large
    slower = shutil.copytree(large, tmp_path / "large")
    flagged = run_cli("bench", slower, *SHORT, "--baseline-rerun", small, "--junit-xml",
                      tmp_path / "flagged.xml")
    assert flagged.exit_code == 1, flagged.output
    assert "slower than the baseline by more than 10%" in flagged.stderr
    assert "input size changed: baseline 16 px, now 32 px" in flagged.stdout
    case = junit(tmp_path / "flagged.xml")["ort-cpu:fp32 batch 1 vs baseline"]
    assert case["status"] == "failure" and "p = " in case["text"]
    section = json.loads((slower / "latency.json").read_text())["regression"]
    assert section["rerun"] and section["rows"][0]["status"] == "regressed"
    assert section["rows"][0]["slowdown"] > 1.0 and section["rows"][0]["windows"] == [12, 12]

    same = shutil.copytree(small, tmp_path / "same")
    passed = run_cli("bench", same, *SHORT, "--baseline-rerun", small, "--max-slowdown", "0.5")
    assert passed.exit_code == 0, passed.output
    assert json.loads((same / "latency.json").read_text())["regression"]["rows"][0]["status"] == "ok"


def _baseline(path: Path, *, arch: str, cpu: str | None = None) -> Path:
    """A latency.json as an earlier bench on this machine (or on ``cpu``) would have written
    it: one ort-cpu fp32 row at batch 1 with 8 windows."""
    from pipeline.core.machine import machine_block
    from pipeline.core.records import BenchConfig, BenchedModel, LatencyDoc, LatencyRow

    machine = machine_block()
    if cpu:
        machine.cpu = cpu
    row = LatencyRow("ort-cpu", 1, precision="fp32", precision_requested="fp32", p50_ms=2.0,
                     p90_ms=2.2, images_per_s=500.0, windows_per_s=[500.0] * 8)
    LatencyDoc(model=BenchedModel(arch=arch, input_size=32), config=BenchConfig(threads=1),
               machine=machine,
               rows=[row], created="2026-12-01T00:00:00").dump(path)
    return path


def test_the_regression_gate_refuses_bad_input_and_lists_what_is_not_comparable(tiny_bundle,
                                                                                 tmp_path):
    """Each bad input is exit 2 with its message before anything is timed; a baseline of
    another architecture runs only with --force, and one from another machine leaves every
    row "not comparable" (skipped in the JUnit, never passed)."""
    malformed = tmp_path / "bad.json"
    malformed.write_text("{not json")
    other_arch = _baseline(tmp_path / "other-arch.json", arch="resnet50", cpu="Some Other CPU")
    cases = [
        (["--baseline", tmp_path / "nope.json"], "does not exist"),
        (["--baseline", malformed], "is not valid JSON"),
        (["--max-slowdown", "-0.1", "--baseline", other_arch], "must be >= 0"),
        (["--baseline-rerun", tiny_bundle / "weights.pt"], "neither a bundle folder nor an .onnx"),
        (["--baseline", other_arch], "not the same model"),
    ]
    for extra, message in cases:
        result = run_cli("bench", tiny_bundle, *SHORT, *extra)
        assert result.exit_code == 2 and message in result.stderr, (extra, result.output)
        assert "Traceback" not in result.output
    forced = run_cli("bench", tiny_bundle, *SHORT, "--baseline", other_arch, "--force",
                     "--junit-xml", tmp_path / "b.xml")
    assert forced.exit_code == 0, forced.output
    assert "compared across architectures" in forced.stdout
    assert "not comparable: another machine fingerprint" in forced.stdout
    assert "use --baseline-rerun" in forced.stdout
    case = junit(tmp_path / "b.xml")["ort-cpu:fp32 batch 1 vs baseline"]
    assert case["status"] == "skipped" and "not comparable" in case["text"]


# ----------------------------------------------------------------------------- the example workflow
def test_the_example_workflow_parses_and_its_commands_exist():
    """examples/ci/github-actions.yml is not run here; its YAML parses, and every
    ``python -m pipeline`` line names a command and options that the CLI accepts (click parses
    each line up to running it: ``--help`` appended answers 0 only when every option before it
    exists)."""
    import shlex

    import yaml

    from pipeline.cli.app import cli

    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    lines = [line.strip() for step in steps for line in str(step.get("run", "")).splitlines()
             if line.strip().startswith("python -m pipeline ")]
    assert {shlex.split(line)[3] for line in lines} >= {"export", "verify", "bench"}
    assert any("--baseline-rerun" in line and "--junit-xml" in line for line in lines)
    for line in lines:
        args = shlex.split(line)[3:]
        context = cli.make_context("pipeline", [args[0]], resilient_parsing=True)
        command = cli.get_command(context, args[0])
        assert command is not None, line
        sub = command.make_context(args[0], args[1:], resilient_parsing=True)
        known = {opt for param in command.params for opt in param.opts}
        given = {arg.split("=")[0] for arg in args[1:] if arg.startswith("--")}
        assert given <= known, (line, given - known)
        assert sub.params  # parsed
