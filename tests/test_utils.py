import json
import os
import stat
from collections import OrderedDict

import pytest
import torch
from torch import nn

import utils
import weights
from utils import (UserError, accuracy, append_log, parse_model_kwargs, resolve_device, save_checkpoint,
                   seed_everything, write_json)
from weights import load_checkpoint, load_model_weights, read_checkpoint


class TinyNet(nn.Module):
    def __init__(self, classes=10, width=4):
        super().__init__()
        self.body = nn.Linear(3, width)
        self.head = nn.Linear(width, classes)
        self.register_buffer("scale_p", torch.ones(1))


def _sd():
    return {"a.weight": torch.randn(2, 3), "a.bias": torch.zeros(2)}


# ---------------------------------------------------------------- load_checkpoint

def test_load_checkpoint_plain_state_dict(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "ck.pth")
    loaded = load_checkpoint(tmp_path / "ck.pth")
    assert loaded.keys() == sd.keys()
    assert torch.equal(loaded["a.weight"], sd["a.weight"])


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict"])
def test_load_checkpoint_unwraps(tmp_path, wrap):
    sd = _sd()
    torch.save({wrap: sd, "epoch": 3}, tmp_path / "ck.pth")
    assert set(load_checkpoint(tmp_path / "ck.pth")) == set(sd)


