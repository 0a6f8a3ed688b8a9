"""Datasets for training: image folders, CIFAR-10 batches and built-in synthetic shapes.

``--data`` accepts:
- ``DIR`` with ``train/`` and ``val/`` sub-folders of class folders (the ants/bees layout);
- ``DIR`` of class folders, split into train/val per class by a seeded ``--val-split``;
- ``cifar10:DIR``, the standard ``cifar-10-batches-py`` pickles (downloaded when missing);
- ``synthetic``, coloured shapes on noisy backgrounds, generated from a seed, no network.

Transforms come from the model's preprocessing spec, with training augmentation on top:
random resized crop + flip for 224-style models, pad-crop + flip for CIFAR models.
"""

from __future__ import annotations

import math
import pickle
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pipeline.core.records import TrainSection
from pipeline.data.images import BadImage, eval_transform, is_image_name, open_rgb
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.models.archs import SMALL_INPUT, Preprocessing

if TYPE_CHECKING:
    import torch
    from PIL import Image

MAX_BAD_FRACTION = 0.05
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross")
SYNTHETIC_SIZE = 64
SYNTHETIC_PER_CLASS = 500
CIFAR_FOLDER = "cifar-10-batches-py"
# Milder than ImageNet's (0.08, 1): small datasets and small inputs lose the object otherwise.
RANDOM_CROP_SCALE = (0.35, 1.0)


@dataclass
class DataSplit:
    """Train and validation datasets that yield (tensor, label), with the class names."""

    train: Any
    val: Any
    class_names: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)


