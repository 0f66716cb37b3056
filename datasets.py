"""Datasets and their transforms: CIFAR-10/100, ImageNet folders and the bundled DIGITS set.

`args.data_set` picks the data (case does not matter):

  CIFAR10 / CIFAR100  torchvision's files, in `<eval_data_path>/cifar-10-batches-py` or
                      `<eval_data_path>/cifar-100-python` (`--download` fetches them).
  IMNET               ImageFolder `<eval_data_path>/train` or `<eval_data_path>/val`.
  image_folder        ImageFolder `<eval_data_path>` itself (the published ImageNet usage
                      passes the val folder); one folder of images per class. Fine-tuning
                      reads `<path>/train` and `<path>/val`, or `--val_data_path`.
  DIGITS              scikit-learn's 1,797 real 8x8 handwritten digits (10 classes), shipped
                      with scikit-learn: no download. A fixed stratified split gives 1,347
                      training and 450 evaluation images.

Every data set goes through the same evaluation transform (ECMT_SPEC 10, `build_transform`).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from cli_base import DATA_CONFIGS, DATA_SETS
from utils import UserError

__all__ = ["DATA_SETS", "DATA_CONFIGS", "TRANSFORM_KEYS", "DigitsDataset", "build_dataset",
           "build_training_datasets", "build_calibration_dataset", "class_names", "check_class_names",
           "build_transform", "transform_config", "same_transform", "describe_transform",
           "ReadableImages", "UnreadableImage", "readable", "collate_readable", "CheckedBatches"]

_CIFAR = {"CIFAR10": (datasets.CIFAR10, "cifar-10-batches-py"),
          "CIFAR100": (datasets.CIFAR100, "cifar-100-python")}
#: The entries of a transform record that decide what the model sees (all but its origin).
TRANSFORM_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_TRANSFORM_KEYS = TRANSFORM_KEYS


def _data_set_name(args) -> str:
    """The canonical spelling of `args.data_set`."""
    name = str(args.data_set)
    for known in DATA_SETS:
        if name.lower() == known.lower():
            return known
    raise UserError(f"unknown --data_set {name!r}; choose one of {', '.join(DATA_SETS)}")


def transform_config(args, model=None) -> dict:
    """The evaluation transform of this run as a plain dict (str, int, float, lists of floats).

    `--data_config published` (the default, ECMT_SPEC 10): bicubic, crop fraction 1.0, CLIP's
    mean/std or ImageNet's with `--imagenet_default_mean_and_std`. `--data_config timm`: what
    `timm.data.resolve_data_config` reads from `model`'s pretrained config (interpolation,
    crop_pct, crop_mode, mean/std), at `--input_size`. `--crop_pct` overrides the crop fraction
    of either. The dict is what `for_v` records with the thresholds and `--results` holds.
    """
    recorded = getattr(args, "transform_record", None)
    if recorded:  # snn on a for_v checkpoint: the transform its thresholds were calibrated with
        return dict(recorded)
    size = int(args.input_size)
    if size <= 0:
        raise UserError(f"--input_size must be positive, got {size}")
    mean, std = _mean_std(args)
    crop_pct = getattr(args, "crop_pct", None)
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--crop_pct must be in (0, 1], got {crop_pct}")
    source = getattr(args, "data_config", None) or "published"
    if source == "timm":
        if getattr(args, "imagenet_default_mean_and_std", False):
            raise UserError("--imagenet_default_mean_and_std and --data_config timm contradict "
                            "each other: with timm's config the mean/std are the model's")
        cfg = _timm_data_config(args, model)
        return {"data_config": "timm", "input_size": size,
                "interpolation": str(cfg["interpolation"]), "crop_pct": float(cfg["crop_pct"]),
                "crop_mode": str(cfg["crop_mode"]),
                "mean": [float(v) for v in (mean or cfg["mean"])], "std": [float(v) for v in (std or cfg["std"])]}
    if source != "published":
        raise UserError(f"unknown --data_config {source!r}; choose one of {', '.join(DATA_CONFIGS)}")
    if mean is None:
        if getattr(args, "imagenet_default_mean_and_std", False):
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        else:
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return {"data_config": "published", "input_size": size, "interpolation": "bicubic",
            "crop_pct": 1.0 if crop_pct is None else float(crop_pct), "crop_mode": "center",
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _mean_std(args):
    """(mean, std) of --mean/--std (three values, or one for all channels), or (None, None)."""
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise UserError("--mean and --std go together: pass both (the normalisation the model was trained with)")
    if getattr(args, "imagenet_default_mean_and_std", False):
        raise UserError("--mean/--std and --imagenet_default_mean_and_std both set the normalisation: pass one")
    values = []
    for flag, given in (("--mean", mean), ("--std", std)):
        given = [float(v) for v in given]
        if len(given) == 1:
            given = given * 3
        if len(given) != 3:
            raise UserError(f"{flag} takes 3 values (one per channel) or 1 for all, got {len(given)}")
        values.append(given)
    if min(values[1]) <= 0:
        raise UserError(f"--std must be positive, got {' '.join(f'{v:g}' for v in values[1])}")
    return tuple(values[0]), tuple(values[1])


def class_names(dataset) -> list | None:
    """The class names of a data set, in label order (what ImageFolder sorts), or None."""
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes else None


def check_class_names(args, classes) -> None:
    """Refuse data whose class names differ from those the weights were calibrated on
    (``args.expected_classes``: (names, who recorded them), set from a for_v record): ImageFolder
    numbers the classes in sorted order, so a renamed, added or removed folder moves the labels
    and the accuracy silently. ``--classes_changed`` says that the new mapping is intended."""
    expected = getattr(args, "expected_classes", None)
    if not expected or getattr(args, "classes_changed", False):
        return
    recorded, where = [str(c) for c in expected[0]], expected[1]
    classes = [str(c) for c in classes]
    if recorded == classes:
        return
    removed = [c for c in recorded if c not in classes]
    added = [c for c in classes if c not in recorded]
    parts = []
    if removed:
        parts.append("missing here: " + ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
    if added:
        parts.append("new here: " + ", ".join(added[:5]) + (" ..." if len(added) > 5 else ""))
    moved = [c for i, c in enumerate(classes) if c in recorded and recorded.index(c) != i]
    if moved:
        parts.append("label numbers move for " + ", ".join(moved[:5]) + (" ..." if len(moved) > 5 else ""))
    raise UserError(f"the class folders differ from those {where} recorded ({len(recorded)} classes, here "
                    f"{len(classes)}): " + "; ".join(parts) + ". Restore the folder names, or pass "
                    "--classes_changed if the new mapping is intended")


def _timm_data_config(args, model) -> dict:
    if model is None:
        raise ValueError("--data_config timm needs the model, to read its pretrained config")
    size = int(args.input_size)
    # The model's pretrained_cfg names the size it was published at, not --input_size.
    overrides = {"input_size": (3, size, size)}
    if getattr(args, "crop_pct", None) is not None:
        overrides["crop_pct"] = float(args.crop_pct)
    return resolve_data_config(args=overrides, model=model)


def same_transform(recorded: dict, current: dict) -> bool:
    """Whether two transform records make the same images (their origin does not matter)."""
    return all(recorded.get(k) == current.get(k) for k in TRANSFORM_KEYS)


def describe_transform(record: dict) -> str:
    """One line saying what a transform record does to an image."""
    size, crop_pct = record["input_size"], record["crop_pct"]
    mean = ", ".join(f"{v:.4f}" for v in record["mean"])
    std = ", ".join(f"{v:.4f}" for v in record["std"])
    if record["crop_mode"] == "center":
        resize = (f"resize the shorter side to {math.floor(size / crop_pct)} "
                  f"({record['interpolation']}), center crop {size}x{size} (crop_pct {crop_pct})")
    else:
        resize = (f"{record['crop_mode']} to {size}x{size} ({record['interpolation']}, "
                  f"crop_pct {crop_pct})")
    return (f"{resize}, to tensor, normalize mean ({mean}) std ({std}) "
            f"[--data_config {record['data_config']}]")


def build_transform(is_train: bool, args, model=None):
    """The preprocessing of `args.input_size` images.

    Evaluation (also what `for_v` calibrates on and `snn` simulates): the transform of
    :func:`transform_config`. By default the published one: resize the shorter side to
    input_size (bicubic), center-crop input_size x input_size, to tensor, normalize; no resize
    to input_size / 0.875 first, which would cut the border of every image (a quarter of a
    32x32 image). `--data_config timm` builds timm's own `create_transform` from the model's
    config instead.

    Training (`fintune_model.py`): a bicubic RandomResizedCrop and horizontal flips. DIGITS
    trains on the evaluation transform itself: digits are not flip-invariant, and a random
    crop of down to 8% of the area would cut most of an 8-pixel digit away.
    """
    record = transform_config(args, model)
    if is_train and _data_set_name(args) != "DIGITS" and getattr(args, "augment", True):
        return transforms.Compose([
            transforms.RandomResizedCrop(record["input_size"],
                                         interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(record["mean"], record["std"]),
        ])
    if record["data_config"] == "timm":  # timm's own transform, from the record (mean/std as given)
        return create_transform(input_size=(3, record["input_size"], record["input_size"]),
                                interpolation=record["interpolation"], crop_pct=record["crop_pct"],
                                crop_mode=record["crop_mode"], mean=tuple(record["mean"]), std=tuple(record["std"]))
    size = record["input_size"]
    return transforms.Compose([
        transforms.Resize(math.floor(size / record["crop_pct"]),
                          interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(record["mean"], record["std"]),
    ])


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB PIL images.

    The split is fixed (stratified, 25% held out, random_state=0): 1,347 training and 450
    evaluation images. scikit-learn's pixels are integers 0..16; they are scaled to 0..255 by
    round(p * 255 / 16) (0 -> 0, 8 -> 128, 16 -> 255) and the gray value is repeated on the
    three channels, so the images go through the same transform as any image file (the
    evaluation transform resizes them from 8x8 to the input size).
    """

    TEST_FRACTION = 0.25
    SPLIT_SEED = 0

    def __init__(self, train: bool, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        indices = list(range(len(digits.target)))
        train_idx, test_idx = train_test_split(
            indices, test_size=self.TEST_FRACTION, random_state=self.SPLIT_SEED,
            stratify=digits.target)
        chosen = sorted(train_idx if train else test_idx)
        self.source_indices = chosen  # positions in sklearn.datasets.load_digits()
        raw = torch.as_tensor(digits.images[chosen], dtype=torch.int32)  # (N, 8, 8), 0..16
        self.images = ((raw * 255 + 8) // 16).to(torch.uint8)  # round(p * 255 / 16)
        self.targets = [int(t) for t in digits.target[chosen]]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        """The image `index` before the transform: an 8x8 RGB PIL image."""
        return Image.fromarray(self.images[index].numpy(), mode="L").convert("RGB")

    def __getitem__(self, index: int):
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_dataset(is_train: bool, args, model=None):
    """The dataset for the training (`is_train`) or evaluation split, and its class count.

    Reads `args.data_set`, `args.eval_data_path`, `args.input_size`, and optionally
    `args.download`, `args.imagenet_default_mean_and_std`, `args.data_config`, `args.crop_pct`
    (see :func:`transform_config`; `model` is needed for `--data_config timm`) and
    `args.nb_classes` (when set, it must equal the class count of the data).
    """
    transform = build_transform(is_train, args, model)
    return _load(args, getattr(args, "eval_data_path", None), is_train, transform,
                 "--eval_data_path")


def build_training_datasets(args, model=None):
    """fintune_model.py: (training set, evaluation set, class count, where each comes from). An
    image_folder root with ``train/`` and ``val/`` sub-folders gives one split each;
    ``--val_data_path`` names the evaluation folder; one folder alone is refused, never used for
    both splits (the model would be evaluated on its training images)."""
    name = _data_set_name(args)
    root = getattr(args, "eval_data_path", None)
    val_path = getattr(args, "val_data_path", None)
    if name != "image_folder":
        if val_path:
            raise UserError(f"--val_data_path is for --data_set image_folder; {name} has its own splits")
        train, classes = _load(args, root, True, build_transform(True, args, model), "--data_path")
        val, _ = _load(args, root, False, build_transform(False, args, model), "--data_path")
        return train, val, classes, f"{name} training and evaluation splits"
    if not root:
        raise UserError("--data_set image_folder needs --data_path (the image folder)")
    root = Path(root)
    if val_path:
        train_folder, val_folder = (root / "train" if (root / "train").is_dir() else root), Path(val_path)
    elif (root / "train").is_dir() and (root / "val").is_dir():
        train_folder, val_folder = root / "train", root / "val"
    else:
        raise UserError(f"--data_path {root} has no train/ and val/ sub-folders, and one folder cannot be both "
                        "splits: arrange it as <path>/train/<class>/... and <path>/val/<class>/..., or pass "
                        "--val_data_path FOLDER for the evaluation images")
    if train_folder.resolve() == val_folder.resolve():
        raise UserError(f"--val_data_path {val_folder} is the training folder: name a folder of other images")
    train = _build_image_folder(train_folder, build_transform(True, args, model), name, "--data_path")
    val = _build_image_folder(val_folder, build_transform(False, args, model), name,
                              "--val_data_path" if val_path else "--data_path")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"the class folders of {train_folder} and {val_folder} differ (only in training: "
                        f"{', '.join(only_train[:5]) or 'none'}; only in evaluation: "
                        f"{', '.join(only_val[:5]) or 'none'}): give both splits the same class folders")
    classes = len(train.classes)
    wanted = getattr(args, "nb_classes", None)
    if wanted is not None and int(wanted) != classes:
        raise UserError(f"{train_folder} has {classes} classes but --nb_classes is {wanted}")
    return train, val, classes, f"training images from {train_folder}, evaluation images from {val_folder}"


def build_calibration_dataset(args, model=None):
    """The images `for_v` calibrates on, with the evaluation transform, and their class count.

    Without `args.calib_data_path`: the evaluation set itself, as published. With it: the
    training split of `--data_set` read from that path (CIFAR: the training batches there;
    IMNET: `<path>/train`; image_folder: the folder itself; DIGITS: its bundled training
    split, the path is not read), so that the thresholds are not measured on the images they
    are then evaluated on.
    """
    path = getattr(args, "calib_data_path", None)
    if not path:
        return build_dataset(False, args, model)
    return _load(args, path, True, build_transform(False, args, model), "--calib_data_path")


def _load(args, root, train_split: bool, transform, flag: str):
    name = _data_set_name(args)
    if name == "DIGITS":
        dataset = DigitsDataset(train=train_split, transform=transform)
    else:
        if not root:
            raise UserError(f"--data_set {name} needs {flag} (the data folder)")
        root = Path(root)
        if name in _CIFAR:
            dataset = _build_cifar(name, root, train_split, transform,
                                   download=getattr(args, "download", False))
        else:
            folder = root / ("train" if train_split else "val") if name == "IMNET" else root
            dataset = _build_image_folder(folder, transform, name, flag)
    check_class_names(args, dataset.classes)
    nb_classes = len(dataset.classes)
    wanted = getattr(args, "nb_classes", None)
    if wanted is not None and int(wanted) != nb_classes:
        where = "" if flag == "--eval_data_path" else f" in {flag} {root}"
        raise UserError(f"--data_set {name}{where} has {nb_classes} classes but --nb_classes "
                        f"is {wanted}")
    return dataset, nb_classes


def _build_cifar(name: str, root: Path, is_train: bool, transform, download: bool):
    cls, folder = _CIFAR[name]
    if not download and not (root / folder).is_dir():
        hint = (f"; you passed that folder itself, pass its parent {root.parent}"
                if root.name == folder else "; or add --download")
        raise UserError(f"{name} needs the folder '{folder}' inside {root} (not found){hint}")
    try:
        return cls(root=str(root), train=is_train, transform=transform, download=download)
    except (RuntimeError, OSError) as err:
        action = "download" if download else "read"
        raise UserError(f"could not {action} {name} in {root / folder}: {err}") from None


def _build_image_folder(folder: Path, transform, name: str, flag: str = "--eval_data_path"):
    if not folder.is_dir():
        layout = ("with one sub-folder per class" if name == "image_folder"
                  else "(IMNET expects <path>/train and <path>/val, "
                       "each with one sub-folder per class)")
        raise UserError(f"--data_set {name}: folder {folder} not found {layout} (from {flag})")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--data_set {name}: no images found in {folder} "
                        f"(expected one sub-folder of images per class): {err}") from None


