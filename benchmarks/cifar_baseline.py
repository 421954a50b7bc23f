"""The plain-CNN baseline of issue 13 on the CIFAR-10 subset, beside the CIFAR MnasNet recipes.

The CNN (2 x conv32, pool, 2 x conv64, pool, conv128, pool, conv128, global pool, linear; 3x3
conv + BN + ReLU) is defined here, not registered in ``aanas.models``: the registry maps names to
``ArchSpec`` data that the builder, the analytical cost model, the supernet and export all
understand, and this net is no MnasNet/ResNet spec. ``aanas.train.fit`` trains any classifier,
so the CNN and the registered models go through the same trainer, data and test split.

Baseline recipe (the issue's): SGD Nesterov (momentum 0.9), one-cycle schedule peaking at lr 0.1,
pad-4 crop + flip, label smoothing 0.1, 8 epochs, batch 128, weight decay 5e-4 (not stated in
the issue; the common CIFAR value). The other models train with ``--recipe`` (default
``cifar10_subset_mnasnet_a1``, its ``model`` replaced). All run one after another in ONE
process, so a time ratio against the CNN is meaningful even on a loaded machine; the load
average is printed with every row.

    python benchmarks/cifar_baseline.py --data /work/shared/data/cifar10
    python benchmarks/cifar_baseline.py --models cnn --epochs 8        # the baseline alone
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from aanas.config import TrainRecipe, load_recipe
from aanas.cost import count_module, count_spec
from aanas.data import build_recipe_data
from aanas.models import create_model
from aanas.train import fit, seed_everything

__all__ = ["PlainCNN", "baseline_recipe"]


def _conv(cin: int, cout: int) -> list[nn.Module]:
    """3x3 conv (no bias: BN follows) + BN + ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class PlainCNN(nn.Sequential):
    """The issue's 8-layer CNN: 0.29M parameters, about 31M MACs at 32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            *_conv(3, 32),
            *_conv(32, 32),
            nn.MaxPool2d(2),  # 16x16
            *_conv(32, 64),
            *_conv(64, 64),
            nn.MaxPool2d(2),  # 8x8
            *_conv(64, 128),
            nn.MaxPool2d(2),  # 4x4
            *_conv(128, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, num_classes),
        )


def baseline_recipe(data: str, epochs: int = 8, seed: int = 0) -> TrainRecipe:
    """The issue's CNN recipe as a TrainRecipe (see the module docstring)."""
    return TrainRecipe(
        model="plain_cnn",
        data=data,
        input_size=32,
        val_fraction=0.1,  # any value > 0 selects the subset's own val/ split
        augment=True,
        epochs=epochs,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        wd_exclude_bn_bias=True,
        schedule="onecycle",
        label_smoothing=0.1,
        bn_momentum=0.1,
        channels_last=True,  # the CNN's fastest CPU layout too (0.154 vs 0.200 s per step)
        seed=seed,
    )


def _run(name: str, recipe: TrainRecipe) -> dict[str, Any]:
    seed_everything(recipe.seed)
    data = build_recipe_data(recipe)
    if name == "cnn":
        model: nn.Module = PlainCNN(data.num_classes)
        cost = count_module(model, 32)
    else:
        model = create_model(name, num_classes=data.num_classes, input_size=32)
        cost = count_spec(model.spec)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    metrics = fit(model, data, recipe, progress=False)
    return {
        "model": name,
        "seed": recipe.seed,
        "params_m": cost.params / 1e6,
        "macs_m": cost.macs / 1e6,
        "val_top1": metrics.get("val_top1"),
        "test_top1": metrics["test_top1"],
        "time_s": time.perf_counter() - t0,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("AANAS_CIFAR10", "../shared/data/cifar10"))
    ap.add_argument(
        "--models", nargs="+", default=["cnn", "mnasnet_a1_cifar_050", "aa_mnasnet_a1_cifar_050"]
    )
    ap.add_argument("--recipe", default="cifar10_subset_mnasnet_a1")
    ap.add_argument("--epochs", type=int, default=0, help="override every recipe's epochs")
    ap.add_argument("--max-train-batches", type=int, default=0, help="cap steps per epoch")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = f"imagefolder:{args.data}"
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.models:
            if name == "cnn":
                recipe = baseline_recipe(data, seed=seed)
            else:
                recipe = dataclasses.replace(
                    load_recipe(args.recipe), model=name, data=data, seed=seed
                )
            if args.epochs:
                recipe = dataclasses.replace(recipe, epochs=args.epochs)
            if args.max_train_batches:
                recipe = dataclasses.replace(recipe, max_train_batches=args.max_train_batches)
            row = _run(name, recipe)
            rows.append(row)
            print(
                f"{name:<26} seed {seed}  {row['params_m']:.3f}M {row['macs_m']:.1f}M MACs  "
                f"val {row['val_top1']:.2%}  test {row['test_top1']:.2%}  "
                f"{row['time_s'] / 60:.1f} min  (load {row['load']:.1f})",
                flush=True,
            )
    cnn_time = (
        statistics.mean(r["time_s"] for r in rows if r["model"] == "cnn")
        if any(r["model"] == "cnn" for r in rows)
        else None
    )
    print(f"\n{'model':<26}{'test top-1 (mean +- std)':>26}{'time ratio vs cnn':>20}")
    for name in args.models:
        mine = [r for r in rows if r["model"] == name]
        tops = [100 * r["test_top1"] for r in mine]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        ratio = statistics.mean(r["time_s"] for r in mine) / cnn_time if cnn_time else float("nan")
        print(f"{name:<26}{statistics.mean(tops):>18.2f} +- {std:.2f}{ratio:>20.2f}")


if __name__ == "__main__":
    main()
