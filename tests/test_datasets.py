from argparse import Namespace

import pytest
import timm
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from datasets import (build_calibration_dataset, build_dataset, build_transform, describe_transform,
                      same_transform, transform_config)
from utils import UserError


def make_args(**overrides):
    args = dict(data_set="DIGITS", eval_data_path=None, input_size=32, nb_classes=None,
                imagenet_default_mean_and_std=False, download=False, data_config="published",
                crop_pct=None, calib_data_path=None)
    args.update(overrides)
    return Namespace(**args)


# ---------------------------------------------------------------- DIGITS

def test_digits_split_is_fixed_and_complete():
    train, n_train = build_dataset(True, make_args())
    val, n_val = build_dataset(False, make_args(data_set="digits"))
    assert (len(train), len(val)) == (1347, 450)
    assert n_train == n_val == 10
    assert sorted(set(val.targets)) == list(range(10))
    # Stratified: every class keeps roughly a quarter of its images for evaluation.
    assert min(val.targets.count(c) for c in range(10)) >= 43
    again, _ = build_dataset(False, make_args())
    assert again.targets == val.targets and torch.equal(again.images, val.images)
    # Train and evaluation images are distinct samples of the same 1,797.
    train_rows = {tuple(img.flatten().tolist()) for img in train.images}
    overlap = sum(tuple(img.flatten().tolist()) in train_rows for img in val.images)
    assert overlap < 10  # a few digits are pixel-identical duplicates in the source data


def test_digits_items_shape_and_normalization():
    val, _ = build_dataset(False, make_args(input_size=24))
    image, label = val[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert isinstance(label, int) and label == val.targets[0]
    # The background (0) maps to (0 - mean) / std with CLIP's statistics, per channel.
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    gray = image * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)
    assert gray.min() >= -1e-6 and gray.max() <= 1 + 1e-6  # bicubic overshoot is clipped
    assert val.images[0][0, 0] == 0
    assert torch.allclose(image[:, 0, 0], -mean / std, atol=1e-4)
    assert image.max() > (0.5 - mean.min()) / std.max()  # the digit's strokes are bright


def test_digits_imagenet_normalization():
    args = make_args(input_size=8, imagenet_default_mean_and_std=True)
    val, _ = build_dataset(False, args)
    image, _ = val[0]
    raw = val.images[0].float() / 255
    mean = IMAGENET_DEFAULT_MEAN[0]
    std = build_transform(False, args).transforms[-1].std[0]
    # At the native size the resize is the identity, so only the normalization remains.
    assert torch.allclose(image[0], (raw - mean) / std, atol=1e-6)


def test_digits_pixels_are_scaled_to_0_255():
    val, _ = build_dataset(False, make_args())
    from sklearn.datasets import load_digits
    source = torch.as_tensor(load_digits().images[val.source_indices])
    assert torch.equal(val.images.long(), torch.floor(source * 255 / 16 + 0.5).long())
    picture = val.image(3)
    assert picture.mode == "RGB" and picture.size == (8, 8)


def test_digits_no_random_augmentation():
    train, _ = build_dataset(True, make_args())
    assert torch.equal(train[5][0], train[5][0])


def test_nb_classes_mismatch():
    with pytest.raises(UserError, match="has 10 classes but --nb_classes is 1000"):
        build_dataset(False, make_args(nb_classes=1000))
    build_dataset(False, make_args(nb_classes=10))


def test_unknown_data_set():
    with pytest.raises(UserError, match="unknown --data_set 'MNIST'"):
        build_dataset(False, make_args(data_set="MNIST"))


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("name, folder", [("CIFAR10", "cifar-10-batches-py"),
                                          ("cifar100", "cifar-100-python")])
def test_cifar_missing_names_folder_and_path(tmp_path, name, folder):
    with pytest.raises(UserError) as info:
        build_dataset(False, make_args(data_set=name, eval_data_path=str(tmp_path)))
    assert f"'{folder}' inside {tmp_path}" in str(info.value)


def test_cifar_folder_itself_passed_suggests_parent(tmp_path):
    inner = tmp_path / "cifar-10-batches-py"
    with pytest.raises(UserError, match=f"pass its parent {tmp_path}"):
        build_dataset(True, make_args(data_set="CIFAR10", eval_data_path=str(inner)))


def test_cifar_corrupt_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match="could not read CIFAR10"):
        build_dataset(True, make_args(data_set="CIFAR10", eval_data_path=str(tmp_path)))


