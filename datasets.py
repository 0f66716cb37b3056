"""Datasets and their transforms: CIFAR-10/100, ImageNet folders and the bundled DIGITS set.

`args.data_set` picks the data (case does not matter):

  CIFAR10 / CIFAR100  torchvision's files, in `<eval_data_path>/cifar-10-batches-py` or
                      `<eval_data_path>/cifar-100-python` (`--download` fetches them).
  IMNET               ImageFolder `<eval_data_path>/train` or `<eval_data_path>/val`.
  image_folder        ImageFolder `<eval_data_path>` itself, for both splits (the published
                      ImageNet usage passes the val folder); one folder of images per class.
  DIGITS              scikit-learn's 1,797 real 8x8 handwritten digits (10 classes), shipped
                      with scikit-learn: no download. A fixed stratified split gives 1,347
                      training and 450 evaluation images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from utils import UserError

__all__ = ["DATA_SETS", "DigitsDataset", "build_dataset", "build_transform"]

DATA_SETS = ("CIFAR10", "CIFAR100", "IMNET", "image_folder", "DIGITS")
_CIFAR = {"CIFAR10": (datasets.CIFAR10, "cifar-10-batches-py"),
          "CIFAR100": (datasets.CIFAR100, "cifar-100-python")}


def _data_set_name(args) -> str:
    """The canonical spelling of `args.data_set`."""
    name = str(args.data_set)
    for known in DATA_SETS:
        if name.lower() == known.lower():
            return known
    raise UserError(f"unknown --data_set {name!r}; choose one of {', '.join(DATA_SETS)}")


def build_transform(is_train: bool, args):
    """The published preprocessing for `args.input_size`.

    Evaluation follows BEiT/DeiT: resize the shorter side to input_size / crop_pct (bicubic;
    crop_pct 0.875 below 384 pixels, else 1.0), center-crop, normalize. Training uses a
    bicubic RandomResizedCrop and horizontal flips. Normalization uses CLIP's mean/std, or
    ImageNet's with `args.imagenet_default_mean_and_std`.

    DIGITS images are already tensors; they get a plain bicubic resize to a square plus the
    normalization, for both splits (digits are not flip-invariant and too small to crop).
    """
    size = int(args.input_size)
    if size <= 0:
        raise UserError(f"--input_size must be positive, got {size}")
    if getattr(args, "imagenet_default_mean_and_std", False):
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    normalize = transforms.Normalize(mean, std)

    if _data_set_name(args) == "DIGITS":
        return transforms.Compose([
            transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC,
                              antialias=True),
            transforms.Lambda(_clip_to_unit_range),
            normalize,
        ])
    if is_train:
        return transforms.Compose([
            transforms.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    crop_pct = 0.875 if size < 384 else 1.0
    return transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        normalize,
    ])


def _clip_to_unit_range(image: torch.Tensor) -> torch.Tensor:
    # Bicubic overshoots at sharp edges; PIL clips it for real images, so do the same here.
    return image.clamp(0.0, 1.0)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as 3-channel images in [0, 1].

    The split is fixed (stratified, 25% held out, random_state=0): 1,347 training and 450
    evaluation images. Images are kept at 8x8 and resized in `__getitem__` by `transform`,
    so memory stays small at any input size.
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
        # Pixel values are integers 0..16; uint8 keeps the whole set under 120 kB.
        self.images = torch.as_tensor(digits.images[chosen], dtype=torch.uint8)  # (N, 8, 8)
        self.targets = [int(t) for t in digits.target[chosen]]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = (self.images[index].float() / 16.0).expand(3, -1, -1)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_dataset(is_train: bool, args):
    """The dataset for the training (`is_train`) or evaluation split, and its class count.

    Reads `args.data_set`, `args.eval_data_path`, `args.input_size`, and optionally
    `args.download`, `args.imagenet_default_mean_and_std` and `args.nb_classes` (when set,
    it must equal the class count of the data).
    """
    name = _data_set_name(args)
    transform = build_transform(is_train, args)

    if name == "DIGITS":
        dataset = DigitsDataset(train=is_train, transform=transform)
        nb_classes = len(dataset.classes)
    else:
        root = getattr(args, "eval_data_path", None)
        if not root:
            raise UserError(f"--data_set {name} needs --eval_data_path (the data folder)")
        root = Path(root)
        if name in _CIFAR:
            dataset = _build_cifar(name, root, is_train, transform,
                                   download=getattr(args, "download", False))
            nb_classes = len(dataset.classes)
        else:
            folder = root / ("train" if is_train else "val") if name == "IMNET" else root
            dataset = _build_image_folder(folder, transform, name)
            nb_classes = len(dataset.classes)

    wanted = getattr(args, "nb_classes", None)
    if wanted is not None and int(wanted) != nb_classes:
        raise UserError(f"--data_set {name} has {nb_classes} classes but --nb_classes is {wanted}")
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


def _build_image_folder(folder: Path, transform, name: str):
    if not folder.is_dir():
        layout = ("with one sub-folder per class" if name == "image_folder"
                  else "(IMNET expects <eval_data_path>/train and <eval_data_path>/val, "
                       "each with one sub-folder per class)")
        raise UserError(f"--data_set {name}: folder {folder} not found {layout}")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--data_set {name}: no images found in {folder} "
                        f"(expected one sub-folder of images per class): {err}") from None
