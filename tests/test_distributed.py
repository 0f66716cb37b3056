"""Distributed runs under torchrun (2 CPU processes, gloo) agree with a single process.

Two launches of ``python -m torch.distributed.run --standalone --nproc_per_node=2``: one
fine-tunes with DDP for an epoch; the other runs ``run_class_finetuning.py`` five times in the
same two processes (for_v on all batches and on one batch, ann, snn at two batch sizes), through
its real command line. The single-process runs they are compared with run in this process.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import run_class_finetuning
import trans_utils
import utils

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model", "vit_tiny_patch16_224",
         "--model_kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
         "--input_size", "16", "--data_set", "DIGITS", "--nb_classes", "10",
         "--num_workers", "0", "--device", "cpu"]
EVAL = MODEL + ["--no_progress"]
T = 3

# Runs run_class_finetuning.py's command line once per argv list in sys.argv[2] (JSON), in the
# same processes. A spy on trans_utils.sync_calibration saves what each process holds after it.
WORKER = textwrap.dedent("""
    import json, runpy, sys
    sys.path.insert(0, {repo!r})
    import torch, trans_utils, utils

    dump_dir, runs = sys.argv[1], json.loads(sys.argv[2])
    real_sync, calls = trans_utils.sync_calibration, []

    def spy(model, reduce):
        batches = real_sync(model, reduce)
        thresholds = {{k: v.clone() for k, v in model.state_dict().items()
                      if k.endswith(('scale_p', 'scale_n'))}}
        torch.save({{'batches': batches, 'thresholds': thresholds}},
                   f'{{dump_dir}}/sync{{len(calls)}}_rank{{utils.get_rank()}}.pt')
        calls.append(batches)
        return batches

    trans_utils.sync_calibration = spy
    for argv in runs:
        sys.argv = ['run_class_finetuning.py'] + argv
        runpy.run_path({script!r}, run_name='__main__')
""")


def torchrun(script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ECMT_COMPILE="0")  # 2 cores; compiling would dominate
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def single(argv):
    """One plain process (this one), as `python run_class_finetuning.py ...` would run."""
    return run_class_finetuning.main(run_class_finetuning.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def one_thread_eager():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = trans_utils.set_default_backend('eager')
    yield
    torch.set_num_threads(threads)
    trans_utils.set_default_backend(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fintune_model.py for one epoch under torchrun (DDP, 2 processes)."""
    out = tmp_path_factory.mktemp("finetune")
    proc = torchrun(REPO / "fintune_model.py", *MODEL, "--batch_size", "128", "--lr", "2e-3",
                    "--epochs", "1", "--output_dir", out, "--savename", "tiny")
    return out, proc


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory, one_thread_eager):
    """The same five runs with 1 process (here) and with 2 (torchrun); their outputs."""
    out = tmp_path_factory.mktemp("runs")
    weights = trained[0] / "tiny_best.pth"
    calib = EVAL + ["--test_mode", "for_v", "--model_path", weights, "--batch_size", "64"]

    def plan(tag):
        base = ["--log_dir", out / tag, "--output_dir", out / tag]
        return {
            "for_v": calib + base + ["--savename", "all"],
            "for_v_one": calib + base + ["--savename", "one", "--calib_batches", "1"],
            # 5 batches of 100: 3 on one process, 2 on the other.
            "ann": EVAL + base + ["--test_mode", "ann", "--model_path", weights,
                                  "--batch_size", "100"],
            "snn": EVAL + base + ["--test_mode", "snn", "--model_path", out / "single" / "all.pth",
                                  "--batch_size", "64", "--test_T", T],
            # One batch of all 450 images: the second process has nothing to evaluate.
            "snn_one_batch": EVAL + base + ["--test_mode", "snn", "--model_path",
                                            out / "single" / "all.pth",
                                            "--batch_size", "512", "--test_T", T],
        }

    results = {"single": {}, "dist": {}}
    for name, argv in plan("single").items():
        argv = [str(a) for a in argv] + ["--results", str(out / "single" / f"{name}.json")]
        results["single"][name] = single(argv)
    dist_runs = {name: [str(a) for a in argv] + ["--results", str(out / "dist" / f"{name}.json")]
                 for name, argv in plan("dist").items()}
    worker = out / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO),
                                    script=str(REPO / "run_class_finetuning.py")))
    dumps = out / "dumps"
    dumps.mkdir()
    torchrun(worker, dumps, json.dumps(list(dist_runs.values())))
    for name in dist_runs:
        results["dist"][name] = json.loads((out / "dist" / f"{name}.json").read_text())
    return out, results


def within_one_image(a, b, n):
    return abs(a - b) <= 100.0 / n + 1e-9


def thresholds(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.endswith(("scale_p", "scale_n"))}


def test_sharded_batch_sampler_covers_every_image_once():
    for size, batch, world, limit in [(450, 64, 2, None), (450, 64, 3, None), (10, 4, 8, None),
                                      (450, 64, 2, 3), (0, 8, 2, None), (7, 100, 2, None)]:
        shards = [list(utils.ShardedBatchSampler(size, batch, r, world, limit))
                  for r in range(world)]
        seen = sorted(i for shard in shards for b in shard for i in b)
        expected = min(size, batch * limit) if limit else size
        assert seen == list(range(expected))
        assert [len(s) for s in shards] == [len(utils.ShardedBatchSampler(size, batch, r, world,
                                                                          limit))
                                            for r in range(world)]
        # The batches are those of one process reading the set in order.
        single_batches = list(utils.ShardedBatchSampler(size, batch, 0, 1, limit))
        for r, shard in enumerate(shards):
            assert shard == single_batches[r::world]


