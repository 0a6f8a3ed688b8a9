"""Architecture registry: name -> builder, default input size, preprocessing, class count.

Three families:
- ``imagenet``: torchvision ResNet-18 ... 152, 224 px, resize 256 / crop 224, ImageNet mean/std.
- ``cifar``: the same blocks with a 3x3 stride-1 stem and no max-pool, 32 px, mean/std 0.5.
- ``preact``: ResNet-V2 (He et al., "Identity Mappings in Deep Residual Networks"), laid out as
  Keras' ResNet50V2 that the project's write-up used: stride on the last block of each stage.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pipeline.errors import InputError

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5, 0.5, 0.5)
CIFAR_STD = (0.5, 0.5, 0.5)

RESNET_DEPTHS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes an input tensor: resize shorter side, centre crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        try:
            return cls(
                resize=int(data["resize"]),
                crop=int(data["crop"]),
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                interpolation=str(data.get("interpolation", "bilinear")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"invalid preprocessing spec {data!r}: {exc}") from None


SMALL_INPUT = 64  # px; at or below, no centre-crop margin (see ArchSpec.preprocessing)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str
    depth: int
    input_size: int
    default_num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_imagenet_weights: bool = False
    description: str = field(default="", compare=False)

    def preprocessing(self, input_size: int | None = None) -> Preprocessing:
        """The eval preprocessing at ``input_size`` (default: the arch's own size).

        224-style archs keep torchvision's 256/224 resize-to-crop ratio; CIFAR archs, and any
        input of ``SMALL_INPUT`` px or less, resize straight to the input size: that is also
        what training shows them (pad-crop augmentation of the whole image, see
        ``pipeline.data.train_transform``), so train and eval see the same scale.
        """
        size = input_size or self.input_size
        if self.family == "cifar" or size <= SMALL_INPUT:
            resize = size
        else:
            resize = round(size * 256 / 224)
        return Preprocessing(resize=resize, crop=size, mean=self.mean, std=self.std)

    def build(self, num_classes: int | None = None) -> "nn.Module":
        """A randomly initialised model with ``num_classes`` outputs."""
        return _BUILDERS[self.family](self.depth, num_classes or self.default_num_classes)


def _build_imagenet(depth: int, num_classes: int) -> "nn.Module":
    from torchvision import models

    return models.get_model(f"resnet{depth}", weights=None, num_classes=num_classes)


def _build_cifar(depth: int, num_classes: int) -> "nn.Module":
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    kind, layers = RESNET_DEPTHS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    model = ResNet(block, layers, num_classes=num_classes)
    # CIFAR stem: 3x3 stride 1 and no max-pool keep 32x32 at stage one; the adaptive pool
    # then equals the write-up's AvgPool2d(4) at 32 px and still works at other sizes.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _build_preact(depth: int, num_classes: int) -> "nn.Module":
    from pipeline.models.resnet_v2 import (
        ResNetV2,  # torch.nn at import: off the --help path
    )

    _, layers = RESNET_DEPTHS[depth]
    return ResNetV2(layers, num_classes=num_classes)


_BUILDERS: dict[str, Callable[[int, int], "nn.Module"]] = {
    "imagenet": _build_imagenet,
    "cifar": _build_cifar,
    "preact": _build_preact,
}


def _registry() -> dict[str, ArchSpec]:
    specs: list[ArchSpec] = []
    for depth in RESNET_DEPTHS:
        specs.append(ArchSpec(f"resnet{depth}", "imagenet", depth, 224, 1000, IMAGENET_MEAN,
                              IMAGENET_STD, has_imagenet_weights=True,
                              description="torchvision ResNet"))
    for depth in RESNET_DEPTHS:
        specs.append(ArchSpec(f"resnet{depth}_cifar", "cifar", depth, 32, 10, CIFAR_MEAN,
                              CIFAR_STD, description="CIFAR-10 ResNet: 3x3 stem, no max-pool"))
    for depth in (50, 101, 152):
        specs.append(ArchSpec(f"resnet{depth}v2", "preact", depth, 224, 1000, IMAGENET_MEAN,
                              IMAGENET_STD, description="pre-activation ResNet-V2"))
    return {spec.name: spec for spec in specs}


ARCHS: dict[str, ArchSpec] = _registry()


def get_arch(name: str) -> ArchSpec:
    """The spec registered as ``name``; an unknown name lists the valid ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise InputError(f"unknown arch {name!r}; choose from: {', '.join(ARCHS)}") from None


def describe(spec: ArchSpec, *, num_classes: int | None = None,
             input_size: int | None = None) -> dict[str, Any]:
    """Parameter count and GMACs, counted on the meta device so nothing is allocated (once
    per arch, classes and size in a process: every bench asks for its model's GMACs)."""
    return copy.deepcopy(_described(spec, num_classes, input_size))


@functools.lru_cache(maxsize=64)
def _described(spec: ArchSpec, num_classes: int | None, input_size: int | None) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size or spec.input_size
    with torch.device("meta"):
        model = spec.build(num_classes).eval()
        example = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return {
        "arch": spec.name,
        "family": spec.family,
        "params": params,
        "gmacs": counter.get_total_flops() / 2 / 1e9,
        "input_size": size,
        "num_classes": num_classes or spec.default_num_classes,
        "preprocessing": spec.preprocessing(size).to_dict(),
        "imagenet_weights": spec.has_imagenet_weights,
        "description": spec.description,
    }
