"""Shared fixtures: a ``tiny`` spec (timm's test-arch idea: 3 stages, 16-32 channels, 32x32) and
a folder on a read-only file system."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec


@pytest.fixture
def tiny() -> ArchSpec:
    """MnasNet-family spec with attention (2 heads) on the last stage's 4x4 maps."""
    return ArchSpec(
        family="mnasnet",
        stem=StemSpec("conv", 16, kernel=3, stride=2),
        stages=(
            (BlockSpec("ds", 16, kernel=3, stride=1),),
            (BlockSpec("ir", 24, kernel=3, stride=2, expansion=3.0, se=0.25),),
            (
                BlockSpec(
                    "ir",
                    32,
                    repeats=2,
                    kernel=3,
                    stride=2,
                    expansion=3.0,
                    aa=AASpec(kappa=0.25, upsilon=0.25, heads=2),
                ),
            ),
        ),
        head_channels=64,
        num_classes=10,
        input_size=32,
    ).validate()


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a real read-only file system (a tmpfs remounted ``ro``), holding an empty
    folder ``sub`` and a file ``file.txt``.

    Tests run as root, so ``chmod`` would not stop a write; a read-only mount stops root too.
    Skips where mounting is not permitted (no CAP_SYS_ADMIN, not Linux).
    """
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]
    try:
        subprocess.run(mount, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here to make a read-only folder: {exc}")
    try:
        (mnt / "sub").mkdir()
        (mnt / "file.txt").write_text("x\n")
        remount = ["mount", "-o", "remount,ro", str(mnt)]
        subprocess.run(remount, check=True, capture_output=True, timeout=30)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=30)
