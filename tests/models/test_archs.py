import json

import pytest
import torch

from pipeline.errors import InputError
from pipeline.models.archs import ARCHS, describe, get_arch
from tests.conftest import run_cli


def test_registry_has_every_documented_arch():
    expected = {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
    expected |= {f"resnet{d}_cifar" for d in (18, 34, 50, 101, 152)}
    expected |= {f"resnet{d}v2" for d in (50, 101, 152)}
    assert set(ARCHS) == expected


def test_unknown_arch_lists_valid_names():
    with pytest.raises(InputError, match=r"unknown arch 'resnet19'; choose from: resnet18, resnet34"):
        get_arch("resnet19")


def test_torchvision_resnet50_matches_published_size():
    row = describe(get_arch("resnet50"))
    assert row["params"] == 25_557_032  # torchvision's documented count
    assert row["gmacs"] == pytest.approx(4.09, abs=0.01)
    assert row["preprocessing"] == {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


def test_cifar_stem_keeps_resolution_and_uses_half_mean_std():
    model = get_arch("resnet18_cifar").build()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    prep = get_arch("resnet18_cifar").preprocessing()
    assert (prep.resize, prep.crop, prep.mean, prep.std) == (32, 32, (0.5,) * 3, (0.5,) * 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preact_v2_layout_matches_keras_resnet50v2():
    from pipeline.models.resnet_v2 import PreActBottleneck

    model = get_arch("resnet50v2").build()
    # Keras ResNet50V2 with its 1000-way head: 25,613,800 params, of which 25,568,360 trainable
    # and 45,440 BN moving means/variances. Here the trainable ones are parameters and the
    # moving statistics are BN's running_mean/running_var buffers.
    trainable = sum(p.numel() for p in model.parameters())
    moving = sum(b.numel() for name, b in model.named_buffers() if "running_" in name)
    assert (trainable, moving, trainable + moving) == (25_568_360, 45_440, 25_613_800)
    blocks = [m for m in model.modules() if isinstance(m, PreActBottleneck)]
    assert len(blocks) == 16
    first_stage = model.stages[0]
    assert first_stage[0].conv_shortcut and isinstance(first_stage[-1].shortcut, torch.nn.MaxPool2d)
    assert model.stages[3][-1].shortcut.__class__ is torch.nn.Identity  # conv5 has stride 1
    features = model.post(model.stages(model.stem(torch.randn(1, 3, 224, 224))))
    assert features.shape == (1, 2048, 7, 7)


def test_input_size_override_scales_resize():
    prep = get_arch("resnet18").preprocessing(112)
    assert (prep.resize, prep.crop) == (128, 112)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_cifar", "resnet50v2"])
def test_num_classes_override(name):
    assert get_arch(name).build(7)(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_archs_command_table_and_json():
    table = run_cli("archs")
    assert table.exit_code == 0
    assert "resnet152v2" in table.output and "GMACs" in table.output
    rows = json.loads(run_cli("archs", "--json").stdout)
    assert {row["arch"] for row in rows} == set(ARCHS)
    assert all(row["params"] > 0 and row["gmacs"] > 0 for row in rows)
