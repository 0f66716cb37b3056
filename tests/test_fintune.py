"""End-to-end runs of fintune_model.py on the bundled DIGITS data with a tiny ViT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import fintune_model
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny_patch16_224",
        "--model_kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
        "--input_size", "16", "--data_set", "DIGITS", "--batch_size", "128",
        "--lr", "2e-3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads
    competing with another process make each step ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_timm_model(num_classes=10):
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=16,
                             patch_size=4, embed_dim=32, depth=2, num_heads=2)


def parse(*extra):
    return fintune_model.get_args_parser().parse_args(TINY + list(extra))


def test_main_trains_and_writes_outputs(tmp_path):
    record = fintune_model.main(parse("--epochs", "2", "--output_dir", str(tmp_path),
                                      "--savename", "tiny"))
    names = sorted(os.listdir(tmp_path))
    assert names == ["tiny_0.pth", "tiny_1.pth", "tiny_best.pth", "tiny_finetune.json"]

    saved = json.loads((tmp_path / "tiny_finetune.json").read_text())
    assert saved == record
    assert saved["epochs"] == 2 and len(saved["history"]) == 2
    assert [h["epoch"] for h in saved["history"]] == [0, 1]
    best = max(h["val_acc1"] for h in saved["history"])
    assert saved["best_acc1"] == best
    assert saved["history"][saved["best_epoch"]]["val_acc1"] == best
    assert saved["history"][1]["train_loss"] < saved["history"][0]["train_loss"]
    assert saved["seconds"] > 0
    assert saved["transform"]["crop_pct"] == 1.0 and saved["transform"]["input_size"] == 16

    # The best checkpoint is a plain {'model': timm state dict}, loadable safely and strictly.
    checkpoint = torch.load(tmp_path / "tiny_best.pth", map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["model"]
    model = tiny_timm_model()
    model.load_state_dict(checkpoint["model"], strict=True)
    epoch_file = torch.load(tmp_path / f"tiny_{saved['best_epoch']}.pth", weights_only=True)
    assert all(torch.equal(epoch_file["model"][k], v) for k, v in checkpoint["model"].items())

    # Its reported accuracy is reproducible from the checkpoint alone.
    from datasets import build_dataset
    val, _ = build_dataset(False, parse())
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        predictions = model.eval()(images).argmax(1)
    acc1 = 100.0 * (predictions == torch.tensor(val.targets)).float().mean().item()
    assert acc1 == pytest.approx(best, abs=1e-3)


def test_model_path_with_other_head_starts_new_head(tmp_path, capsys):
    source = tiny_timm_model(num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "src.pth")
    fintune_model.main(parse("--epochs", "1", "--output_dir", str(tmp_path / "out"),
                             "--model_path", str(tmp_path / "src.pth"),
                             "--no-save_every_epoch", "--lr", "1e-9"))
    assert "7 classes" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["vit_tiny_patch16_224_best.pth",
                                                    "vit_tiny_patch16_224_finetune.json"]
    trained = torch.load(tmp_path / "out" / "vit_tiny_patch16_224_best.pth",
                         weights_only=True)["model"]
    assert trained["head.weight"].shape == (10, 32)
    # With a negligible learning rate the body is still the checkpoint's.
    assert torch.allclose(trained["blocks.0.attn.qkv.weight"],
                          source.state_dict()["blocks.0.attn.qkv.weight"], atol=1e-6)


def test_model_path_with_other_architecture_is_a_user_error(tmp_path):
    wide = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4,
                             embed_dim=48, depth=2, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"width \(embed_dim\) 48 \(the model: 32\).*it fits --model_kwargs "
                                         r"patch_size=4 embed_dim=48 depth=2 num_heads=2"):
        fintune_model.main(fintune_model.get_args_parser().parse_args(
            TINY + ["--model_path", str(tmp_path / "wide.pth"), "--output_dir", str(tmp_path / "o")]))


@pytest.mark.parametrize("extra, message", [
    (["--model_kwargs", "no_such_arg=1"], "unexpected keyword argument 'no_such_arg'"),
    (["--model_kwargs", "img_size=32"], "use --nb_classes and --input_size"),
    (["--nb_classes", "100"], "has 10 classes but --nb_classes is 100"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--model", "nope_model"], "nope_model"),
    (["--device", "gpu0"], "not a device name"),
])
def test_bad_options_are_user_errors(tmp_path, extra, message):
    args = fintune_model.get_args_parser().parse_args(
        TINY + ["--output_dir", str(tmp_path)] + extra)
    with pytest.raises(UserError, match=message):
        fintune_model.main(args)


def test_unwritable_output_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to --output_dir"):
        fintune_model.main(parse("--output_dir", str(blocker / "out")))


def _run_cli(*argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_thread()
    return subprocess.run([sys.executable, str(REPO / "fintune_model.py"), *argv],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    result = _run_cli(*TINY, "--epochs", "1", "--data_path", "unused",
                      "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best val acc1" in result.stdout
    out = tmp_path / "out"
    assert {"vit_tiny_patch16_224_0.pth", "vit_tiny_patch16_224_best.pth",
            "vit_tiny_patch16_224_finetune.json"} <= set(os.listdir(out))
    sd = torch.load(out / "vit_tiny_patch16_224_best.pth", weights_only=True)["model"]
    tiny_timm_model().load_state_dict(sd, strict=True)


@pytest.mark.parametrize("make_bad", ["missing", "text"])
def test_cli_bad_model_path_exits_2(tmp_path, make_bad):
    path = tmp_path / "bad.pth"
    if make_bad == "text":
        path.write_text("not a checkpoint")
    result = _run_cli(*TINY, "--model_path", str(path), "--output_dir", str(tmp_path / "o"),
                      cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(path) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# Own images (issue 32, item 6): train/ and val/ sub-folders, never one folder for both splits
# ------------------------------------------------------------------------------------------
def _images(root, names=("a", "b"), per_class=4, seed=0):
    from PIL import Image
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), (80 * c + seed, 30 * i, 100)).save(root / name / f"{i}.png")
    return root


def _folder_args(data, *extra):
    args = [a for a in TINY if a not in ("DIGITS",)]
    args[args.index("--data_set") + 1:args.index("--data_set") + 1] = ["image_folder"]
    return fintune_model.get_args_parser().parse_args(
        args + ["--data_path", str(data), "--epochs", "1", "--batch_size", "4", *extra])


def test_train_and_val_subfolders_are_the_two_splits(tmp_path, capsys):
    _images(tmp_path / "data" / "train", per_class=4)
    _images(tmp_path / "data" / "val", per_class=2, seed=7)
    record = fintune_model.main(_folder_args(tmp_path / "data", "--output_dir", str(tmp_path / "o")))
    out = capsys.readouterr().out
    assert "8 training / 4 evaluation images, 2 classes" in out
    assert f"evaluation images from {tmp_path / 'data' / 'val'}" in out
    assert record["nb_classes"] == 2


def test_one_folder_is_never_both_splits(tmp_path):
    _images(tmp_path / "flat")
    with pytest.raises(UserError, match="has no train/ and val/ sub-folders") as info:
        fintune_model.main(_folder_args(tmp_path / "flat", "--output_dir", str(tmp_path / "o")))
    assert "--val_data_path" in str(info.value)
    # Following it: a folder of other images for the evaluation.
    _images(tmp_path / "held_out", per_class=2, seed=9)
    record = fintune_model.main(_folder_args(tmp_path / "flat", "--val_data_path", str(tmp_path / "held_out"),
                                             "--output_dir", str(tmp_path / "o")))
    assert record["best_acc1"] is not None
    with pytest.raises(UserError, match="is the training folder"):
        fintune_model.main(_folder_args(tmp_path / "flat", "--val_data_path", str(tmp_path / "flat"),
                                        "--output_dir", str(tmp_path / "o")))


def test_no_augment_trains_on_the_evaluation_transform_and_data_config_is_recorded(tmp_path):
    from datasets import build_transform
    args = _folder_args(tmp_path, "--no-augment", "--mean", "0.5", "--std", "0.5")
    train, evaluation = build_transform(True, args), build_transform(False, args)
    assert repr(train) == repr(evaluation)
    augmented = build_transform(True, _folder_args(tmp_path))
    assert "RandomResizedCrop" in repr(augmented) and "RandomResizedCrop" not in repr(train)
    record = fintune_model.main(parse("--epochs", "1", "--output_dir", str(tmp_path / "o"), "--data_config", "timm",
                                      "--no-augment"))
    assert record["transform"]["data_config"] == "timm"


def test_a_folder_where_a_checkpoint_goes_is_refused_before_training(tmp_path):
    (tmp_path / "o" / "tiny_best.pth").mkdir(parents=True)
    result = _run_cli(*TINY, "--epochs", "1", "--output_dir", "o", "--savename", "tiny", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "tiny_best.pth is a folder" in line
    assert not (tmp_path / "o" / "tiny_finetune.json").exists()


def test_a_partial_torchrun_environment_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, str(REPO / "fintune_model.py"), *TINY, "--epochs", "1",
                             "--output_dir", "o"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(env, WORLD_SIZE="2", OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "torchrun --nproc_per_node=2 fintune_model.py" in line
