"""Shared fixtures of the stage tests: a model trained here on a task it learns well, with its
int8 and fp16 variants, and labelled images held apart from its training, so that accuracy
gates have something real to judge."""

import shutil

import numpy as np
import pytest

from tests.conftest import run_cli

CLASSES = ("red", "green", "blue", "yellow")
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (210, 200, 40)}


def colour_folders(root, per_class: int = 60, seed: int = 0):
    """Class folders of noisy, unevenly lit colour patches: a task a few epochs learn well.

    The gate needs a model whose predictions have margins: a random-weight net's top-1 flips
    under any int8 rounding, and so do half-trained ones (the synthetic shapes trained for a
    minute reach ~78%, and int8 flipped 3 of 120). The accuracy figure for a real task is the
    benchmark's (benchmarks/results/run.md), not this test's.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            light = rng.uniform(0.6, 1.3)
            patch = np.array(COLOURS[name], np.float64) * light + rng.normal(0, 35, (64, 64, 3))
            Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


TRAIN = ["--arch", "resnet18", "--input-size", "64", "--epochs", "3", "--batch-size", "16",
         "--workers", "0"]


@pytest.fixture(scope="session")
def trained_master(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "r18"
    data = colour_folders(tmp_path_factory.mktemp("colours"))
    trained = run_cli("train", "--out", out, "--data", data, *TRAIN)
    assert trained.exit_code == 0, trained.output
    exported = run_cli("export", "--checkpoint", out / "checkpoint.pt", "--out", out)
    assert exported.exit_code == 0, exported.output
    quantized = run_cli("quantize", out)  # int8 calibrated on the recorded training split, fp16
    assert quantized.exit_code == 0, quantized.output
    return out


@pytest.fixture
def trained(trained_master, tmp_path):
    return shutil.copytree(trained_master, tmp_path / "bundle")


@pytest.fixture(scope="session")
def held_apart(tmp_path_factory):
    """800 labelled images drawn apart from training (another seed): enough for the gate to
    show agreement >= 99% at 95% confidence with up to 3 disagreements (0 need 299 images,
    3 need 773), where the 48 of the validation split can never be conclusive."""
    return colour_folders(tmp_path_factory.mktemp("held-apart"), per_class=200, seed=99)


@pytest.fixture(scope="session")
def trained_verified(trained_master, held_apart, tmp_path_factory):
    bundle = shutil.copytree(trained_master, tmp_path_factory.mktemp("verified") / "b")
    result = run_cli("verify", bundle, "--cpu-only", "--images", held_apart)
    return bundle, result