def test_sync_calibration_pools_all_batches():
    """Three emulated processes (one with no batch) pool to the thresholds of one process."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 50) * (i + 1) + i for i in range(5)]

    def calibrated(shard):
        model = torch.nn.Sequential(trans_utils.TestNeuron("fc1"), trans_utils.TestNeuron("fc2"),
                                    trans_utils.TestNeuron("s"))
        for x in shard:
            model(x)
        return model

    whole = calibrated(batches)
    shards = [batches[0::2], batches[1::2], []]
    sent = []  # what each process hands to all_reduce; the sum is what every one gets back
    for shard in shards:
        trans_utils.sync_calibration(calibrated(shard), lambda t: sent.append(t.clone()) or t)
    total = sum(sent)
    pooled = [calibrated(shard) for shard in shards]
    for model in pooled:
        assert trans_utils.sync_calibration(model, lambda t: total.clone()) == len(batches)
        for mine, first, ref in zip(model, pooled[0], whole):
            assert mine.num_batches == ref.num_batches
            torch.testing.assert_close(mine.scale_p, ref.scale_p, rtol=1e-6, atol=0)
            torch.testing.assert_close(mine.scale_n, ref.scale_n, rtol=1e-6, atol=0)
            assert torch.equal(mine.scale_p, first.scale_p) and torch.equal(mine.scale_n, first.scale_n)
    assert float(pooled[2][2].scale_p) == 0.0  # 's' is not calibrated
    assert float(pooled[2][0].scale_p) > 0.0   # the process with no batch got the pooled value


def test_helpers_without_process_group():
    assert not utils.is_distributed() and utils.is_main_process()
    t = torch.arange(3.0)
    assert utils.all_reduce_sum(t) is t
    assert utils.init_distributed("cpu") == (torch.device("cpu"), 0, 1)


def test_ann_sums_over_processes(runs):
    _, results = runs
    one, two = results["single"]["ann"], results["dist"]["ann"]
    assert two["world_size"] == 2 and "world_size" not in one
    assert two["n"] == one["n"] == 450
    for key in ("acc1", "acc5"):
        assert within_one_image(two[key], one[key], one["n"]), (key, one[key], two[key])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["snn", "snn_one_batch"])
def test_snn_sums_over_processes(runs, name):
    _, results = runs
    one, two = results["single"][name], results["dist"][name]
    assert two["n"] == one["n"] == 450 and two["T"] == one["T"] == T
    for key in ("acc1", "acc5"):
        assert len(two[key]) == T
        for t, (a, b) in enumerate(zip(one[key], two[key])):
            assert within_one_image(a, b, one["n"]), (key, t + 1, a, b)
    # SOP counts are sums of integers: the firing rates agree to rounding.
    assert two["fire_rate"] == pytest.approx(one["fire_rate"], rel=1e-9)
    assert two["energy_ratio"] == pytest.approx(one["energy_ratio"], rel=1e-9)


@pytest.mark.parametrize("name, index, batches", [("all", 0, 8), ("one", 1, 1)])
def test_for_v_thresholds_same_on_every_process(runs, name, index, batches):
    out, results = runs
    dumps = [torch.load(out / "dumps" / f"sync{index}_rank{r}.pt", weights_only=True)
             for r in (0, 1)]
    assert dumps[0]["batches"] == dumps[1]["batches"] == batches
    saved = thresholds(out / "dist" / f"{name}.pth")
    assert saved and saved.keys() == dumps[0]["thresholds"].keys()
    for key in saved:
        assert torch.equal(dumps[0]["thresholds"][key], dumps[1]["thresholds"][key]), key
        assert torch.equal(saved[key], dumps[0]["thresholds"][key]), key
    # The processes saw the single-process batches, so the pooled means are the single-process
    # means, up to the order of the float64 sums.
    reference = thresholds(out / "single" / f"{name}.pth")
    assert any(bool(v.abs().sum() > 0) for v in reference.values())
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-6, atol=0)
    n = results["single"][f"for_v{'_one' if name == 'one' else ''}"]["n"]
    assert results["dist"][f"for_v{'_one' if name == 'one' else ''}"]["n"] == n


def test_only_rank0_writes(runs):
    out, _ = runs
    log = (out / "dist" / "log_ann.txt").read_text()
    # Five runs: one header each (for_v twice and ann in log_ann.txt).
    assert log.count("=== ") == 3 and "torchrun, 2 processes" in log
    assert sorted(p.name for p in (out / "dist").glob("*.pth")) == ["all.pth", "one.pth"]


def test_fintune_under_ddp(trained, runs):
    out, proc = trained
    record = json.loads((out / "tiny_finetune.json").read_text())
    assert record["world_size"] == 2 and len(record["history"]) == 1
    assert proc.stdout.count("epoch 0:") == 1  # printed by process 0 only
    state = torch.load(out / "tiny_best.pth", map_location="cpu", weights_only=True)
    assert list(state) == ["model"]
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16,
                              patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model.load_state_dict(state["model"])  # timm's keys exactly, no 'module.' prefix
    # The sharded, summed evaluation of the fine-tuning run equals a single-process ann run.
    ann = runs[1]["single"]["ann"]
    assert within_one_image(record["history"][0]["val_acc1"], ann["acc1"], ann["n"])
    assert record["history"][0]["val_loss"] == pytest.approx(ann["loss"], rel=1e-5)
