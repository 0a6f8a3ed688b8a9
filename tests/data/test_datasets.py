"""Datasets: both folder layouts, CIFAR-10 pickles, synthetic shapes, odd and bad images."""

import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import SYNTHETIC_CLASSES, load_data, synthetic_samples
from pipeline.data.images import open_rgb
from pipeline.errors import InputError
from pipeline.models.archs import get_arch

PREP = get_arch("resnet18").preprocessing(32)


def _image(rng, mode="RGB", size=24):
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode)


def make_class_folders(root, classes=("ant", "bee"), per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            _image(rng).save(root / name / f"{index}.png")
    return root


def test_train_val_layout(tmp_path):
    make_class_folders(tmp_path / "train", per_class=4)
    make_class_folders(tmp_path / "val", per_class=2)
    split = load_data(str(tmp_path), PREP, cifar_aug=False)
    assert split.class_names == ["ant", "bee"]
    assert (len(split.train), len(split.val)) == (8, 4)
    image, label = split.train[0]
    assert tuple(image.shape) == (3, 32, 32) and label in (0, 1)


def test_single_folder_seeded_split(tmp_path):
    make_class_folders(tmp_path, classes=("a", "b", "c", "d"), per_class=10)
    first = load_data(str(tmp_path), PREP, cifar_aug=False, val_split=0.2, seed=3)
    again = load_data(str(tmp_path), PREP, cifar_aug=False, val_split=0.2, seed=3)
    other = load_data(str(tmp_path), PREP, cifar_aug=False, val_split=0.2, seed=4)
    assert (len(first.train), len(first.val)) == (32, 8)
    assert sorted(first.val.targets) == [0, 0, 1, 1, 2, 2, 3, 3]  # every class in val
    assert first.val.samples == again.val.samples and first.val.samples != other.val.samples


def test_every_mode_becomes_rgb(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for mode in ("L", "P", "RGBA", "CMYK", "LA"):
        files[mode] = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        _image(rng, mode).save(files[mode])
    sixteen = tmp_path / "deep.png"
    Image.fromarray((np.arange(576).reshape(24, 24) * 100).astype(np.uint16)).save(sixteen)
    transparent = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(transparent)
    for path in [*files.values(), sixteen]:
        image = open_rgb(path)
        assert image.mode == "RGB" and image.size == (24, 24)
    assert np.asarray(open_rgb(sixteen)).max() > 200  # scaled from 16 bits, not clipped to white
    assert np.asarray(open_rgb(transparent)).min() == 255  # transparent composited onto white


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    make_class_folders(tmp_path, per_class=30)
    (tmp_path / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    warnings = []
    split = load_data(str(tmp_path), PREP, cifar_aug=False, warn=warnings.append)
    assert len(split.train) + len(split.val) == 60
    assert any("broken.jpg" in w for w in warnings) and any("skipped 1 of 61" in w for w in warnings)


def test_too_many_bad_images_stop(tmp_path):
    make_class_folders(tmp_path, per_class=5)
    for index in range(3):
        (tmp_path / "bee" / f"bad{index}.png").write_text("text")
    with pytest.raises(InputError, match="3 of 13 images are unreadable"):
        load_data(str(tmp_path), PREP, cifar_aug=False, warn=lambda m: None)


@pytest.mark.parametrize("layout,needle", [
    ("empty", "has no class sub-folders"),
    ("one_class", "has one class"),
    ("empty_class", "has no images"),
    ("missing_val", "no val/"),
])
def test_bad_folders(tmp_path, layout, needle):
    if layout == "one_class":
        make_class_folders(tmp_path, classes=("only",))
    elif layout == "empty_class":
        make_class_folders(tmp_path)
        (tmp_path / "wasp").mkdir()
    elif layout == "missing_val":
        make_class_folders(tmp_path / "train")
    with pytest.raises(InputError, match=needle):
        load_data(str(tmp_path), PREP, cifar_aug=False)


def write_cifar(root, per_batch=12, seed=0):
    """Tiny batches in the real cifar-10-batches-py pickle format (5 training batches + test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_vis": 3072}, handle)
    for batch in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                  "test_batch"):
        entry = {"batch_label": batch, "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 "data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(per_batch)]}
        with open(folder / batch, "wb") as handle:
            pickle.dump(entry, handle)
    return names


def test_cifar10_pickles(tmp_path, fake_cifar_passes_md5):
    names = write_cifar(tmp_path)
    split = load_data(f"cifar10:{tmp_path}", get_arch("resnet18_cifar").preprocessing(), cifar_aug=True)
    assert split.class_names == names
    assert (len(split.train), len(split.val)) == (60, 12)
    # naming the batches folder itself works too
    again = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", PREP, cifar_aug=True)
    assert len(again.train) == 60
    image, _ = split.train[0]
    assert tuple(image.shape) == (3, 32, 32)


def test_cifar10_that_is_not_intact_is_refused(tmp_path):
    write_cifar(tmp_path)  # the md5 sums are not CIFAR-10's: torchvision's check refuses it
    with pytest.raises(InputError, match="is not an intact cifar-10-batches-py"):
        load_data(f"cifar10:{tmp_path}", PREP, cifar_aug=True)


def test_cifar10_offline_download_fails_clearly(tmp_path):
    from pipeline.errors import EnvironmentUnavailable

    try:
        load_data(f"cifar10:{tmp_path}", PREP, cifar_aug=True)
    except EnvironmentUnavailable as exc:
        assert "cannot be downloaded" in str(exc) and "--data synthetic" in str(exc)
    else:
        pytest.skip("this machine reached the CIFAR-10 server")


def test_synthetic_is_deterministic_and_balanced():
    first = synthetic_samples(3, seed=1)
    again = synthetic_samples(3, seed=1)
    assert [label for _, label in first] == [0, 1, 2, 3] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, again))
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(synthetic_samples(3, seed=2)[0][0]))
    split = load_data("synthetic", PREP, cifar_aug=False, synthetic_per_class=10)
    assert split.class_names == list(SYNTHETIC_CLASSES) and len(split.val) == 8


def test_val_split_out_of_range():
    with pytest.raises(InputError, match="--val-split 1.5 must be between 0 and 1"):
        load_data("synthetic", PREP, cifar_aug=False, val_split=1.5)


def test_pixels_that_fail_to_decode_are_skipped_as_training_reads_them(tmp_path, capsys):
    """The header check passes a file whose pixel data is cut short; the dataset skips it
    when it meets it and hands on the next sample instead of crashing the epoch."""
    from PIL import Image

    make_class_folders(tmp_path, per_class=20)
    cut = tmp_path / "ant" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])  # header intact, pixels missing
    split = load_data(str(tmp_path), PREP, cifar_aug=False, val_split=0.2, warn=lambda m: None)
    dataset = next(d for d in (split.train, split.val) if any(p == cut for p, _ in d.samples))
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p == cut)
    image, label = dataset[index]
    assert image.shape == (3, PREP.crop, PREP.crop) and dataset.skipped == [dataset.skipped[0]]
    assert "cut.png" in dataset.skipped[0] and "cut.png" in capsys.readouterr().err


def test_small_inputs_see_the_same_scale_in_training_and_evaluation():
    from pipeline.models.archs import get_arch

    assert get_arch("resnet18").preprocessing(64).resize == 64  # no centre-crop margin at 64 px
    assert get_arch("resnet18").preprocessing(96).resize == round(96 * 256 / 224)
    assert get_arch("resnet18_cifar").preprocessing().resize == 32
