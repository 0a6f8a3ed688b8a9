"""Where a model's weights come from: a fixed seed, torchvision's ImageNet weights, or a checkpoint.

A checkpoint is either a plain state dict or a training checkpoint (a dict holding
``state_dict``, ``arch``, ``num_classes``, ``class_names`` and ``preprocessing``). Both are
read with ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.records import EpochRow
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.models.archs import ARCHS, ArchSpec, Preprocessing, get_arch
from pipeline.options import MODEL

if TYPE_CHECKING:
    import torch
    from torch import nn

# A module's weights by parameter name, as ``nn.Module.state_dict()`` returns them.
StateDict = dict[str, "torch.Tensor"]
# What a checkpoint written by ``python -m pipeline train`` says it is; resume checks it.
TRAIN_CHECKPOINT_FORMAT = "pipeline.train.v1"

DEFAULT_SEED = MODEL.seed
DEFAULT_ARCH = MODEL.arch
DOWNLOAD_TIMEOUT_S = 8.0
WEIGHT_SOURCES = ("random", "imagenet")


@dataclass
class LoadedModel:
    """A model in eval mode plus everything needed to preprocess for it and label its output."""

    model: "nn.Module"
    spec: ArchSpec
    num_classes: int
    class_names: list[str]
    preprocessing: Preprocessing
    weights: dict[str, object] = field(default_factory=dict)  # where they came from, for the manifest

    @property
    def arch(self) -> str:
        return self.spec.name

    def describe(self) -> dict[str, object]:
        """The manifest's ``model`` section (``ModelSection`` reads it back)."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "input_size": self.preprocessing.crop,
            "preprocessing": self.preprocessing.to_dict(),
            "weights": self.weights,
        }


@dataclass
class Checkpoint:
    """A checkpoint file, read: the weights, what they are, and for a training checkpoint the
    state ``train --resume`` continues from. A bare state dict has only ``state_dict``."""

    state_dict: StateDict
    arch: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None
    # written by train only
    format: str | None = None
    optimizer: dict[str, object] | None = None  # torch's own optimizer.state_dict()
    scheduler: dict[str, object] | None = None
    epoch: int = 0
    best_acc: float = -1.0
    history: list[EpochRow] = field(default_factory=list)
    config: dict[str, object] = field(default_factory=dict)  # TrainOptions as the run had them
    data_source: str | None = None

    @property
    def resumable(self) -> bool:
        return self.format == TRAIN_CHECKPOINT_FORMAT and self.optimizer is not None

    def payload(self) -> dict[str, object]:
        """What ``torch.save`` writes: plain types only, so ``weights_only`` loading reads it."""
        return {"format": self.format, "state_dict": self.state_dict, "arch": self.arch,
                "num_classes": self.num_classes, "class_names": self.class_names,
                "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
                "input_size": self.preprocessing.crop if self.preprocessing else None,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "epoch": self.epoch,
                "best_acc": self.best_acc, "history": [row.to_dict() for row in self.history],
                "config": self.config, "data_source": self.data_source}

    @classmethod
    def from_payload(cls, data: dict[str, object], where: str) -> "Checkpoint":
        prep = data.get("preprocessing")
        return cls(state_dict=data["state_dict"], arch=data.get("arch"),
                   num_classes=data.get("num_classes"), class_names=data.get("class_names"),
                   preprocessing=Preprocessing.from_dict(prep) if isinstance(prep, dict) else None,
                   format=data.get("format"), optimizer=data.get("optimizer"),
                   scheduler=data.get("scheduler"), epoch=data.get("epoch") or 0,
                   best_acc=data.get("best_acc", -1.0),
                   history=[EpochRow.from_dict(row, where=f"{where} history[{index}]")
                            for index, row in enumerate(data.get("history") or [])],
                   config=data.get("config") or {}, data_source=data.get("data_source"))


def default_class_names(num_classes: int) -> list[str]:
    return [f"class_{index}" for index in range(num_classes)]


def parse_class_names(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise InputError(f"--class-names {text!r} has an empty name; give a,b,c")
    return names


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint safely: a training checkpoint or a bare state dict."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist; give a .pt file from "
                         f"`python -m pipeline train` or a saved state dict")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"checkpoint {str(path)!r} cannot be read as a weights-only torch "
                         f"file ({first_line[:200]}); is it truncated or not a checkpoint?") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        return Checkpoint.from_payload(data, f"checkpoint {str(path)!r}")
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return Checkpoint(state_dict=data)
    raise InputError(f"checkpoint {str(path)!r} holds neither a state dict nor a training "
                     f"checkpoint (a dict with 'state_dict')")


