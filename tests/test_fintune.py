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
    with pytest.raises(UserError, match=r"pos_embed: checkpoint \(1, 17, 48\) vs model "
                                        r"\(1, 17, 32\)"):
        fintune_model.main(parse("--model_path", str(tmp_path / "wide.pth"),
                                 "--output_dir", str(tmp_path)))


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
    with pytest.raises(UserError, match="cannot create --output_dir"):
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
