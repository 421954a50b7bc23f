"""Data sets, transforms and loaders (layer L1: knows nothing about models).

:func:`build_data` returns a :class:`DataBundle` with train/validation/test loaders. The
validation split is carved deterministically out of the *training* set (seeded
``torch.Generator``), so a search selects on validation accuracy and never sees the test set.
Every data set is delivered as 3-channel images normalised with its own mean/std, so the same
models (Bello et al., arXiv:1904.09925) run on all of them.

Accepted names:

- ``digits``: offline default. scikit-learn's copy of the UCI handwritten digits (1797 8x8
  grayscale images, shipped inside the scikit-learn package). Fixed stratified 80/20 train/test
  split (``random_state=0``, independent of the recipe seed, so the test set never moves),
  bilinear upsampling to ``input_size``, replicated to 3 channels, kept in memory.
- ``cifar10`` / ``cifar100``: ``torchvision.datasets`` under ``root`` (default
  ``~/.cache/aanas/data``); downloaded only with ``download=True``.
- ``imagefolder:PATH``: a torchvision ``ImageFolder`` tree with ``train/`` and ``test/``.

Shuffling uses ``DistributedSampler`` in all cases (``num_replicas=1`` without DDP): each epoch's
order is a function of ``(seed, epoch)`` only (call ``loader.sampler.set_epoch(epoch)``), which
makes resumed runs replay the same order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

__all__ = ["DataBundle", "build_data", "DATA_NAMES", "default_data_root"]

_LOG = logging.getLogger(__name__)

DATA_NAMES = ("digits", "cifar10", "cifar100", "imagefolder:PATH")

# Channel statistics of the training sets (computed over all training pixels, [0, 1] scale).
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# ImageNet statistics (torchvision reference scripts) for arbitrary ImageFolder trees: cheap and
# close enough for natural images; a custom tree with very different statistics still trains.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Up to this native side, images are "small" (CIFAR style: pad + random crop); above it they are
# "ImageNet style" (RandomResizedCrop for training, resize to size/0.875 + centre crop for eval).
_SMALL_NATIVE_MAX = 64
_EVAL_CROP_FRACTION = 0.875  # 224 / 256, the standard ImageNet evaluation crop


@dataclasses.dataclass(frozen=True, eq=False)
class DataBundle:
    """Loaders and metadata of one data set; ``val`` is None when ``val_fraction == 0``."""

    name: str
    train: DataLoader[Any]
    val: DataLoader[Any] | None
    test: DataLoader[Any]
    num_classes: int
    in_channels: int  # always 3: grayscale sets are replicated so every model fits every set
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]


def default_data_root() -> Path:
    """Per-user download cache (never an absolute path baked into recipes)."""
    return Path("~/.cache/aanas/data").expanduser()


# --- in-memory tensor data set (digits) -----------------------------------------------------


class _TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images (N, 3, S, S) in [0, 1] kept in memory; crop/flip then normalise per sample."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.pad = pad
        self.flip = flip

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]  # (3, S, S)
        if self.pad > 0:
            size = img.shape[-1]
            padded = F.pad(img, (self.pad,) * 4)  # (3, S + 2p, S + 2p), zero = background
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = padded[:, top : top + size, left : left + size]
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img - self.mean) / self.std, int(self.labels[index])


def _digits(input_size: int, augment: bool) -> tuple[Dataset[Any], Dataset[Any], dict[str, Any]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    # Fixed stratified 80/20 split: the test set is the same for every recipe seed.
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=0.2, random_state=0, stratify=bunch.target
    )
    images = F.interpolate(images, size=(input_size, input_size), mode="bilinear")
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    train_x, test_x = images[idx_train], images[idx_test]
    m = float(train_x.mean())
    s = float(train_x.std())
    mean, std = (m, m, m), (s, s, s)
    pad = max(1, input_size // 8) if augment else 0  # 4 px at 32, as the CIFAR recipe
    # No horizontal flip: a mirrored digit is a different (or no) digit.
    train = _TensorImageDataset(train_x, labels[idx_train], mean, std, pad=pad, flip=False)
    train_eval = _TensorImageDataset(train_x, labels[idx_train], mean, std)
    test = _TensorImageDataset(test_x, labels[idx_test], mean, std)
    meta = {
        "classes": tuple(str(c) for c in bunch.target_names),
        "mean": mean,
        "std": std,
        "train_eval": train_eval,
    }
    return train, test, meta


# --- torchvision data sets ------------------------------------------------------------------


def _transforms(
    input_size: int,
    native: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool,
    flip: bool,
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """(train, eval) torchvision transforms for PIL images of native side ``native``."""
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    flips = [T.RandomHorizontalFlip()] if augment and flip else []
    if native <= _SMALL_NATIVE_MAX:
        resize = [T.Resize(input_size)] if input_size != native else []
        crop = [T.RandomCrop(input_size, padding=max(1, input_size // 8))] if augment else []
        return (
            T.Compose([*resize, *crop, *flips, *normalize]),
            T.Compose([*resize, *normalize]),
        )
    if augment:
        train: list[Any] = [T.RandomResizedCrop(input_size), *flips]
    else:
        train = [T.Resize(input_size), T.CenterCrop(input_size)]
    evaluate = [T.Resize(round(input_size / _EVAL_CROP_FRACTION)), T.CenterCrop(input_size)]
    return T.Compose([*train, *normalize]), T.Compose([*evaluate, *normalize])


def _cifar(
    name: str, root: Path, input_size: int, augment: bool, download: bool
) -> tuple[Dataset[Any], Dataset[Any], dict[str, Any]]:
    from torchvision import datasets

    if name == "cifar10":
        cls, folder, mean, std = (
            datasets.CIFAR10,
            "cifar-10-batches-py",
            _CIFAR10_MEAN,
            _CIFAR10_STD,
        )
    else:
        cls, folder, mean, std = (
            datasets.CIFAR100,
            "cifar-100-python",
            _CIFAR100_MEAN,
            _CIFAR100_STD,
        )
    if not download and not (root / folder).is_dir():
        raise FileNotFoundError(
            f"{name} not found under {root}; download it with `--set download=true` "
            f"(or `download: true` in the recipe), or point `data_root` at an existing copy"
        )
    train_tf, eval_tf = _transforms(input_size, 32, mean, std, augment=augment, flip=True)
    train = cls(str(root), train=True, transform=train_tf, download=download)
    train_eval = cls(str(root), train=True, transform=eval_tf, download=False)
    test = cls(str(root), train=False, transform=eval_tf, download=download)
    meta = {"classes": tuple(train.classes), "mean": mean, "std": std, "train_eval": train_eval}
    return train, test, meta


def _class_dirs(split: Path) -> list[str]:
    """Sorted class folder names of ``split``; raise on a missing split or empty class."""
    if not split.is_dir():
        raise FileNotFoundError(f"imagefolder: missing split folder {split}")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class folders in {split}")
    for c in classes:
        folder = split / c
        if not any(f.suffix.lower() in _IMG_EXTENSIONS for f in folder.rglob("*") if f.is_file()):
            raise FileNotFoundError(f"imagefolder: class folder {folder} contains no images")
    return classes


def _imagefolder(
    path: Path, input_size: int, augment: bool
) -> tuple[Dataset[Any], Dataset[Any], dict[str, Any]]:
    from PIL import Image
    from torchvision import datasets

    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder: path {path} does not exist or is not a folder")
    train_classes = _class_dirs(path / "train")
    test_classes = _class_dirs(path / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise ValueError(
            f"imagefolder: class folders differ between {path / 'train'} and {path / 'test'} "
            f"(only in train: {only_train}, only in test: {only_test})"
        )
    train = datasets.ImageFolder(str(path / "train"))
    with Image.open(train.samples[0][0]) as img:  # native size decides the transform style
        native = max(img.size)
    train_tf, eval_tf = _transforms(
        input_size, native, _IMAGENET_MEAN, _IMAGENET_STD, augment=augment, flip=True
    )
    train.transform = train_tf
    train_eval = copy.copy(train)  # same file list, evaluation transform (for validation)
    train_eval.transform = eval_tf
    test = datasets.ImageFolder(str(path / "test"), transform=eval_tf)
    meta = {
        "classes": tuple(train.classes),
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
        "train_eval": train_eval,
    }
    return train, test, meta


# --- samplers and loaders -------------------------------------------------------------------


class _ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: exact, unpadded evaluation shards.

    ``DistributedSampler`` pads with duplicates to equal shard sizes, which would bias
    all-reduced evaluation metrics; uneven shards are fine for evaluation.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _dist_info(distributed: bool) -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


def _parse_name(name: str) -> tuple[str, Path | None]:
    if name in ("digits", "cifar10", "cifar100"):
        return name, None
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return "imagefolder", Path(name[len("imagefolder:") :]).expanduser()
    raise ValueError(f"unknown data set {name!r}; accepted: {', '.join(DATA_NAMES)}")


def build_data(
    name: str,
    *,
    root: str | Path | None = None,
    input_size: int,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    augment: bool = True,
    distributed: bool = False,
) -> DataBundle:
    """Build train/validation/test loaders for data set ``name``.

    Args:
        name: ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH``.
        root: download/cache folder for torchvision sets (default :func:`default_data_root`).
        input_size: square side fed to the model; images are resized when it differs from the
            native size.
        batch_size: global batch size; with ``distributed=True`` each process loads
            ``batch_size // world_size`` (it must divide evenly).
        val_fraction: fraction of the training set held out for validation (0 = none).
        seed: seeds the train/validation split and the per-epoch shuffling.
        download: allow torchvision to download ``cifar10``/``cifar100``.
        workers: DataLoader worker processes.
        pin_memory: page-locked host memory (CUDA only).
        augment: random crop with padding (ImageNet style: random resized crop) and, except for
            ``digits``, horizontal flips.
        distributed: shard training (``DistributedSampler``) and evaluation data over the
            ranks of the initialised process group.
    """
    kind, path = _parse_name(name)
    if input_size < 1 or batch_size < 1:
        raise ValueError(f"input_size and batch_size must be >= 1, got {input_size}, {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    rank, world = _dist_info(distributed)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {world}")
    per_rank = batch_size // world

    if kind == "digits":
        train, test, meta = _digits(input_size, augment)
    elif kind in ("cifar10", "cifar100"):
        base = Path(root).expanduser() if root is not None else default_data_root()
        if download and world > 1:  # one rank downloads, the others wait and read its copy
            import torch.distributed as dist

            if rank == 0:
                _cifar(kind, base, input_size, augment, download=True)
            dist.barrier()
            download = False
        train, test, meta = _cifar(kind, base, input_size, augment, download)
    else:
        assert path is not None
        train, test, meta = _imagefolder(path, input_size, augment)

    n = len(train)  # type: ignore[arg-type]
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and not 0 < n_val < n:
        raise ValueError(f"val_fraction {val_fraction} leaves an empty split of {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx, val_idx = sorted(perm[n_val:]), sorted(perm[:n_val])
    train_set: Dataset[Any] = Subset(train, train_idx)
    val_set: Dataset[Any] | None = Subset(meta["train_eval"], val_idx) if n_val else None

    # The same sampler class with and without DDP: order depends only on (seed, epoch).
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    train_loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        # Drop a ragged last batch (a 1-sample batch breaks BatchNorm) unless it is all we have.
        drop_last=len(sampler) > per_rank,
        **common,
    )

    def _eval_loader(ds: Dataset[Any]) -> DataLoader[Any]:
        shard = _ShardSampler(len(ds), rank, world)  # type: ignore[arg-type]
        return DataLoader(ds, batch_size=per_rank, sampler=shard, **common)

    bundle = DataBundle(
        name=name,
        train=train_loader,
        val=_eval_loader(val_set) if val_set is not None else None,
        test=_eval_loader(test),
        num_classes=len(meta["classes"]),
        in_channels=3,
        input_size=input_size,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        classes=meta["classes"],
    )
    _LOG.debug(
        "data %s: %d train, %d val, %d test, %d classes",
        name,
        len(train_set),  # type: ignore[arg-type]
        len(val_set) if val_set is not None else 0,  # type: ignore[arg-type]
        len(test),  # type: ignore[arg-type]
        bundle.num_classes,
    )
    return bundle
