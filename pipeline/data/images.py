"""Reading image files the same way in every stage.

Every mode becomes RGB: grayscale, palette (with or without transparency), RGBA, CMYK and
16-bit files. Transparent pixels are composited onto white rather than left black. Files that
are not images, truncated files and decompression bombs become ``BadImage`` with a clear reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from pipeline.errors import InputError
from pipeline.models.archs import Preprocessing

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(Exception):
    """A file that cannot be used as an image; the message names it and says why."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(paths: Iterable[Path | str], *, what: str = "--images") -> list[Path]:
    """Image files named directly or found (recursively, sorted) under folders."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p))
        elif item.is_file():
            found.append(item)
        else:
            raise InputError(f"{what} {str(item)!r} does not exist")
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise InputError(f"{what} {names!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                         f"point it at a folder of images")
    return found


def open_rgb(path: Path | str, *, draft: Callable[["Image.Image"], None] | None = None) -> "Image.Image":
    """Open, fully decode and convert to RGB, or raise ``BadImage`` naming the file.
    ``draft`` may set a reduced decoding scale on the opened file before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft is not None:
                    draft(image)
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"{path}: refused as a possible decompression bomb ({exc}); "
                       f"resize it below {Image.MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise BadImage(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{path}: truncated or corrupt image ({exc})") from None


def to_rgb(image: "Image.Image") -> "Image.Image":
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255).round().astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def eval_transform(prep: Preprocessing) -> Callable[["Image.Image"], "torch.Tensor"]:
    """Resize the shorter side, centre-crop, scale to [0, 1] and normalise."""
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.Resize(prep.resize, interpolation=_interpolation(prep.interpolation), antialias=True),
        T.CenterCrop(prep.crop),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(prep.mean), list(prep.std)),
    ])


def _interpolation(name: str) -> "object":
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        raise InputError(f"unknown interpolation {name!r} in preprocessing; "
                         f"use bilinear, bicubic or nearest") from None


def load_batch(paths: list[Path], prep: Preprocessing) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Preprocess ``paths``; returns (batch, the paths that worked, (path, reason) per bad file)."""
    transform = eval_transform(prep)
    tensors, good, errors = [], [], []
    for path in paths:
        try:
            tensors.append(transform(open_rgb(path)).numpy())
            good.append(path)
        except BadImage as exc:
            errors.append((path, str(exc)))
    batch = np.stack(tensors) if tensors else np.zeros((0, 3, prep.crop, prep.crop), np.float32)
    return batch, good, errors


# ----------------------------------------------------------------------------- streaming decode
PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


def decode_crop(path: Path | str, prep: Preprocessing, *, fast: bool = False) -> np.ndarray:
    """Decode, resize the shorter side and centre-crop with PIL alone: HWC uint8, the exact
    pixels ``eval_transform`` normalises (torchvision's PIL path is these PIL calls), so
    decode workers need neither torch nor torchvision and ship a quarter of the bytes.

    ``fast``: for a JPEG at least twice the resize target, libjpeg decodes at a reduced scale
    (``Image.draft``, 1/2 to 1/8) that keeps the shorter side at least twice the target, and
    the antialiased resize runs from there. Pixels differ slightly from exact decoding; see
    benchmarks/results/offline.md for what that does to predictions."""
    from PIL import Image

    def reduce(image: "Image.Image") -> None:
        if image.format == "JPEG" and min(image.size) >= 2 * prep.resize:
            scale = min(image.size) / (2 * prep.resize)
            image.draft("RGB", (int(image.size[0] / scale), int(image.size[1] / scale)))

    rgb = open_rgb(path, draft=reduce if fast else None)
    width, height = rgb.size
    if prep.interpolation not in PIL_FILTERS:
        raise InputError(f"unknown interpolation {prep.interpolation!r} in preprocessing; "
                         f"use bilinear, bicubic or nearest")
    # torchvision's rule: the shorter side becomes ``resize``, the longer one is truncated.
    if width <= height:
        size = (prep.resize, int(prep.resize * height / width))
    else:
        size = (int(prep.resize * width / height), prep.resize)
    if size != rgb.size:
        rgb = rgb.resize(size, resample=PIL_FILTERS[prep.interpolation])
    crop = prep.crop
    if min(size) < crop:  # only when crop > resize: torchvision pads with zeros
        canvas = Image.new("RGB", (max(size[0], crop), max(size[1], crop)))
        canvas.paste(rgb, ((canvas.size[0] - size[0]) // 2, (canvas.size[1] - size[1]) // 2))
        rgb, size = canvas, canvas.size
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    return np.asarray(rgb.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """NHWC uint8 crops -> NCHW float32 model input: /255, then (x - mean) / std, in float32
    as torchvision's ``ToDtype(scale=True)`` and ``Normalize`` compute it."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(prep.mean, np.float32)
    std = np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))
