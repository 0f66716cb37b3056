"""Fine-tune a timm model on a classification data set, to get the ANN that ECMT converts.

Replaces the published script's hard-coded paths with options. Example (CIFAR-10 from an
ImageNet ViT-S/16, as in the published README):

    python fintune_model.py --model vit_small_patch16_224_cifar10 \
        --model_path ../models/vit_small_patch16_224.pth --data_set CIFAR10 \
        --data_path ../datasets --nb_classes 10 --input_size 224 --output_dir ../models

Writes `<output_dir>/<savename>_<epoch>.pth` after every epoch (epochs count from 0),
`<savename>_best.pth` for the best top-1 on the evaluation split, and
`<savename>_finetune.json` with the per-epoch record. Checkpoints are {'model': state_dict}
with timm's keys, for `run_class_finetuning.py --model_path`.

Under `torchrun --nproc_per_node=N fintune_model.py ...` it trains with DistributedDataParallel,
one process per GPU (or CPU processes with gloo): --batch_size is per process, so the global
batch is N times larger (the learning rate is not rescaled). Every process evaluates its share
of the evaluation split, without padding; the figures are summed; process 0 writes the files.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import weights
from cli_base import DATA_CONFIGS, add_launch_flags, check_launch_flags
from datasets import DATA_SETS, build_training_datasets, describe_transform, transform_config
from utils import (ShardedBatchSampler, UserError, accuracy, all_reduce_sum, check_output_file,
                   check_writable_dir, init_distributed, lock_outputs, parse_model_kwargs, release_output_locks,
                   run_cli, save_checkpoint, seed_everything, write_json)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Fine-tune a timm model for ECMT conversion",
                                     add_help=True)
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="timm model name or published alias, e.g. "
                            "vit_small_patch16_224_cifar10")
    model.add_argument("--model_path", default=None,
                       help="timm-format checkpoint to start from; a head with another class "
                            "count is replaced by a new one")
    model.add_argument("--pretrained", action="store_true",
                       help="start from the weights timm or the hub publish for --model (a timm name with "
                            "an optional tag, or hf_hub:org/name), from the Hugging Face cache (fetched "
                            "once with a network; HF_HUB_OFFLINE=1 is honoured)")
    model.add_argument("--pretrained_file", default=None, metavar="PATH",
                       help="start from a local weight file for --model, through timm's pretrained "
                            "loading (torch.save or safetensors)")
    model.add_argument("--model_kwargs", nargs="*", default=[], metavar="K=V",
                       help="extra model arguments, e.g. depth=2 global_pool=avg")
    model.add_argument("--input_size", type=int, default=224, help="image size in pixels")
    model.add_argument("--nb_classes", type=int, default=None,
                       help="number of classes (default: taken from the data)")

    data = parser.add_argument_group("data")
    data.add_argument("--data_set", default="CIFAR10", help=" | ".join(DATA_SETS))
    data.add_argument("--data_path", "--eval_data_path", dest="eval_data_path",
                      default="../datasets", help="folder holding the data set (image_folder: with train/ and "
                                                  "val/ sub-folders of class folders, or the training images "
                                                  "with --val_data_path)")
    data.add_argument("--val_data_path", default=None, metavar="FOLDER",
                      help="image_folder: the evaluation images (one folder per class), when --data_path has no "
                           "val/ sub-folder; never the training folder itself")
    data.add_argument("--download", action="store_true",
                      help="download CIFAR if it is missing")
    data.add_argument("--imagenet_default_mean_and_std", action="store_true",
                      help="normalize with ImageNet mean/std instead of CLIP's")
    data.add_argument("--mean", nargs="+", type=float, default=None, metavar="M",
                      help="normalize with this mean (3 values, or 1 for every channel); with --std")
    data.add_argument("--std", nargs="+", type=float, default=None, metavar="S",
                      help="normalize with this standard deviation (3 values or 1); with --mean")
    data.add_argument("--data_config", default="published", choices=DATA_CONFIGS,
                      help="published: resize the shorter side to --input_size and center crop (the evaluation "
                           "transform of run_class_finetuning.py); timm: the model's pretrained data config "
                           "(interpolation, crop, mean/std; from --pretrained's config or the checkpoint's)")
    data.add_argument("--crop_pct", default=None, type=float,
                      help="evaluation crop fraction (default 1.0, or the model's with --data_config timm)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="train with a random resized crop and horizontal flips (--no-augment: the evaluation "
                           "transform; DIGITS never augments: digits are not flip-invariant)")
    data.add_argument("--batch_size", type=int, default=64,
                      help="batch size per process (under torchrun the global batch is "
                           "--nproc_per_node x nodes x this)")
    data.add_argument("--num_workers", type=int, default=0)

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--warmup_epochs", type=float, default=1.0,
                       help="linear warmup length before the cosine decay (may be fractional)")
    train.add_argument("--smoothing", type=float, default=0.0,
                       help="label smoothing, e.g. 0.1 (default: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... "
                                                      "(default: cuda if available)")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="../models",
                        help="where the checkpoints go (default ../models, beside the published "
                             "scripts' datasets/ and models/)")
    output.add_argument("--savename", default=None, help="checkpoint name prefix "
                                                         "(default: the model name)")
    output.add_argument("--save_every_epoch", action=argparse.BooleanOptionalAction,
                        default=True, help="keep <savename>_<epoch>.pth for every epoch")
    add_launch_flags(parser)
    return parser


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "input_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.nb_classes is not None and args.nb_classes < 1:
        raise UserError(f"--nb_classes must be at least 1, got {args.nb_classes}")
    if not 0.0 <= args.smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0:
        raise UserError("--lr must be positive, --weight_decay and --warmup_epochs >= 0")
    sources = [flag for flag, on in (("--model_path", args.model_path), ("--pretrained", args.pretrained),
                                     ("--pretrained_file", args.pretrained_file)) if on]
    if len(sources) > 1:
        raise UserError(f"{' and '.join(sources)} all name the starting weights: pass one")


def build_model(args, checkpoint: dict | None) -> torch.nn.Module:
    """The model to fine-tune with `checkpoint` loaded (:func:`weights.build_model`: the same
    diagnosis as run_class_finetuning.py); a head with another class count is trained anew."""
    return weights.build_model(args, checkpoint, new_head=True)


def check_outputs(args, output_dir: Path, savename: str) -> None:
    """Before any work: the output folder writable, no folder where a file is to be written, and a
    lock on this savename against a second run writing the same files."""
    release_output_locks()  # those of an earlier run in this process, which has ended
    check_writable_dir(output_dir, "--output_dir")
    for suffix in ("_best.pth", "_finetune.json", "_0.pth"):
        check_output_file(output_dir / f"{savename}{suffix}", "a checkpoint (--output_dir/--savename)")
    if os.environ.get("RANK", "0") == "0":
        lock_outputs([output_dir / savename], "--savename")


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier per optimizer step: linear ramp to 1, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, epoch: int,
                    epochs: int, print_freq: int = 10, reduce=None,
                    show_progress: bool = True) -> dict:
    """One pass over `loader`; returns the mean loss and top-1 accuracy (%) on it.

    `reduce` (e.g. utils.all_reduce_sum) sums the figures over processes at the end.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    # A bar only on a terminal: a redirected log gets the one summary line per epoch instead.
    bar = tqdm(loader, desc=f"train {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
               disable=not show_progress or not sys.stderr.isatty())
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        loss_sum += loss.detach() * len(targets)
        correct += accuracy(logits.detach(), targets)[0]
        seen += len(targets)
        if step % print_freq == 0 or step == len(loader) - 1:  # syncs only every few steps
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc1=f"{100.0 * correct.item() / seen:.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if reduce is not None:
        return _summed_stats(loss_sum, correct, seen, reduce)
    return {"loss": loss_sum.item() / seen, "acc1": 100.0 * correct.item() / seen}


