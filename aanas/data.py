"""Data sets, transforms and loaders (layer L1: knows nothing about models).

:func:`build_data` returns a :class:`DataBundle` with train/validation/test loaders. The
validation split is carved deterministically out of the *training* set (seeded
``torch.Generator``), or is an ImageFolder tree's own ``val/`` split, so a search selects on
validation accuracy and never sees the test set.
Every data set is delivered as 3-channel images normalised with its own mean/std, so the same
models (Bello et al., arXiv:1904.09925) run on all of them.

Accepted names:

- ``digits``: offline default. scikit-learn's copy of the UCI handwritten digits (1797 8x8
  grayscale images, shipped inside the scikit-learn package). Fixed stratified 80/20 train/test
  split (``random_state=0``, independent of the recipe seed, so the test set never moves),
  bilinear upsampling to ``input_size``, replicated to 3 channels, kept in memory.
- ``cifar10`` / ``cifar100``: ``torchvision.datasets`` under ``root`` (default
  ``~/.cache/aanas/data``); downloaded only with ``download=True``.
- ``imagefolder:PATH``: a torchvision ``ImageFolder`` tree with ``train/``, ``test/`` and
  optionally ``val/``. When ``val/`` exists it **is** the validation split (model selection and
  searches use it; all of ``train/`` is trained on) and ``val_fraction`` only switches
  validation on (> 0) or off (0). Small images (side <= 64) used at their native size are
  decoded once into a uint8 tensor per split, cached under ``root`` (default
  ``~/.cache/aanas/data/imagefolder/``, keyed by the file list, sizes and mtimes), and
  augmented on tensors a batch at a time; other trees go through per-image PIL transforms.

In-memory sets (``digits``, the two above, ``cifar10``/``cifar100`` at 32x32) ignore
``workers``: batched tensor augmentation costs about a millisecond per batch.

Shuffling uses ``DistributedSampler`` in all cases (``num_replicas=1`` without DDP): each epoch's
order is a function of ``(seed, epoch)`` only (call ``loader.sampler.set_epoch(epoch)``), which
makes resumed runs replay the same order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from aanas.config import TrainRecipe

__all__ = [
    "DataBundle",
    "build_data",
    "build_recipe_data",
    "canonical_data_name",
    "DATA_NAMES",
    "default_data_root",
]

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
    """Images (N, 3, S, S) kept in memory (uint8 0..255 or float 0..1); crop/flip, normalise.

    The DataLoader fetches a whole batch through ``__getitems__``, so the pad-crop + flip
    augmentation runs as a few batched tensor ops instead of per-image PIL transforms (on the
    CIFAR-10 subset that removes PNG decoding and PIL from every epoch:
    ``benchmarks/cifar_data.py``). Semantics match torchvision's ``RandomCrop(S, padding=p)``
    (zero fill, i.e. black before normalisation), ``RandomHorizontalFlip()``, ``ToTensor()`` and
    ``Normalize(mean, std)``.
    """

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
        # uint8 pixels are scaled by 1/255 as ToTensor does, folded into the normalisation.
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * scale
        self.std = torch.tensor(std).view(1, 3, 1, 1) * scale
        self.pad = pad
        self.flip = flip

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        """Random pad-crop and flip of a batch ``(B, 3, S, S)``, each image drawn on its own."""
        b, size = img.shape[0], img.shape[-1]
        if self.pad > 0:
            p = self.pad
            padded = F.pad(img, (p, p, p, p))  # (B, 3, S + 2p, S + 2p), zero = black
            top = torch.randint(0, 2 * p + 1, (b, 1, 1, 1))
            left = torch.randint(0, 2 * p + 1, (b, 1, 1, 1))
            ar = torch.arange(size)
            rows = (top + ar.view(1, 1, size, 1)).expand(b, 3, size, size + 2 * p)
            img = padded.gather(2, rows)  # (B, 3, S, S + 2p)
            cols = (left + ar.view(1, 1, 1, size)).expand(b, 3, size, size)
            img = img.gather(3, cols)  # (B, 3, S, S)
        if self.flip:
            mask = (torch.rand(b) < 0.5).view(b, 1, 1, 1)
            img = torch.where(mask, img.flip(-1), img)
        return img

    def _batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        img = self._augment(self.images[idx])
        x = (img.float() - self.mean) / self.std
        return x, self.labels[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self._batch([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (used by ``DataLoader``'s fetcher; see the class docstring)."""
        x, y = self._batch(indices)
        return list(zip(x.unbind(0), y.tolist(), strict=True))


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
    if input_size == 32:  # native size: the arrays are in memory already; augment on tensors
        train_raw = cls(str(root), train=True, download=download)
        test_raw = cls(str(root), train=False, download=download)
        tx = torch.from_numpy(train_raw.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        ty = torch.tensor(train_raw.targets, dtype=torch.int64)
        test_x = torch.from_numpy(test_raw.data).permute(0, 3, 1, 2).contiguous()
        test_t = _TensorImageDataset(
            test_x, torch.tensor(test_raw.targets, dtype=torch.int64), mean, std
        )
        pad = 4 if augment else 0
        return (
            _TensorImageDataset(tx, ty, mean, std, pad=pad, flip=augment),
            test_t,
            {
                "classes": tuple(train_raw.classes),
                "mean": mean,
                "std": std,
                "train_eval": _TensorImageDataset(tx, ty, mean, std),
            },
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


def _decoded_split(split: Path, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images uint8 (N, 3, S, S), labels int64 (N,))`` of one ImageFolder split, decoded once.

    The order and labels are torchvision ``ImageFolder``'s (same file list). The tensors are
    cached in ``cache_dir`` under a key hashing the split's resolved path and every file's
    relative path, size and mtime, so an edited tree is decoded again; the cache is written
    atomically. Returns None when the images are not all of one size (the PIL path handles
    those).
    """
    import hashlib

    import numpy as np
    from PIL import Image
    from torchvision import datasets

    from aanas._io import atomic_open

    folder = datasets.ImageFolder(str(split))
    digest = hashlib.sha256(str(split.resolve()).encode())
    for file, label in folder.samples:
        st = os.stat(file)
        digest.update(
            f"{os.path.relpath(file, split)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode()
        )
    cache = cache_dir / "imagefolder" / f"{split.name}-{digest.hexdigest()[:20]}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return blob["images"], blob["labels"]
        except Exception as exc:  # a truncated/foreign file: decode again and replace it
            _LOG.warning("imagefolder cache %s unreadable (%s); decoding again", cache, exc)
    _LOG.info("decoding %d images of %s once (cache: %s)", len(folder.samples), split, cache)
    arrays: list[Any] = []
    for file, _ in folder.samples:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8, as ImageFolder's loader
        if arrays and arr.shape != arrays[0].shape:
            _LOG.info("imagefolder %s: mixed image sizes; using per-image PIL transforms", split)
            return None
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
    try:
        with atomic_open(cache, "wb") as fh:
            torch.save({"images": images, "labels": labels}, fh)
    except OSError as exc:  # a read-only cache folder only costs the decoding next time
        _LOG.warning("could not write imagefolder cache %s: %s", cache, exc)
    return images, labels


def _imagefolder(
    path: Path, input_size: int, augment: bool, cache_dir: Path
) -> tuple[Dataset[Any], Dataset[Any], dict[str, Any]]:
    from PIL import Image
    from torchvision import datasets

    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder: path {path} does not exist or is not a folder")
    train_classes = _class_dirs(path / "train")
    splits = ["test", "val"] if (path / "val").is_dir() else ["test"]
    for other in splits:
        other_classes = _class_dirs(path / other)
        if train_classes != other_classes:
            only_train = sorted(set(train_classes) - set(other_classes))
            only_other = sorted(set(other_classes) - set(train_classes))
            raise ValueError(
                f"imagefolder: class folders differ between {path / 'train'} and "
                f"{path / other} (only in train: {only_train}, only in {other}: {only_other})"
            )
    train = datasets.ImageFolder(str(path / "train"))
    with Image.open(train.samples[0][0]) as img:  # native size decides the transform style
        native = max(img.size)
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    meta: dict[str, Any] = {"classes": tuple(train.classes), "mean": mean, "std": std}
    if native <= _SMALL_NATIVE_MAX and input_size == native:
        # Small images at their native size: decode each split once into a uint8 tensor
        # (cached on disk) and augment whole batches on tensors.
        maybe = {s: _decoded_split(path / s, cache_dir) for s in ["train", *splits]}
        decoded = {s: v for s, v in maybe.items() if v is not None}
        if len(decoded) == len(maybe):
            pad = max(1, input_size // 8) if augment else 0
            tx, ty = decoded["train"]
            sets = {s: _TensorImageDataset(x, y, mean, std) for s, (x, y) in decoded.items()}
            meta["train_eval"] = _TensorImageDataset(tx, ty, mean, std)
            if "val" in sets:
                meta["val"] = sets["val"]
            train_aug = _TensorImageDataset(tx, ty, mean, std, pad=pad, flip=augment)
            return train_aug, sets["test"], meta
    train_tf, eval_tf = _transforms(input_size, native, mean, std, augment=augment, flip=True)
    train.transform = train_tf
    train_eval = copy.copy(train)  # same file list, evaluation transform (for validation)
    train_eval.transform = eval_tf
    meta["train_eval"] = train_eval
    if "val" in splits:
        meta["val"] = datasets.ImageFolder(str(path / "val"), transform=eval_tf)
    test = datasets.ImageFolder(str(path / "test"), transform=eval_tf)
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


def canonical_data_name(name: str) -> str:
    """One spelling per data set, for keys of stored results: an ImageFolder path is made
    absolute and resolved (``imagefolder:../data`` -> ``imagefolder:/work/data``); other
    names, and anything unrecognised (the error is :func:`build_data`'s), stay as given."""
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return f"imagefolder:{Path(name[len('imagefolder:') :]).expanduser().resolve()}"
    return name


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
        root: download/cache folder for torchvision sets and decoded ImageFolder tensors
            (default :func:`default_data_root`).
        input_size: square side fed to the model; images are resized when it differs from the
            native size.
        batch_size: global batch size; with ``distributed=True`` each process loads
            ``batch_size // world_size`` (it must divide evenly).
        val_fraction: fraction of the training set held out for validation (0 = none); for
            an ImageFolder tree with a ``val/`` split, any value > 0 selects that split.
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

    base = Path(root).expanduser() if root is not None else default_data_root()
    if kind == "digits":
        train, test, meta = _digits(input_size, augment)
    elif kind in ("cifar10", "cifar100"):
        if download and world > 1:  # one rank downloads, the others wait and read its copy
            import torch.distributed as dist

            if rank == 0:
                _cifar(kind, base, input_size, augment, download=True)
            dist.barrier()
            download = False
        train, test, meta = _cifar(kind, base, input_size, augment, download)
    else:
        assert path is not None
        train, test, meta = _imagefolder(path, input_size, augment, base)

    n = len(train)  # type: ignore[arg-type]
    val_set: Dataset[Any] | None
    if "val" in meta and val_fraction > 0:
        # A tree with its own val/ split: train on all of train/, select on val/.
        train_set: Dataset[Any] = Subset(train, list(range(n)))
        val_set = meta["val"]
    else:
        n_val = int(round(n * val_fraction))
        if val_fraction > 0 and not 0 < n_val < n:
            raise ValueError(f"val_fraction {val_fraction} leaves an empty split of {n} images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        train_idx, val_idx = sorted(perm[n_val:]), sorted(perm[:n_val])
        train_set = Subset(train, train_idx)
        val_set = Subset(meta["train_eval"], val_idx) if n_val else None
    if isinstance(train, _TensorImageDataset) and workers:
        # In-memory tensors with batched augmentation (~1 ms per batch of 128 at 32x32): worker
        # processes would only add start-up and IPC and compete with training for the cores.
        _LOG.debug("data %s: in-memory tensors, ignoring workers=%d", name, workers)
        workers = 0

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


def build_recipe_data(recipe: TrainRecipe, *, distributed: bool = False) -> DataBundle:
    """The loaders ``recipe`` describes: every data field of a TrainRecipe, in one place.

    ``aanas train``, ``reproduce`` and the benchmarks all train from recipes; building the
    bundle here keeps a new data field (or its default) from reaching only some of them.
    """
    return build_data(
        recipe.data,
        root=recipe.data_root,
        input_size=recipe.input_size,
        batch_size=recipe.batch_size,
        val_fraction=recipe.val_fraction,
        seed=recipe.seed,
        download=recipe.download,
        workers=recipe.workers,
        pin_memory=recipe.pin_memory,
        augment=recipe.augment,
        distributed=distributed,
    )
