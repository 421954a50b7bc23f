"""Where a CIFAR-subset training epoch's time goes: input pipeline vs model step.

Times, in one process and interleaved, ``--batches`` batches of batch 128 of
(a) the per-image PIL pipeline ``aanas.data`` used before (torchvision ``ImageFolder`` +
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``; PNG
decoding on every access), (b) the in-memory tensor path (decoded once, batched pad-crop + flip),
and (c) one SGD training step (forward + backward) of each ``--models`` entry. Prints ms per
batch and ratios; absolute figures depend on machine load (print ``uptime`` next to them).

    python benchmarks/cifar_data.py --data /work/shared/data/cifar10 --batches 20
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from aanas.data import build_data
from aanas.models import create_model


def _pil_loader(root: str, batch: int) -> Any:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ds = datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)


def _time_batches(it: Iterator[Any], n: int) -> float:
    """Mean seconds per batch to pull ``n`` batches."""
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n


def _step_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = create_model(name, num_classes=10, input_size=32).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("AANAS_CIFAR10", "../shared/data/cifar10"))
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["mnasnet_a1_100"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("load:", os.getloadavg())
    pil = iter(_pil_loader(args.data, 128))
    bundle = build_data(f"imagefolder:{args.data}", input_size=32, batch_size=128)
    fast = iter(bundle.train)
    x, y = next(fast)
    steps = {m: _step_fn(m) for m in args.models}
    for fn in steps.values():
        fn(x, y)  # warm-up
    per_epoch = len(bundle.train)
    times: dict[str, list[float]] = {"pil": [], "tensor": [], **{m: [] for m in steps}}
    for _ in range(2):  # interleaved rounds
        times["pil"].append(_time_batches(pil, args.batches))
        times["tensor"].append(_time_batches(fast, args.batches))
        for m, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(max(2, args.batches // 4)):
                fn(x, y)
            times[m].append((time.perf_counter() - t0) / max(2, args.batches // 4))
    best = {k: min(v) for k, v in times.items()}
    print(f"{'stage':<24}{'ms/batch':>10}{'s/epoch':>10}   ({per_epoch} batches of 128)")
    for k, v in best.items():
        print(f"{k:<24}{v * 1e3:>10.1f}{v * per_epoch:>10.1f}")
    print(f"ratio pil/tensor input: {best['pil'] / best['tensor']:.1f}x")
    for m in steps:
        print(
            f"share of input in an epoch of {m}: PIL {best['pil'] / (best['pil'] + best[m]):.0%}"
            f", tensor {best['tensor'] / (best['tensor'] + best[m]):.1%}"
        )
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
