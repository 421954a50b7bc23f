"""Supernet ranking quality: Kendall tau of inherited vs standalone accuracy.

Trains the weight-sharing supernet of a search space (default ``tiny``), samples N
architectures, evaluates each with inherited weights after BN recalibration, trains each from
scratch with the same short recipe, and reports Kendall's tau between the two accuracy lists
with the time of every step.

    python benchmarks/supernet_ranking.py --data imagefolder:../shared/data/cifar10 --quick
    AANAS_CIFAR10=/path/to/cifar10 python benchmarks/supernet_ranking.py

``--data`` defaults to ``imagefolder:$AANAS_CIFAR10`` when that variable is set, else the
embedded offline ``digits`` set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aanas.data import build_data
from aanas.space import SearchSpace
from aanas.supernet import SuperNet, recalibrate_bn, train_supernet
from aanas.train import evaluate


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties handled as scipy does); uses scipy when installed."""
    try:
        from scipy.stats import kendalltau

        return float(kendalltau(a, b).statistic)
    except ImportError:
        n = len(a)
        conc = disc = ties_a = ties_b = 0
        for i in range(n):
            for j in range(i + 1, n):
                da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
                if da == 0 and db == 0:
                    continue
                if da == 0:
                    ties_a += 1
                elif db == 0:
                    ties_b += 1
                elif da == db:
                    conc += 1
                else:
                    disc += 1
        denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
        return (conc - disc) / denom if denom else float("nan")


def train_standalone(
    model: nn.Module, loader: Any, *, epochs: int, lr: float, seed: int, max_batches: int | None
) -> None:
    """The supernet's recipe on one fixed architecture: SGD (Nesterov 0.9) + cosine."""
    torch.manual_seed(seed)
    steps = epochs * min(len(loader), max_batches or len(loader))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps)))
    )
    model.train()
    for _ in range(epochs):
        for step, (x, y) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()


def main() -> None:
    """Run the benchmark and print one JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get("AANAS_CIFAR10")
    parser.add_argument("--data", default=f"imagefolder:{env}" if env else "digits")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--archs", type=int, default=12)
    parser.add_argument("--supernet-epochs", type=int, default=30)
    parser.add_argument("--standalone-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rule", default="sandwich", choices=("sandwich", "uniform"))
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--recal-batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--supernet", help="load this trained supernet, or save it here")
    parser.add_argument("--quick", action="store_true", help="tiny budget: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.supernet_epochs, args.standalone_epochs = 4, 2
        args.max_batches = args.max_batches or 40
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    space = SearchSpace.from_yaml(args.space)
    data = build_data(
        args.data,
        input_size=space.base.input_size,
        batch_size=args.batch_size,
        val_fraction=0.1,
        seed=args.seed,
    )
    assert data.val is not None
    if data.num_classes != space.base.num_classes:
        raise SystemExit(f"data has {data.num_classes} classes, space {space.base.num_classes}")
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    supernet = SuperNet(space)
    if args.supernet and os.path.isfile(args.supernet):
        supernet.load(args.supernet)
        log: dict[str, Any] = {"epochs": [{"train_loss": float("nan")}], "loaded": True}
    else:
        log = train_supernet(
            supernet,
            data,
            epochs=args.supernet_epochs,
            lr=args.lr,
            rule=args.rule,
            seed=args.seed,
            max_batches=args.max_batches,
            on_epoch=lambda e, m: print(f"supernet epoch {e}: {m}", flush=True),
        )
        if args.supernet:
            supernet.save(args.supernet)
    times["supernet_train"] = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed + 1)
    specs: list[Any] = []
    while len(specs) < args.archs:  # distinct architectures
        spec = space.sample(rng)
        if spec not in specs:
            specs.append(spec)
    inherited, standalone = [], []
    t_inh = t_std = 0.0
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        sub = recalibrate_bn(supernet.extract(spec), data.train, batches=args.recal_batches)
        inherited.append(evaluate(sub, data.val, "cpu")["top1"])
        t_inh += time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        from aanas.models import create_model

        model = create_model(spec)
        train_standalone(
            model,
            data.train,
            epochs=args.standalone_epochs,
            lr=args.lr,
            seed=args.seed,
            max_batches=args.max_batches,
        )
        # Same BN treatment as the inherited subnets: MnasNet's TF-style BN momentum (3e-4)
        # leaves running statistics near their initial values after a short run.
        recalibrate_bn(model, data.train, batches=args.recal_batches)
        standalone.append(evaluate(model, data.val, "cpu")["top1"])
        t_std += time.perf_counter() - t0
        print(
            f"arch {i}: inherited {inherited[-1]:.4f} standalone {standalone[-1]:.4f} "
            f"{spec.encode()}",
            flush=True,
        )
    times["inherited_eval"] = t_inh
    times["standalone_train"] = t_std
    summary = {
        "space": space.name,
        "data": args.data,
        "rule": args.rule,
        "archs": len(specs),
        "supernet_epochs": args.supernet_epochs,
        "standalone_epochs": args.standalone_epochs,
        "max_batches": args.max_batches,
        "final_supernet_loss": log["epochs"][-1]["train_loss"],
        "kendall_tau": kendall_tau(inherited, standalone),
        "inherited": inherited,
        "standalone": standalone,
        "seconds": times,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
