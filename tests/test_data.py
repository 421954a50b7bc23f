"""Tests for aanas.data: embedded digits, ImageFolder trees (and their errors), splits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from aanas.data import DataBundle, build_data

_REPO = Path(__file__).resolve().parents[1]
# Real CIFAR-10 images (1000/class train, 200/class test, 32x32 PNG) in ImageFolder layout;
# read in place, never copied into the repo.
CIFAR10_SUBSET = Path(os.environ.get("AANAS_CIFAR10", _REPO.parent / "shared" / "data" / "cifar10"))
needs_cifar10 = pytest.mark.skipif(
    not (CIFAR10_SUBSET / "train").is_dir(),
    reason=f"CIFAR-10 subset not found at {CIFAR10_SUBSET} (set AANAS_CIFAR10=PATH)",
)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_data("digits", input_size=32, batch_size=64, augment=False)


def _val_indices(bundle: DataBundle) -> list[int]:
    assert bundle.val is not None
    return list(bundle.val.dataset.indices)  # type: ignore[attr-defined]


def _make_tree(root: Path, classes: dict[str, dict[str, int]], size: int = 8) -> Path:
    """root/<split>/<class>/<i>.png with n images per (split, class)."""
    for split, counts in classes.items():
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                color = (i * 40 % 256, len(cls) * 30 % 256, 128)
                Image.new("RGB", (size, size), color).save(folder / f"{i}.png")
    return root


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_and_metadata(digits: DataBundle) -> None:
    x, y = next(iter(digits.train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert digits.num_classes == 10 and digits.in_channels == 3
    assert digits.classes == tuple(str(i) for i in range(10))
    # fixed stratified 80/20 split of 1797 images; 10% of the 1437 training images for validation
    n_train = len(digits.train.dataset)  # type: ignore[arg-type]
    assert digits.val is not None
    assert (n_train, len(digits.val.dataset), len(digits.test.dataset)) == (1293, 144, 360)  # type: ignore[arg-type]
    # normalised with the training statistics
    assert abs(float(x.mean())) < 0.3 and 0.6 < float(x.std()) < 1.4
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale replicated to 3 channels


def test_digits_split_is_deterministic(digits: DataBundle) -> None:
    again = build_data("digits", input_size=16, batch_size=32, augment=False)
    other = build_data("digits", input_size=16, batch_size=32, augment=False, seed=1)
    assert _val_indices(again) == _val_indices(digits)
    assert _val_indices(other) != _val_indices(digits)
    assert not set(_val_indices(digits)) & set(digits.train.dataset.indices)  # type: ignore[attr-defined]
    # the test split never depends on the recipe seed
    ya = torch.cat([y for _, y in digits.test])
    yb = torch.cat([y for _, y in other.test])
    assert torch.equal(ya, yb)


def test_shuffle_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        b = build_data("digits", input_size=8, batch_size=16, augment=False, seed=seed)
        b.train.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return list(b.train.sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 0)
    assert order(0, 1) != order(1, 1)


def test_digits_augment_crops_without_flip() -> None:
    bundle = build_data("digits", input_size=16, batch_size=8, val_fraction=0.0)
    assert bundle.val is None
    ds = bundle.train.dataset.dataset  # type: ignore[attr-defined]
    assert ds.pad == 2 and ds.flip is False  # digits: random crop with padding, never flipped
    torch.manual_seed(0)
    views = {tuple(ds[0][0].flatten().tolist()) for _ in range(10)}
    assert len(views) > 1


def test_unknown_name_lists_accepted_forms() -> None:
    with pytest.raises(ValueError, match="imagefolder:PATH"):
        build_data("mnist", input_size=32, batch_size=8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        build_data("digits", input_size=8, batch_size=8, val_fraction=1.0)
    with pytest.raises(ValueError, match="process group"):
        build_data("digits", input_size=8, batch_size=8, distributed=True)


def test_cifar_not_downloaded_says_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=true"):
        build_data("cifar10", root=tmp_path, input_size=32, batch_size=8)


# --- imagefolder ------------------------------------------------------------------------------


def test_imagefolder_small_tree(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "t", {"train": {"a": 6, "b": 4}, "test": {"a": 2, "b": 2}})
    b = build_data(f"imagefolder:{root}", input_size=16, batch_size=4, val_fraction=0.2)
    assert b.classes == ("a", "b") and b.num_classes == 2
    assert (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset)) == (8, 2, 4)  # type: ignore[arg-type, union-attr]
    x, _ = next(iter(b.train))
    assert x.shape == (4, 3, 16, 16)  # resized from the native 8x8
    x, _ = next(iter(b.test))
    assert x.shape == (4, 3, 16, 16)


def test_imagefolder_imagenet_style_transforms(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "t", {"train": {"a": 2}, "test": {"a": 1}}, size=80)
    b = build_data(f"imagefolder:{root}", input_size=24, batch_size=2, val_fraction=0.0)
    assert next(iter(b.train))[0].shape == (2, 3, 24, 24)  # random resized crop
    assert next(iter(b.test))[0].shape == (1, 3, 24, 24)  # resize + centre crop


def test_imagefolder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_data(f"imagefolder:{tmp_path / 'nowhere'}", input_size=8, batch_size=2)


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "t", {"train": {"a": 2}})
    with pytest.raises(FileNotFoundError, match="test"):
        build_data(f"imagefolder:{root}", input_size=8, batch_size=2)


def test_imagefolder_empty_class(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "t", {"train": {"a": 2}, "test": {"a": 1}})
    (root / "train" / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train[/\\]b"):
        build_data(f"imagefolder:{root}", input_size=8, batch_size=2)


def test_imagefolder_mismatched_classes(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "t", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})
    with pytest.raises(ValueError, match=r"only in train: \['b'\], only in test: \['c'\]"):
        build_data(f"imagefolder:{root}", input_size=8, batch_size=2)


@needs_cifar10
def test_shared_cifar10_subset() -> None:
    b = build_data(f"imagefolder:{CIFAR10_SUBSET}", input_size=32, batch_size=50, seed=0)
    assert b.num_classes == 10 and b.classes[0] == "airplane" and b.classes[-1] == "truck"
    assert b.val is not None
    sizes = (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset))  # type: ignore[arg-type]
    assert sizes == (10000, 10000, 2000)  # its own val/ split, all of train/ for training
    x, y = next(iter(b.train))
    assert x.shape == (50, 3, 32, 32) and int(y.max()) < 10
    # the decoded tensors are torchvision ImageFolder's images and labels, same order
    for split, loader in (("test", b.test), ("val", b.val)):
        ref = _torchvision_reference(CIFAR10_SUBSET / split, b.mean, b.std)
        x, y = next(iter(loader))
        idx = list(range(len(y)))
        if split == "val":  # also a few from the end of the file list
            idx = [0, 1, len(ref) - 1]
            x = torch.stack([loader.dataset[i][0] for i in idx])
            y = torch.tensor([loader.dataset[i][1] for i in idx])
        want = [ref[i] for i in idx]
        assert torch.allclose(x, torch.stack([w[0] for w in want]), atol=1e-5)
        assert y.tolist() == [w[1] for w in want]


# --- in-memory ImageFolder tensors ----------------------------------------------------------------


def _torchvision_reference(split: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    from torchvision import datasets
    from torchvision import transforms as T

    return datasets.ImageFolder(str(split), T.Compose([T.ToTensor(), T.Normalize(mean, std)]))


def _noise_tree(root: Path, counts: dict[str, int], size: int = 8, classes: int = 3) -> Path:
    """root/<split>/c<k>/<i>.png with random RGB pixels (every crop/flip is distinguishable)."""
    gen = torch.Generator().manual_seed(0)
    for split, n in counts.items():
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(px.numpy()).save(folder / f"{i}.png")
    return root


def test_imagefolder_tensors_match_torchvision(tmp_path: Path) -> None:
    root = _noise_tree(tmp_path / "t", {"train": 4, "test": 2})
    b = build_data(
        f"imagefolder:{root}", root=tmp_path / "cache", input_size=8, batch_size=5, augment=False
    )
    ref = _torchvision_reference(root / "test", b.mean, b.std)
    xs, ys = zip(*b.test, strict=True)
    assert torch.allclose(torch.cat(xs), torch.stack([r[0] for r in ref]), atol=1e-5)
    assert torch.cat(ys).tolist() == [r[1] for r in ref]
    assert list((tmp_path / "cache" / "imagefolder").glob("test-*.pt"))  # cached, off-package


def test_imagefolder_tensor_augment_is_pad_crop_and_flip(tmp_path: Path) -> None:
    root = _noise_tree(tmp_path / "t", {"train": 4, "test": 1})
    b = build_data(
        f"imagefolder:{root}", root=tmp_path / "c", input_size=8, batch_size=12, val_fraction=0.0
    )
    ref = _torchvision_reference(root / "train", b.mean, b.std)
    black = -torch.tensor(b.mean).view(3, 1, 1) / torch.tensor(b.std).view(3, 1, 1)
    torch.manual_seed(0)
    seen_flip = seen_shift = False
    for _ in range(3):
        ds = b.train.dataset
        idx = list(range(12))
        batch = ds.__getitems__(idx)  # type: ignore[attr-defined]
        for i, (x, y) in zip(idx, batch, strict=True):
            img, label = ref[i]
            assert y == label
            # torchvision RandomCrop(8, padding=1): zero (black) fill, then optional flip
            padded = black.expand(3, 10, 10).clone()
            padded[:, 1:9, 1:9] = img
            windows = {
                (t, left, f): (
                    padded[:, t : t + 8, left : left + 8].flip(-1)
                    if f
                    else padded[:, t : t + 8, left : left + 8]
                )
                for t in range(3)
                for left in range(3)
                for f in (False, True)
            }
            match = [k for k, w in windows.items() if torch.allclose(w, x, atol=1e-5)]
            assert match, f"image {i} is no pad-crop/flip of the original"
            seen_flip |= any(k[2] for k in match)
            seen_shift |= any(k[:2] != (1, 1) for k in match)
    assert seen_flip and seen_shift  # each image draws its own crop and flip


def test_imagefolder_val_split_and_cache_key(tmp_path: Path) -> None:
    root = _noise_tree(tmp_path / "t", {"train": 4, "val": 3, "test": 2})
    cache = tmp_path / "cache"
    b = build_data(f"imagefolder:{root}", root=cache, input_size=8, batch_size=4, val_fraction=0.5)
    assert b.val is not None
    sizes = (len(b.train.dataset), len(b.val.dataset), len(b.test.dataset))  # type: ignore[arg-type]
    assert sizes == (12, 9, 6)  # val/ replaces carving val_fraction out of train/
    ref = _torchvision_reference(root / "val", b.mean, b.std)
    assert torch.cat([y for _, y in b.val]).tolist() == [r[1] for r in ref]
    none = build_data(f"imagefolder:{root}", root=cache, input_size=8, batch_size=4, val_fraction=0)
    assert none.val is None and len(none.train.dataset) == 12  # type: ignore[arg-type]
    # an edited image gets a new cache entry and its new pixels
    before = set((cache / "imagefolder").glob("val-*.pt"))
    assert len(before) == 1
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "val" / "c0" / "0.png")
    os.utime(root / "val" / "c0" / "0.png", ns=(1, 1))
    again = build_data(f"imagefolder:{root}", root=cache, input_size=8, batch_size=4)
    assert len(set((cache / "imagefolder").glob("val-*.pt"))) == 2
    assert again.val is not None
    x0 = again.val.dataset[0][0]  # type: ignore[index]
    assert torch.allclose(x0, _torchvision_reference(root / "val", b.mean, b.std)[0][0], atol=1e-5)


def test_imagefolder_val_classes_checked(tmp_path: Path) -> None:
    root = _noise_tree(tmp_path / "t", {"train": 2, "val": 1, "test": 1})
    (root / "val" / "c2").rename(root / "val" / "c9")
    with pytest.raises(ValueError, match=r"only in val: \['c9'\]"):
        build_data(f"imagefolder:{root}", root=tmp_path / "c", input_size=8, batch_size=2)