def _summed_stats(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, reduce) -> dict:
    """Mean loss and top-1 accuracy (%) of the sums over all processes."""
    totals = torch.stack([loss_sum.double(), correct.double(),
                          torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)])
    loss_sum, correct, seen = reduce(totals).tolist()
    return {"loss": loss_sum / max(seen, 1), "acc1": 100.0 * correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model, loader, criterion, device, reduce=None, show_progress: bool = True) -> dict:
    """Mean loss and top-1 accuracy (%) of `model` on `loader`.

    `reduce` sums the figures over processes, once at the end, so processes may hold different
    numbers of batches (even none).
    """
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for images, targets in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                                disable=not show_progress or not sys.stderr.isatty()):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += criterion(logits, targets) * len(targets)
        correct += accuracy(logits, targets)[0]
        seen += len(targets)
    if reduce is not None:
        return _summed_stats(loss_sum, correct, seen, reduce)
    return {"loss": loss_sum.item() / seen, "acc1": 100.0 * correct.item() / seen}


def main(args) -> dict:
    """Fine-tune as configured by `args`; returns the record also written as JSON."""
    _check_args(args)
    check_launch_flags(args, "fintune_model.py")
    started = time.perf_counter()
    # Under torchrun: one process per device, DDP; otherwise exactly a single process.
    device, rank, world_size = init_distributed(args.device)
    distributed, main_process = world_size > 1, rank == 0
    log = print if main_process else (lambda *_, **__: None)
    # Read the checkpoint before the outputs and the data, so a wrong path fails at once.
    checkpoint, _, source = weights.load_weights(args, log=log)
    output_dir = Path(args.output_dir)
    savename = args.savename or args.model
    check_outputs(args, output_dir, savename)
    model_kwargs = {**(getattr(args, "model_args", None) or {}), **parse_model_kwargs(args.model_kwargs)}
    seed_everything(args.seed)

    # The model's pretrained config (--data_config timm) needs the model: a plain one first.
    probe = weights.create_model_of(args, new_head=True) if args.data_config == "timm" else None
    dataset_train, dataset_val, nb_classes, where = build_training_datasets(args, probe)
    args.nb_classes = nb_classes
    log(f"{args.data_set}: {len(dataset_train)} training / {len(dataset_val)} evaluation "
        f"images, {nb_classes} classes ({where})")
    # The evaluation transform, the one run_class_finetuning.py applies to the same images.
    transform = transform_config(args, probe)
    log(f"evaluation transform: {describe_transform(transform)}"
        + ("" if args.augment else "; training: the same (--no-augment)"))

    model = build_model(args, checkpoint).to(device)
    del checkpoint
    net = model  # the plain model: evaluated and saved (timm's keys, no 'module.' prefix)

    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda",
                         persistent_workers=args.num_workers > 0)
    train_sampler = None
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        seed_everything(args.seed + rank)  # different augmentation draws on each process
        # Training shards may repeat a few images to even out the processes (harmless);
        # evaluation shards may not, so that every evaluation image counts exactly once.
        train_sampler = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                           shuffle=True, seed=args.seed)
        loader_train = DataLoader(dataset_train, sampler=train_sampler, drop_last=False,
                                  **loader_kwargs)
        val_batches = ShardedBatchSampler(len(dataset_val), args.batch_size, rank, world_size)
        loader_val = DataLoader(dataset_val, batch_sampler=val_batches,
                                **{k: v for k, v in loader_kwargs.items() if k != "batch_size"})
    else:
        loader_train = DataLoader(dataset_train, shuffle=True, drop_last=False, **loader_kwargs)
        loader_val = DataLoader(dataset_val, shuffle=False, **loader_kwargs)
    reduce = all_reduce_sum if distributed else None

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader_train)
    warmup_steps = int(args.warmup_epochs * len(loader_train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, warmup_steps))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    record = {"model": args.model, "model_kwargs": model_kwargs, "model_path": args.model_path,
              "weights": source,
              "data_set": args.data_set, "nb_classes": nb_classes,
              "input_size": args.input_size, "transform": transform, "epochs": args.epochs,
              "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "device": str(device),
              "best_acc1": None, "best_epoch": None, "history": [], "seconds": None}
    if distributed:
        record["world_size"] = world_size

    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on all processes
        train_stats = train_one_epoch(model, loader_train, criterion, optimizer, scheduler,
                                      device, epoch, args.epochs, reduce=reduce,
                                      show_progress=main_process)
        val_stats = evaluate(net, loader_val, criterion, device, reduce=reduce,
                             show_progress=main_process)
        # Plain CPU tensors with timm's keys: loadable anywhere with weights_only=True.
        state = ({"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
                 if main_process else None)
        if args.save_every_epoch and main_process:
            save_checkpoint(state, output_dir / f"{savename}_{epoch}.pth")
        improved = record["best_acc1"] is None or val_stats["acc1"] > record["best_acc1"]
        if improved:
            record["best_acc1"], record["best_epoch"] = val_stats["acc1"], epoch
            if main_process:
                save_checkpoint(state, output_dir / f"{savename}_best.pth")

        seconds = time.perf_counter() - epoch_start
        record["history"].append({"epoch": epoch, "train_loss": train_stats["loss"],
                                  "train_acc1": train_stats["acc1"],
                                  "val_loss": val_stats["loss"], "val_acc1": val_stats["acc1"],
                                  "seconds": round(seconds, 2)})
        record["seconds"] = round(time.perf_counter() - started, 2)
        if main_process:
            write_json(record, output_dir / f"{savename}_finetune.json")
        log(f"epoch {epoch}: train loss {train_stats['loss']:.4f}, "
            f"val loss {val_stats['loss']:.4f}, val acc1 {val_stats['acc1']:.2f}% "
            f"(best {record['best_acc1']:.2f}% at epoch {record['best_epoch']}), "
            f"{seconds:.1f}s" + (" *" if improved else ""))

    log(f"best val acc1 {record['best_acc1']:.2f}% -> "
        f"{output_dir / f'{savename}_best.pth'}")
    release_output_locks()
    return record


if __name__ == "__main__":
    run_cli(main, get_args_parser())