class ImageListDataset:
    """(path or PIL image, label) samples pushed through a transform."""

    def __init__(self, samples: Sequence[tuple[Any, int]], transform: Callable[["Image.Image"], "torch.Tensor"]) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skipped: list[str] = []  # in this process; DataLoader workers keep their own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple["torch.Tensor", int]:
        """A file whose pixels cannot be decoded (its header was fine) is skipped as it is met:
        warned about, counted, and replaced by the next sample so the batch keeps its size."""
        for offset in range(len(self.samples)):
            item, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = open_rgb(item) if isinstance(item, (str, Path)) else item
                return self.transform(image), label
            except BadImage as exc:
                if str(exc) not in self.skipped:
                    self.skipped.append(str(exc))
                    print(f"warning: skipping {exc}", file=sys.stderr)
        raise InputError("no image in this data set can be decoded; fix the data set first")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def train_transform(prep: Preprocessing, *, cifar: bool) -> Callable[["Image.Image"], "torch.Tensor"]:
    """Pad-crop + flip for CIFAR models and small inputs (<= 64 px), where a random resized
    crop would often cut the object away; random resized crop + flip otherwise. For those
    small inputs the eval preprocessing also resizes straight to the crop (``ArchSpec.
    preprocessing``), so both see the whole image at the same scale."""
    import torch
    from torchvision.transforms import v2 as T

    if cifar or prep.crop <= SMALL_INPUT:
        spatial = [T.Resize(prep.crop, antialias=True), T.CenterCrop(prep.crop),
                   T.RandomCrop(prep.crop, padding=max(1, prep.crop // 8), padding_mode="reflect")]
    else:
        spatial = [T.RandomResizedCrop(prep.crop, scale=RANDOM_CROP_SCALE, antialias=True)]
    return T.Compose([*spatial, T.RandomHorizontalFlip(), T.PILToTensor(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(list(prep.mean), list(prep.std))])


# ----------------------------------------------------------------------------- folders
def class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"data folder {str(root)!r} has no class sub-folders; expected "
                         f"{root}/<class>/<image> or {root}/train/<class>/ and {root}/val/<class>/")
    if len(folders) < 2:
        raise InputError(f"data folder {str(root)!r} has one class ({folders[0].name}); "
                         f"a classifier needs at least two class folders")
    return folders


def scan_class_folders(root: Path, class_names: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) for every image file, listed by torchvision's ``make_dataset`` (the
    ImageFolder layout); hidden folders are not classes, and a class with no image files is an
    input error naming it."""
    from torchvision.datasets.folder import make_dataset

    folders = class_folders(root)
    names = [folder.name for folder in folders]
    if class_names is not None and names != class_names:
        raise InputError(f"{str(root)!r} has classes {names}, but train/ has {class_names}; "
                         f"train/ and val/ need the same class folders")
    try:
        found = make_dataset(str(root), {name: i for i, name in enumerate(names)},
                             is_valid_file=lambda path: is_image_name(Path(path)))
    except FileNotFoundError:
        empty = next(f for f in folders if not any(is_image_name(p) for p in f.rglob("*") if p.is_file()))
        raise InputError(f"class folder {str(empty)!r} has no images; add some or remove it") from None
    return [(Path(path), label) for path, label in found], names


def drop_bad_images(samples: list[tuple[Path, int]], warn: Callable[[str], None]) -> tuple[list[tuple[Path, int]], list[str]]:
    """A cheap header check of every file (no pixel is decoded): not an image, or a header cut
    short, is skipped with a warning; too many such files stop the run. Files whose pixel
    data turns out bad later are skipped as training reads them (``ImageListDataset``)."""
    good, bad = [], []
    for path, label in samples:
        try:
            check_header(path)
            good.append((path, label))
        except BadImage as exc:
            bad.append(str(exc))
            warn(f"warning: skipping {exc}")
    if bad:
        warn(f"warning: skipped {len(bad)} of {len(samples)} images")
    if len(bad) > MAX_BAD_FRACTION * len(samples):
        raise InputError(f"{len(bad)} of {len(samples)} images are unreadable (more than "
                         f"{MAX_BAD_FRACTION:.0%}); fix the data set first. First: {bad[0]}")
    return good, bad


def check_header(path: Path) -> None:
    """Open the file and read its header only; raise ``BadImage`` when it is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width < 1 or image.height < 1:
                raise BadImage(f"{path}: image has no pixels")
    except UnidentifiedImageError:
        raise BadImage(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{path}: truncated or corrupt image ({exc})") from None


def stratified_split(samples: list[tuple[Any, int]], val_split: float, seed: int) -> tuple[list, list]:
    """Seeded split per class, so each class keeps its share in both parts."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[Any, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        count = max(1, round(len(items) * val_split)) if len(items) > 1 else 0
        val += items[:count]
        train += items[count:]
    return train, val


def folder_split(root: Path, val_split: float, seed: int, warn: Callable[[str], None]) -> tuple[list, list, list[str], list[str]]:
    if (root / "train").is_dir() or (root / "val").is_dir():
        for part in ("train", "val"):
            if not (root / part).is_dir():
                raise InputError(f"{str(root)!r} has {'val' if part == 'train' else 'train'}/ "
                                 f"but no {part}/; give both, or one folder of class folders")
        train, names = scan_class_folders(root / "train")
        val, _ = scan_class_folders(root / "val", names)
        train, bad_train = drop_bad_images(train, warn)
        val, bad_val = drop_bad_images(val, warn)
        return train, val, names, bad_train + bad_val
    samples, names = scan_class_folders(root)
    samples, bad = drop_bad_images(samples, warn)
    train, val = stratified_split(samples, val_split, seed)
    return train, val, names, bad


# ----------------------------------------------------------------------------- CIFAR-10
def cifar_root(root: Path) -> Path:
    """The folder torchvision's CIFAR10 wants: the parent of cifar-10-batches-py (the user
    may name either)."""
    return root.parent if root.name == CIFAR_FOLDER and (root / "batches.meta").is_file() else root


def download_cifar(root: Path) -> None:
    """torchvision's download (md5-checked), with a socket timeout so offline fails fast."""
    import socket
    import urllib.error

    from torchvision.datasets import CIFAR10

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        CIFAR10(str(root), train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise EnvironmentUnavailable(f"CIFAR-10 is not in {root} and cannot be downloaded ({exc}); "
                                     f"put cifar-10-batches-py there, or use --data synthetic") from None
    finally:
        socket.setdefaulttimeout(previous)


def cifar_split(root: Path) -> tuple[list, list, list[str]]:
    """torchvision's CIFAR10 (its md5 integrity check included): train and test parts as PIL
    images with labels. CIFAR-10 ships as Python pickles, read only from the folder named."""
    from PIL import Image
    from torchvision.datasets import CIFAR10

    root = cifar_root(root)
    if not (root / CIFAR_FOLDER).is_dir():
        download_cifar(root)
    try:
        parts = [CIFAR10(str(root), train=train, download=False) for train in (True, False)]
    except (RuntimeError, OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise InputError(f"{str(root / CIFAR_FOLDER)!r} is not an intact cifar-10-batches-py "
                         f"({exc}); delete it to download again, or use --data synthetic") from None
    splits = [[(Image.fromarray(image), int(label)) for image, label in zip(part.data, part.targets)]
              for part in parts]
    return splits[0], splits[1], list(parts[0].classes)


# ----------------------------------------------------------------------------- synthetic
def synthetic_image(label: int, rng: np.random.Generator, size: int = SYNTHETIC_SIZE) -> "Image.Image":
    """One coloured shape of class ``label`` at a random place, size and colour, on noise."""
    from PIL import Image, ImageDraw

    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 16, (size, size, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in (background + rng.integers(90, 166, 3)) % 256)
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    shape = SYNTHETIC_CLASSES[label]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, rng.uniform(0, math.pi / 2)), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, rng.uniform(0, 2 * math.pi)), fill=colour)
    else:
        width = radius * 0.45
        draw.rectangle([cx - radius, cy - width / 2, cx + radius, cy + width / 2], fill=colour)
        draw.rectangle([cx - width / 2, cy - radius, cx + width / 2, cy + radius], fill=colour)
    return image


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def synthetic_samples(count_per_class: int, seed: int) -> list[tuple["Image.Image", int]]:
    rng = np.random.default_rng(seed)
    return [(synthetic_image(label, rng), label)
            for _ in range(count_per_class) for label in range(len(SYNTHETIC_CLASSES))]


def synthetic_split(val_split: float, seed: int, per_class: int = SYNTHETIC_PER_CLASS) -> tuple[list, list, list[str]]:
    train, val = stratified_split(synthetic_samples(per_class, seed), val_split, seed)
    return train, val, list(SYNTHETIC_CLASSES)


# ----------------------------------------------------------------------------- entry point
def raw_split(spec: str, val_split: float, seed: int, per_class: int, warn: Callable[[str], None],
              *, missing: str) -> tuple[list, list, list[str], list[str], str]:
    """(train samples, val samples, class names, skipped files, what) for a ``--data`` spec,
    before any transform; ``missing`` is the error when a folder spec names no folder."""
    if spec == "synthetic":
        train, val, names = synthetic_split(val_split, seed, per_class)
        return train, val, names, [], f"synthetic shapes ({per_class} per class, seed {seed})"
    if is_cifar_data(spec):
        root = Path(spec.split(":", 1)[1] or ".")
        train, val, names = cifar_split(root)
        return train, val, names, [], f"CIFAR-10 at {root}"
    root = Path(spec)
    if not root.is_dir():
        raise InputError(missing)
    train, val, names, skipped = folder_split(root, val_split, seed, warn)
    return train, val, names, skipped, f"image folder {root}"


def is_cifar_data(spec: str) -> bool:
    return spec.startswith("cifar10:")


def load_data(spec: str, prep: Preprocessing, *, cifar_aug: bool, val_split: float = 0.2,
              seed: int = 0, synthetic_per_class: int = SYNTHETIC_PER_CLASS,
              warn: Callable[[str], None] | None = None) -> DataSplit:
    """Resolve ``--data`` into train/val datasets with the model's transforms."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    if not 0.0 < val_split < 1.0:
        raise InputError(f"--val-split {val_split} must be between 0 and 1 (exclusive), e.g. 0.2")
    train, val, names, skipped, source = raw_split(spec, val_split, seed, synthetic_per_class, warn,
                                                   missing=f"--data {spec!r} is not a folder; give "
                                                           f"an image folder, cifar10:DIR or synthetic")
    if not train or not val:
        raise InputError(f"--data {spec!r} gives {len(train)} training and {len(val)} validation "
                         f"images; both splits need images")
    return DataSplit(ImageListDataset(train, train_transform(prep, cifar=cifar_aug)),
                     ImageListDataset(val, eval_transform(prep)), names, source, skipped)


# ----------------------------------------------------------------------------- recorded splits
def recorded_split(manifest: dict[str, Any], part: str, *,
                   warn: Callable[[str], None] | None = None) -> tuple[list[tuple[Any, int]], list[str], str]:
    """The ``train`` or ``val`` samples of the run that trained this bundle, rebuilt from the
    data options ``train`` recorded (same seed, same split); returns (samples, classes, what).

    Calibration reads the training part and the accuracy gate the validation part, so the two
    never share an image.
    """
    train = TrainSection.of(manifest)
    if train is None:
        raise InputError("this bundle was not trained by python -m pipeline train, so it has no "
                         "recorded data split; give an image folder instead")
    spec, seed, val_split = train.data_spec, train.seed, train.val_split
    train_part, val_part, names, _, _ = raw_split(
        spec, val_split, seed, train.synthetic_per_class or SYNTHETIC_PER_CLASS,
        warn or (lambda message: None),
        missing=f"the training data {spec!r} recorded in the manifest is not here; give an "
                f"image folder instead")
    chosen = train_part if part == "train" else val_part
    return chosen, names, f"the {'training' if part == 'train' else 'validation'} split of {spec} (seed {seed})"


# The accuracy gate on synthetic data: the validation split topped up to this many images, the
# rest drawn from a seed stream no training or calibration run uses, so that a candidate as
# good as fp32 can be shown to agree >= 99% at 95% confidence (0 disagreements need 299
# images, 5 need 912; see pipeline.core.confidence).
SYNTHETIC_GATE_IMAGES = 1200
HELD_APART_SEED_OFFSET = 7_919


def synthetic_held_apart(manifest: dict[str, Any], count: int) -> tuple[list[tuple[Any, int]], str]:
    """``count`` more labelled synthetic images for a bundle trained on synthetic data, from
    another seed than its training run's (so none is a training or calibration image)."""
    train = TrainSection.of(manifest)
    if train is None or not train.synthetic:
        raise InputError("held-apart synthetic images are for bundles trained on synthetic data")
    seed = train.seed + HELD_APART_SEED_OFFSET
    per_class = -(-count // len(SYNTHETIC_CLASSES))
    return (synthetic_samples(per_class, seed)[:count],
            f"{count} more synthetic images (seed {seed}, never trained or calibrated on)")


def recorded_data_missing(manifest: dict[str, Any]) -> str | None:
    """Why the data that trained this bundle cannot be read here (moved, another machine),
    or None when it can; nothing is downloaded to find out."""
    train = TrainSection.of(manifest)
    if train is None:
        return "the bundle was not trained here"
    spec = train.data_spec
    if spec == "synthetic":
        return None
    folder = cifar_root(Path(spec.split(":", 1)[1] or ".")) / CIFAR_FOLDER if is_cifar_data(spec) \
        else Path(spec)
    return None if folder.is_dir() else f"the training data {spec!r} is not on this machine"


def labelled_folder(root: Path, class_names: list[str]) -> list[tuple[Path, int]] | None:
    """(path, label) when ``root``'s sub-folders are named after the model's classes, else None."""
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders or any(folder.name not in class_names for folder in folders):
        return None
    index = {name: i for i, name in enumerate(class_names)}
    return [(path, index[folder.name]) for folder in folders
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p))]


def preprocess_samples(samples: Sequence[tuple[Any, int]], prep: Preprocessing) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(batch, labels, bad-file reasons): PIL images or paths through the eval transform."""
    transform = eval_transform(prep)
    arrays, labels, bad = [], [], []
    for item, label in samples:
        try:
            image = open_rgb(item) if isinstance(item, (str, Path)) else item
            arrays.append(transform(image).numpy())
            labels.append(label)
        except BadImage as exc:
            bad.append(str(exc))
    if not arrays:
        return np.zeros((0, 3, prep.crop, prep.crop), np.float32), np.zeros(0, np.int64), bad
    return np.stack(arrays), np.asarray(labels, np.int64), bad