# --------------------------------------------------------------------------------------------
# Unreadable image files
# --------------------------------------------------------------------------------------------
class UnreadableImage:
    """What a :class:`ReadableImages` item is when its file cannot be read: the file and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


class ReadableImages(Dataset):
    """A folder data set whose unreadable files (not an image, truncated, unreadable) come out as
    :class:`UnreadableImage` items instead of exceptions, so that the loader's collate function
    (:func:`collate_readable`, also in worker processes) passes them to the main process, where
    :class:`CheckedBatches` stops with one line naming the file, or skips it."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad files
            samples = getattr(self.dataset, "samples", None)
            path = samples[index][0] if samples is not None else f"image {index}"
            return UnreadableImage(path, _reason(err, path))


def _reason(err: Exception, path: str) -> str:
    """Why a file cannot be read, in words that do not repeat its name."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL recognises"
    lines = str(err).strip().splitlines()
    text = lines[0].replace(repr(path), "it").replace(path, "it") if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def readable(dataset):
    """`dataset` with unreadable files reported instead of raised (folders of files only)."""
    return ReadableImages(dataset) if hasattr(dataset, "samples") else dataset


def collate_readable(batch):
    """(images, targets, unreadable items) of a batch; images and targets are None when
    every file of the batch was unreadable."""
    from torch.utils.data import default_collate

    bad = [item for item in batch if isinstance(item, UnreadableImage)]
    good = [item for item in batch if not isinstance(item, UnreadableImage)]
    images, targets = default_collate(good) if good else (None, None)
    return images, targets, bad


class CheckedBatches:
    """The (images, targets) batches of a loader built with :func:`collate_readable`.

    An unreadable file stops the run with a UserError naming it (nothing has been written by
    then but log lines), or with `skip` is left out of its batch, named once on stderr, and
    listed in `skipped`."""

    def __init__(self, loader, skip: bool = False, log=None):
        self.loader, self.skip = loader, skip
        self.skipped: list[str] = []
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets, bad in self.loader:
            for item in bad:
                if not self.skip:
                    raise UserError(f"cannot read the image {item.path} ({item.reason}): remove or "
                                    "replace it, or pass --skip_bad_images to leave such files out")
                if item.path not in self.skipped:
                    self.skipped.append(item.path)
                    self.log(f"warning: skipped the unreadable image {item.path} ({item.reason})")
            if images is not None:
                yield images, targets
