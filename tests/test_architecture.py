"""The package's shape: the layers contract and no import cycles (import-linter), a plain
module type with API names that submodules cannot shadow, and every benchmark script alive."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import pipeline

ROOT = Path(__file__).resolve().parents[1]
API = ("train", "export", "verify", "recheck", "quantize", "bench", "bench_offline", "predict", "classify", "run", "report", "serve",
       "deploy_triton", "deploy_kubernetes")


def test_layers_contract_and_no_cycles_hold():
    """`lint-imports` checks pyproject's contracts: the layer order, and no cycle at any depth
    (grimp reads imports inside functions too)."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_stage_contract_refuses_bench_importing_report(tmp_path):
    """The stages contract is not decoration: a copy of the package in which bench (the
    producer) imports report (its consumer) breaks it, naming the import."""
    import shutil

    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    writeup = tmp_path / "pipeline" / "stages" / "bench" / "writeup.py"
    writeup.write_text(writeup.read_text() + "\nfrom pipeline.stages.report import stale_rows\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Stages: run > report" in result.stdout and "BROKEN" in result.stdout
    assert "pipeline.stages.bench.writeup -> pipeline.stages.report" in result.stdout


def test_the_package_is_a_plain_module_and_api_names_survive_every_submodule():
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    assert type(pipeline) is types.ModuleType
    for name in API:
        assert callable(getattr(pipeline, name)), name
        assert getattr(pipeline, name).__module__ == "pipeline.api", name
    assert pipeline.__version__ == importlib.import_module("pipeline.version").__version__


def test_no_top_level_module_shares_a_name_with_an_api_function():
    names = {info.name for info in pkgutil.iter_modules(pipeline.__path__)}
    assert not names & set(API), names & set(API)


def test_import_pipeline_submodule_as_gives_the_module():
    import pipeline.stages.export as export_module

    assert isinstance(export_module, types.ModuleType) and hasattr(export_module, "export_bundle")


BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_every_benchmark_script_imports_and_answers_help(script):
    """A benchmark that no longer imports (a renamed constant, a moved module) fails here,
    not months later when someone tries to reproduce a table."""
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