def test_path_required_for_folder_data_sets():
    with pytest.raises(UserError, match="needs --eval_data_path"):
        build_dataset(False, make_args(data_set="CIFAR10"))


# ---------------------------------------------------------------- image folders

def _write_images(root, classes=("cat", "dog", "emu"), per_class=2):
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            color = (40 * ci, 100, 20 * i)
            Image.new("RGB", (20 + 3 * i, 14), color).save(root / name / f"{i}.png")


def test_image_folder_loads_classes(tmp_path):
    _write_images(tmp_path)
    dataset, nb_classes = build_dataset(False, make_args(data_set="image_folder",
                                                         eval_data_path=str(tmp_path),
                                                         input_size=16))
    assert nb_classes == 3 and dataset.classes == ["cat", "dog", "emu"]
    assert len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and label == 2


def test_imnet_uses_train_and_val_subfolders(tmp_path):
    _write_images(tmp_path / "train", per_class=3)
    _write_images(tmp_path / "val", classes=("cat", "dog", "emu"), per_class=1)
    args = make_args(data_set="IMNET", eval_data_path=str(tmp_path), input_size=16)
    train, _ = build_dataset(True, args)
    val, nb_classes = build_dataset(False, args)
    assert (len(train), len(val), nb_classes) == (9, 3, 3)
    assert train[0][0].shape == (3, 16, 16)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match=f"folder {tmp_path / 'val'} not found"):
        build_dataset(False, make_args(data_set="IMNET", eval_data_path=str(tmp_path)))
    with pytest.raises(UserError, match="no images found"):
        build_dataset(False, make_args(data_set="image_folder", eval_data_path=str(tmp_path)))


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("size, crop_pct, resize", [(224, None, 224), (32, None, 32), (384, None, 384),
                                                     (224, 0.875, 256), (32, 0.875, 36), (33, 0.9, 36)])
def test_eval_transform_crop_fraction_is_one_unless_given(size, crop_pct, resize):
    transform = build_transform(False, make_args(data_set="IMNET", input_size=size, crop_pct=crop_pct))
    assert transform.transforms[0].size == resize  # floor(size / crop_pct), as timm computes it
    out = transform(Image.new("RGB", (500, 375)))
    assert out.shape == (3, size, size)


def test_transform_record_is_plain_and_described_in_one_line():
    record = transform_config(make_args(data_set="CIFAR10", input_size=32))
    assert record == {"data_config": "published", "input_size": 32, "interpolation": "bicubic",
                      "crop_pct": 1.0, "crop_mode": "center", "mean": list(OPENAI_CLIP_MEAN),
                      "std": list(OPENAI_CLIP_STD)}
    line = describe_transform(record)
    assert "\n" not in line and "center crop 32x32 (crop_pct 1.0)" in line and "0.4815" in line
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1)
    other = transform_config(make_args(input_size=32, data_config="timm"), model)
    assert not same_transform(record, other)  # timm's crop 0.9 and mean 0.5
    assert same_transform(record, dict(record, data_config="timm"))  # the origin does not matter
    with pytest.raises(UserError, match="--crop_pct must be in"):
        transform_config(make_args(crop_pct=1.5))


def test_calibration_dataset_is_the_evaluation_set_unless_a_path_is_given():
    evaluation, _ = build_calibration_dataset(make_args())
    assert len(evaluation) == 450
    train, _ = build_calibration_dataset(make_args(calib_data_path="anything"))
    assert len(train) == 1347
    # The calibration images get the evaluation transform (no random augmentation).
    assert torch.equal(train[0][0], build_transform(False, make_args())(train.image(0)))


def test_train_transform_size_and_randomness():
    transform = build_transform(True, make_args(data_set="CIFAR10", input_size=24))
    gradient = Image.fromarray(
        (torch.arange(32 * 32).reshape(32, 32, 1).expand(32, 32, 3) % 256)
        .to(torch.uint8).numpy())
    torch.manual_seed(0)
    outs = [transform(gradient) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_normalization_choice():
    clip = build_transform(False, make_args(data_set="IMNET")).transforms[-1]
    imnet = build_transform(False, make_args(data_set="IMNET",
                                             imagenet_default_mean_and_std=True)).transforms[-1]
    assert tuple(clip.mean) == tuple(OPENAI_CLIP_MEAN)
    assert tuple(imnet.mean) == tuple(IMAGENET_DEFAULT_MEAN)