def _classes_in_state_dict(state_dict: StateDict) -> int | None:
    weight = state_dict.get("fc.weight")
    return int(weight.shape[0]) if weight is not None else None


def _resolve_checkpoint(checkpoint: Checkpoint, arch: str | None,
                        num_classes: int | None, path: Path | str) -> tuple[str, int]:
    stored_arch = checkpoint.arch
    if arch and stored_arch and arch != stored_arch:
        raise InputError(f"checkpoint {str(path)!r} is for arch {stored_arch!r}, not {arch!r}; "
                         f"pass --arch {stored_arch} or another checkpoint")
    spec = get_arch(arch or stored_arch or DEFAULT_ARCH)
    stored_classes = checkpoint.num_classes or _classes_in_state_dict(checkpoint.state_dict)
    if num_classes and stored_classes and num_classes != stored_classes:
        raise InputError(f"checkpoint {str(path)!r} has {stored_classes} classes, not "
                         f"--num-classes {num_classes}; drop --num-classes or use another checkpoint")
    return spec.name, int(num_classes or stored_classes or spec.default_num_classes)


def _load_state_dict(model: "nn.Module", state_dict: StateDict, spec: ArchSpec,
                     source: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise InputError(f"{source} does not fit arch {spec.name!r} ({detail}); "
                         f"is it a checkpoint for another architecture?") from None


def weights_preprocessing(weights: Any) -> Preprocessing:
    """The eval transform a torchvision weights entry was evaluated with, as our spec.

    It differs between entries: ResNet-50's DEFAULT (IMAGENET1K_V2) resizes to 232, not 256,
    and using 256 with those weights costs accuracy. Built without downloading anything.
    """
    transform = weights.transforms()
    return Preprocessing.from_dict({
        "resize": int(transform.resize_size[0]), "crop": int(transform.crop_size[0]),
        "mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std],
        "interpolation": transform.interpolation.value})


def imagenet_state_dict(spec: ArchSpec) -> tuple[StateDict, list[str], str]:
    """torchvision's DEFAULT ImageNet weights, from the torch hub cache or by download."""
    from torchvision.models import get_model_weights

    if not spec.has_imagenet_weights:
        with_weights = ", ".join(s.name for s in _archs_with_weights())
        raise InputError(f"--weights imagenet is not available for {spec.name!r}; it exists for "
                         f"{with_weights}. Use --checkpoint PATH instead")
    weights = get_model_weights(spec.name).DEFAULT
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError, socket.timeout and DNS failures are all OSErrors
        raise EnvironmentUnavailable(
            f"cannot fetch ImageNet weights {weights} for {spec.name} ({exc}); "
            f"put the file in the torch hub cache (~/.cache/torch/hub/checkpoints) "
            f"or pass --checkpoint PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    return state_dict, list(weights.meta["categories"]), str(weights)


def _archs_with_weights() -> list[ArchSpec]:
    return [spec for spec in ARCHS.values() if spec.has_imagenet_weights]


def replace_head(model: "nn.Module", num_classes: int) -> None:
    """Swap the classifier for a fresh one with ``num_classes`` outputs (transfer learning)."""
    from torch import nn

    model.fc = nn.Linear(model.fc.in_features, num_classes)


def load_model(arch: str | None = None, *, num_classes: int | None = None,
               weights: str = MODEL.weights, checkpoint: Path | str | None = None,
               class_names: list[str] | None = None, input_size: int | None = None,
               seed: int = DEFAULT_SEED) -> LoadedModel:
    """Build ``arch`` and fill its weights from exactly one source, in eval mode."""
    import torch

    if weights not in WEIGHT_SOURCES:
        raise InputError(f"unknown --weights {weights!r}; choose from: {', '.join(WEIGHT_SOURCES)}")
    if checkpoint is not None and weights != "random":
        raise InputError("--weights and --checkpoint both name weights; give only one")
    if num_classes is not None and num_classes < 1:
        raise InputError(f"--num-classes {num_classes} must be at least 1")

    stored: Preprocessing | None = None  # the preprocessing the weights came with
    if checkpoint is not None:
        read = read_checkpoint(checkpoint)
        arch, num_classes = _resolve_checkpoint(read, arch, num_classes, checkpoint)
        stored = read.preprocessing
    spec = get_arch(arch or DEFAULT_ARCH)
    num_classes = num_classes or spec.default_num_classes

    torch.manual_seed(seed)
    record: dict[str, object]
    if checkpoint is not None:
        model = spec.build(num_classes)
        _load_state_dict(model, read.state_dict, spec, f"checkpoint {str(checkpoint)!r}")
        record = {"source": "checkpoint", "path": str(checkpoint)}
        class_names = class_names or read.class_names
    elif weights == "imagenet":
        state_dict, categories, name = imagenet_state_dict(spec)
        from torchvision.models import get_model_weights

        # the preprocessing these very weights were evaluated with, unless --input-size says
        stored = weights_preprocessing(get_model_weights(spec.name).DEFAULT)
        model = spec.build(1000)
        _load_state_dict(model, state_dict, spec, f"ImageNet weights {name}")
        if num_classes != 1000:
            replace_head(model, num_classes)
        else:
            class_names = class_names or categories
        record = {"source": "imagenet", "name": name, "head_replaced": num_classes != 1000}
    else:
        model = spec.build(num_classes)
        calibrate_batchnorm(model, (input_size or spec.input_size), seed)
        record = {"source": "random", "seed": seed, "batchnorm": "calibrated on seeded noise"}

    class_names = class_names or default_class_names(num_classes)
    if len(class_names) != num_classes:
        raise InputError(f"{len(class_names)} class names given for {num_classes} classes; "
                         f"give exactly {num_classes} names")
    preprocessing = _preprocessing(spec, stored, input_size)
    return LoadedModel(model.eval(), spec, num_classes, list(class_names), preprocessing, record)


def calibrate_batchnorm(model: "nn.Module", size: int, seed: int) -> None:
    """Give BatchNorm layers running statistics from one seeded forward pass.

    Freshly initialised BN layers hold mean 0 / variance 1, so in eval mode they normalise
    nothing and activations grow block after block: a random ResNet-152 emits logits near
    1e5, where fp32 rounding alone breaks any sensible tolerance. Statistics measured on
    noise keep activations at the scale of a trained network, so parity checks on random
    weights mean what they would on real ones.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: one pass sets the statistics exactly
    # Small inputs leave few positions per channel in the last stage; more samples there.
    batch = 8 if size >= 112 else 32
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size, generator=generator))
    for module, momentum in zip(norms, saved):
        module.momentum = momentum
    model.eval()


def _preprocessing(spec: ArchSpec, stored: Preprocessing | None, input_size: int | None) -> Preprocessing:
    if input_size is not None and input_size < 8:
        raise InputError(f"--input-size {input_size} is too small; use at least 8 (32 for CIFAR, "
                         f"224 for ImageNet-style archs)")
    if input_size is None and stored is not None:
        return stored
    return spec.preprocessing(input_size)


def inject_outlier_channel(checkpoint: Path | str, block: str, channel: int, factor: float) -> None:
    """Give a ResNet block an outlier activation channel without changing the network: the
    block's bn1 scales one channel's gamma and beta by ``factor`` (> 0) and its conv2 divides
    the matching input channel by it, so in exact arithmetic nothing changes (ReLU commutes
    with a positive scale), while that channel's activations are ``factor`` times their
    neighbours' and int8's per-tensor activation scale turns coarse. It is how ``quantize
    --repair`` is tested and benchmarked (benchmarks/bench_int8_repair.py); the checkpoint is
    rewritten in place."""
    import torch

    data = read_checkpoint(checkpoint)
    state = data.state_dict
    names = [f"{block}.bn1.weight", f"{block}.bn1.bias", f"{block}.conv2.weight"]
    missing = [n for n in names if n not in state]
    if missing or factor <= 0:
        raise InputError(f"cannot inject an outlier into {block!r} (factor {factor}): "
                         f"{'no ' + missing[0] if missing else 'the factor must be > 0'}")
    state[names[0]][channel] *= factor
    state[names[1]][channel] *= factor
    state[names[2]][:, channel] /= factor
    torch.save(data.payload(), Path(checkpoint))