def test_load_checkpoint_strips_ddp_prefix_only_when_on_every_key(tmp_path):
    torch.save({"model": OrderedDict(("module." + k, v) for k, v in _sd().items())},
               tmp_path / "ddp.pth")
    assert set(load_checkpoint(tmp_path / "ddp.pth")) == {"a.weight", "a.bias"}

    mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
    torch.save(mixed, tmp_path / "mixed.pth")
    assert set(load_checkpoint(tmp_path / "mixed.pth")) == {"module.a", "b"}


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_load_checkpoint_directory(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        load_checkpoint(tmp_path)


def test_load_checkpoint_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(UserError, match="not a .*PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [0, 0.5])
def test_load_checkpoint_truncated_or_empty(tmp_path, keep):
    path = tmp_path / "ck.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError, match="truncated") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


class Pickled:
    """A class of this module: loading it would run code of a module of the file's choosing."""


def test_load_checkpoint_published_layout_with_namespace(tmp_path):
    import argparse
    sd = _sd()
    torch.save({"model": sd, "args": argparse.Namespace(lr=1, model="vit")}, tmp_path / "ck.pth")
    loaded, extras = read_checkpoint(tmp_path / "ck.pth")
    assert loaded.keys() == sd.keys() and torch.equal(loaded["a.weight"], sd["a.weight"])
    assert extras == {"args": {"lr": 1, "model": "vit"}}  # a plain dict, not a Namespace
    assert load_checkpoint(tmp_path / "ck.pth").keys() == sd.keys()


@pytest.mark.parametrize("thing", [Pickled(), stat.S_IMODE, OrderedDict.fromkeys])
def test_load_checkpoint_other_pickled_objects_rejected(tmp_path, thing):
    torch.save({"model": _sd(), "extra": thing}, tmp_path / "ck.pth")
    with pytest.raises(UserError, match="besides tensors and an argparse.Namespace"):
        load_checkpoint(tmp_path / "ck.pth")


def test_read_checkpoint_extras_are_the_entries_beside_the_state_dict(tmp_path):
    torch.save({"model": _sd(), "calibration": {"percent": 0.99}}, tmp_path / "a.pth")
    assert read_checkpoint(tmp_path / "a.pth")[1] == {"calibration": {"percent": 0.99}}
    torch.save(_sd(), tmp_path / "b.pth")
    assert read_checkpoint(tmp_path / "b.pth")[1] == {}


# ---------------------------------------------------------------- published placeholder names

PUBLISHED = {"x_in_test": "place_fc_qkv", "q_out_test": "place_q", "k_out_test": "place_k",
             "v_out_test": "place_v", "attn_out_test": "place_s", "x_out_test": "place_fc_out"}


def test_convert_published_places_maps_every_name_and_nothing_else():
    published = {"blocks.3.attn.qkv.weight": torch.ones(6, 2), "head.bias": torch.zeros(3)}
    for i in range(2):
        for name in PUBLISHED:
            published[f"blocks.{i}.attn.{name}.scale_p"] = torch.full([1], float(i))
            published[f"blocks.{i}.attn.{name}.scale_n"] = torch.full([1], -1.0)
        for name in ("x1_in_test", "x2_in_test"):
            published[f"blocks.{i}.mlp.{name}.scale_p"] = torch.full([1], 2.0)
    before = dict(published)
    converted = weights.convert_published_places(published)
    assert published == before  # pure: the input is left as it is
    assert converted["blocks.3.attn.qkv.weight"] is published["blocks.3.attn.qkv.weight"]
    assert "head.bias" in converted and len(converted) == len(published)
    for name, ours in PUBLISHED.items():
        assert converted[f"blocks.1.attn.{ours}.scale_p"] is published[f"blocks.1.attn.{name}.scale_p"]
    assert converted["blocks.0.mlp.place_fc1.scale_p"] is published["blocks.0.mlp.x1_in_test.scale_p"]
    assert converted["blocks.1.mlp.place_fc2.scale_p"] is published["blocks.1.mlp.x2_in_test.scale_p"]
    assert not any(k.endswith("_test.scale_p") for k in converted)
    assert weights.has_published_place_names(published) and not weights.has_published_place_names(converted)


def test_convert_published_places_leaves_lookalikes():
    # An mlp name under attn (or an unknown *_test) is not a published place: left as it is.
    sd = {"blocks.0.attn.x1_in_test.scale_p": torch.ones(1), "blocks.0.mlp.q_out_test.scale_p": torch.ones(1),
          "latest_test.weight": torch.ones(1)}
    assert weights.convert_published_places(sd) == sd and not weights.has_published_place_names(sd)


# ---------------------------------------------------------------- output folders

def test_check_writable_dir_creates_and_probes(tmp_path):
    utils.check_writable_dir(tmp_path / "a" / "b", "--output_dir")
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []


def test_check_writable_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"cannot write to --log_dir .*f: it is a file, not a folder"):
        utils.check_writable_dir(tmp_path / "f", "--log_dir")
    with pytest.raises(UserError, match="a part of the path is a file"):
        utils.check_writable_dir(tmp_path / "f" / "sub", "--output_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_dir_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write to --output_dir .*Permission denied"):
            utils.check_writable_dir(folder, "--output_dir")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("obj, found", [([torch.ones(1)], "list"),
                                         ({}, "empty dict"),
                                         ({"epoch": 3, "acc": 0.5}, "'epoch'"),
                                         ({"model": {"w": 1}}, "'w'")])
def test_load_checkpoint_not_a_state_dict(tmp_path, obj, found):
    torch.save(obj, tmp_path / "ck.pth")
    with pytest.raises(UserError, match="does not hold a state dict") as info:
        load_checkpoint(tmp_path / "ck.pth")
    assert found in str(info.value)


# ---------------------------------------------------------------- load_model_weights

def test_load_model_weights_loads_values():
    src, dst = TinyNet(), TinyNet()
    load_model_weights(dst, src.state_dict())
    assert torch.equal(dst.head.weight, src.head.weight)


def test_load_model_weights_reports_head_classes_and_shapes():
    with pytest.raises(UserError) as info:
        load_model_weights(TinyNet(classes=10), TinyNet(classes=1000).state_dict())
    msg = str(info.value)
    assert "checkpoint has 1000 classes, --nb_classes is 10" in msg
    assert "head.weight: checkpoint (1000, 4) vs model (10, 4)" in msg
    assert "head.bias: checkpoint (1000,) vs model (10,)" in msg
    assert "\n" not in msg


def test_load_model_weights_lists_missing_and_unexpected_with_counts():
    sd = TinyNet().state_dict()
    del sd["body.weight"]
    sd.update({f"extra{i}": torch.zeros(1) for i in range(8)})
    model = TinyNet()
    before = model.body.bias.clone()
    with pytest.raises(UserError) as info:
        load_model_weights(model, sd)
    msg = str(info.value)
    assert "1 missing keys: body.weight" in msg
    assert "8 unexpected keys: extra0, extra1, extra2, extra3, extra4, ... (3 more)" in msg
    assert "extra7" not in msg
    assert torch.equal(model.body.bias, before)  # nothing loaded on failure


def test_load_model_weights_ignore_suffixes_both_sides():
    # Checkpoint with thresholds, model without: dropped from the checkpoint.
    sd = TinyNet().state_dict()
    sd["blocks.0.scale_n"] = torch.ones(1)
    plain = nn.Sequential()
    plain.body, plain.head = nn.Linear(3, 4), nn.Linear(4, 10)
    with pytest.raises(UserError, match="unexpected keys"):
        load_model_weights(plain, sd)
    load_model_weights(plain, sd, ignore=("scale_p", "scale_n"))
    assert torch.equal(plain.head.weight, sd["head.weight"])

    # Model with thresholds, checkpoint without: the model keeps its own values.
    model = TinyNet()
    model.scale_p.fill_(7)
    load_model_weights(model, plain.state_dict(), ignore="scale_p")
    assert model.scale_p.item() == 7


def test_load_model_weights_ignore_predicate():
    model = TinyNet(classes=10)
    old_head = model.head.weight.clone()
    src = TinyNet(classes=1000)
    load_model_weights(model, src.state_dict(), ignore=lambda k: k.startswith("head."))
    assert torch.equal(model.body.weight, src.body.weight)
    assert torch.equal(model.head.weight, old_head)


# ---------------------------------------------------------------- saving and logs

def test_save_checkpoint_atomic_and_weights_only(tmp_path):
    path = tmp_path / "new" / "dir" / "ck.pth"
    obj = {"model": _sd(), "epoch": 2, "acc": 91.5, "name": "vit", "shape": (1, 2)}
    save_checkpoint(obj, path)
    save_checkpoint(obj, path)  # overwriting is fine
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 2 and loaded["name"] == "vit"
    assert torch.equal(loaded["model"]["a.weight"], obj["model"]["a.weight"])
    assert os.listdir(path.parent) == ["ck.pth"]  # no temporary files left behind
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, not mkstemp's 0600


def test_save_checkpoint_rejects_objects_and_writes_nothing(tmp_path):
    import argparse
    with pytest.raises(TypeError, match=r"obj\['args'\] is a Namespace"):
        save_checkpoint({"model": _sd(), "args": argparse.Namespace()}, tmp_path / "ck.pth")
    assert os.listdir(tmp_path) == []


def test_save_checkpoint_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    save_checkpoint({"v": torch.ones(1)}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"v": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck.pth"]
    assert torch.load(path, weights_only=True)["v"].item() == 1


def test_write_json(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json({"acc1": 90.5, "history": [1, 2]}, path)
    text = path.read_text()
    assert text.endswith("}\n") and '\n  "acc1": 90.5' in text
    assert json.loads(text) == {"acc1": 90.5, "history": [1, 2]}
    assert os.listdir(path.parent) == ["r.json"]
    with pytest.raises(TypeError):
        write_json({"bad": object()}, path)
    assert json.loads(path.read_text())["acc1"] == 90.5  # old content survives a failure


def test_append_log(tmp_path):
    path = tmp_path / "logs" / "log_ann.txt"
    append_log(path, "first")
    append_log(path, "second\n")
    assert path.read_text() == "first\nsecond\n"


# ---------------------------------------------------------------- helpers

def test_accuracy_counts():
    output = torch.tensor([[0.9, 0.05, 0.05],   # top1 = 0
                           [0.1, 0.2, 0.7],     # top1 = 2, top2 = {2, 1}
                           [0.3, 0.6, 0.1],     # top1 = 1, top2 = {1, 0}
                           [0.5, 0.1, 0.4]])    # top1 = 0, top2 = {0, 2}
    target = torch.tensor([0, 1, 0, 1])
    top1, top2, top5 = accuracy(output, target, topk=(1, 2, 5))
    assert isinstance(top1, torch.Tensor) and top1.dim() == 0
    assert (top1.item(), top2.item(), top5.item()) == (1, 3, 4)
    assert accuracy(output, target)[0].item() == 1


def test_seed_everything_repeats():
    seed_everything(3)
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    seed_everything(3)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    with pytest.raises(UserError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(UserError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_parse_model_kwargs():
    kwargs = parse_model_kwargs(["global_pool=avg", "qk_norm=True", "embed_dim=96",
                                 "img_size=(32, 32)", "drop_rate=0.1", "act=None",
                                 "name='x=y'"])
    assert kwargs == {"global_pool": "avg", "qk_norm": True, "embed_dim": 96,
                      "img_size": (32, 32), "drop_rate": 0.1, "act": None, "name": "x=y"}
    assert parse_model_kwargs(None) == {} and parse_model_kwargs([]) == {}


@pytest.mark.parametrize("item, match", [("depth", "name=value"), ("=3", "name=value"),
                                         ("my-key=1", "name=value")])
def test_parse_model_kwargs_malformed(item, match):
    with pytest.raises(UserError, match=match):
        parse_model_kwargs([item])


def test_parse_model_kwargs_duplicate():
    with pytest.raises(UserError, match="twice"):
        parse_model_kwargs(["depth=2", "depth=3"])


def test_keep_freed_memory_sets_glibc_options_or_says_it_did_not(monkeypatch):
    import ctypes
    import sys
    expected = sys.platform.startswith('linux')
    try:
        ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        expected = False
    assert utils.keep_freed_memory() is expected
    monkeypatch.setenv('ECMT_KEEP_MEMORY', '0')
    assert utils.keep_freed_memory() is False
    monkeypatch.delenv('ECMT_KEEP_MEMORY')

    def no_libc(name):
        raise OSError(f'{name}: not here')
    monkeypatch.setattr(ctypes, 'CDLL', no_libc)
    assert utils.keep_freed_memory() is False


def test_cpu_runs_of_the_command_line_keep_freed_memory(monkeypatch, tmp_path):
    import run_class_finetuning as cli
    calls = []
    monkeypatch.setattr(utils, 'keep_freed_memory', lambda: calls.append(1) or True)
    args = cli.get_args_parser().parse_args([
        '--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=1',
        'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS',
        '--num_workers', '0', '--batch_size', '450', '--device', 'cpu', '--no_progress',
        '--test_mode', 'ann', '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)])
    cli.main(args)
    assert calls == [1]
