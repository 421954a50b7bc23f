"""Tests of aanas._io: output paths checked before the work, checked torch.load, and the CLI
commands that rely on them (one-line errors naming the option or file, exit code 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aanas._io import check_writable_dir, check_writable_file, load_torch_file
from aanas.cli import main
from aanas.errors import CheckpointError, OutputPathError

# --- output paths -------------------------------------------------------------------------------


def test_writable_dir_and_file_accept_new_paths_without_creating_them(tmp_path: Path) -> None:
    assert check_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert check_writable_file(tmp_path / "c" / "m.onnx", "--out") == tmp_path / "c" / "m.onnx"
    assert check_writable_dir(tmp_path, "--out") == tmp_path  # existing folder
    (tmp_path / "old.yaml").write_text("x")
    check_writable_file(tmp_path / "old.yaml", "--out")  # an existing file is replaced later
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.yaml"]  # nothing created/left


def test_wrong_kind_of_path(tmp_path: Path) -> None:
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=r"^--out .*plain_file: exists and is not a folder$"):
        check_writable_dir(blocker, "--out")
    with pytest.raises(OutputPathError, match=r"^--out .*: is a folder, expected a file name$"):
        check_writable_file(tmp_path, "--out")
    # A path whose parent is a regular file can never be created, by root either.
    with pytest.raises(OutputPathError, match="plain_file is a file, not a folder"):
        check_writable_dir(blocker / "run", "--out")
    with pytest.raises(OutputPathError, match="plain_file is a file, not a folder"):
        check_writable_file(blocker / "deeper" / "lut.yaml", "--out")


def test_read_only_file_system(readonly_dir: Path) -> None:
    for check, path in (
        (check_writable_dir, readonly_dir / "sub"),  # existing folder
        (check_writable_dir, readonly_dir / "new" / "run"),  # to be created
        (check_writable_file, readonly_dir / "file.txt"),  # existing file to replace
        (check_writable_file, readonly_dir / "m.onnx"),
    ):
        with pytest.raises(OutputPathError, match="Read-only file system") as err:
            check(path, "--out")
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- every writing command checks its --out before working -------------------------------------

_BLOCKER = "plain_file"  # a regular file inside tmp_path; {b} in argv is replaced by its path


@pytest.mark.parametrize(
    "argv",
    [
        # a folder is needed, a file exists there (or is the parent)
        ["search", "--out", "{b}", "--trials", "1"],
        ["train", "--recipe", "digits_tiny", "--out", "{b}"],
        ["reproduce", "mobile", "--out", "{b}/sub"],
        # a file is needed, a folder exists there (or the parent is a file)
        ["export", "--model", "test_aa_mnasnet", "--out", "{d}"],
        ["profile", "--build-lut", "tiny", "--out", "{d}"],
        ["profile", "--build-lut", "tiny", "--out", "{b}/lut.yaml"],
    ],
    ids=["search", "train", "reproduce", "export", "profile-dir", "profile-under-file"],
)
def test_cli_refuses_bad_out_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / _BLOCKER
    blocker.write_text("x")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    args = [a.replace("{b}", str(blocker)).replace("{d}", str(folder)) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aanas: error: --out ") and len(err.splitlines()) == 1, err
    # nothing was started: no run folder, no files beside the blocker and the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", _BLOCKER]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "--out", "{ro}/run", "--trials", "1"],
        ["train", "--recipe", "digits_tiny", "--out", "{ro}/sub"],
        ["reproduce", "mobile", "--out", "{ro}/rep"],
        ["export", "--model", "test_aa_mnasnet", "--out", "{ro}/m.onnx"],
        ["profile", "--build-lut", "tiny", "--out", "{ro}/lut.yaml"],
    ],
    ids=["search", "train", "reproduce", "export", "profile"],
)
def test_cli_refuses_read_only_out(
    argv: list[str], readonly_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{ro}", str(readonly_dir)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aanas: error: --out ") and "Read-only file system" in err, err
    assert len(err.splitlines()) == 1


# --- checked torch.load ---------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    files = {
        "empty": tmp_path / "empty.pt",
        "text": tmp_path / "notes.txt",
        "truncated": tmp_path / "truncated.pt",
        "random": tmp_path / "random.pt",
        "legacy-truncated": tmp_path / "legacy.pt",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("epoch 3: loss 0.12\nnot a checkpoint\n")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["random"].write_bytes(os.urandom(4096))
    legacy = tmp_path / "legacy_full.pt"  # the pre-zip pickle format, cut short
    torch.save({"w": torch.arange(1000.0)}, legacy, _use_new_zipfile_serialization=False)
    files["legacy-truncated"].write_bytes(legacy.read_bytes()[:200])
    return files


def test_load_torch_file_one_line_errors(tmp_path: Path) -> None:
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            load_torch_file(path, "checkpoint")
        message = str(err.value)
        assert message.startswith(f"checkpoint {path}: "), (kind, message)
        assert "\n" not in message and len(message) < 400, (kind, message)
    with pytest.raises(CheckpointError, match="file not found"):
        load_torch_file(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_torch_file(tmp_path)
    assert torch.equal(load_torch_file(tmp_path / "good.pt")["w"], torch.arange(1000.0))


def test_supernet_load_and_search_resume_with_corrupt_supernet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt run-dir supernet.pt: SuperNet.load and a resumed search fail with one line."""
    from aanas.space import SearchSpace
    from aanas.supernet import SuperNet

    supernet = SuperNet(SearchSpace.from_yaml("tiny"))
    for path in _bad_files(tmp_path).values():
        with pytest.raises(CheckpointError, match=f"^supernet checkpoint {path}: "):
            supernet.load(path)
    torch.save({"not": "a supernet"}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="not written by SuperNet.save"):
        supernet.load(tmp_path / "dict.pt")

    run = tmp_path / "run"
    run.mkdir()
    (run / "supernet.pt").write_bytes(b"")  # e.g. a disk that filled up under an older aanas
    argv = ["search", "--out", str(run), "--trials", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"aanas: error: supernet checkpoint {run / 'supernet.pt'}: the file is empty"
