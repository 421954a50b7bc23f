"""File input and output shared by every layer (L0): nothing computed is lost to bad paths.

- Atomic output: every file a run produces (checkpoints, trial tables, supernets, latency caches,
  ONNX files) is written to a temporary file in the destination folder, flushed to disk, then
  moved over the destination with :func:`os.replace`, which is atomic on POSIX and Windows: a
  reader, or a run killed at any instant, sees either the old file or the new one, never a mix.
- Output paths checked up front (:func:`check_writable_dir`, :func:`check_writable_file`): the
  CLI calls them before any work starts, so a wrong ``--out`` costs seconds, not a search.
- Checked loading of ``torch.save`` files (:func:`load_torch_file`): an empty, truncated or
  foreign file is one :class:`~aanas.errors.CheckpointError` naming the file, not a traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from aanas.errors import CheckpointError, OutputPathError

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_dir",
    "check_writable_file",
    "json_safe",
    "load_torch_file",
]


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it: NaN/inf become None (``json.dumps`` would write the
    non-standard ``NaN``), tuples become lists, mapping keys strings; recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    The parent folder is created if needed; on an exception the temporary file is removed and
    ``path`` is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results should be readable like logs
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --- output paths, checked before the work ------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``Path('.')`` at worst)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_write(folder: Path, field: str, path: Path) -> None:
    """Create and delete a temporary file in ``folder``: the one test that sees everything.

    ``os.access`` answers from permission bits only: it says yes to root on a read-only mount
    and cannot see quotas or a full disk; the write the run will do later can.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=".aanas-write-check-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(f"{field} {path}: cannot write in {folder} ({reason})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def check_writable_dir(path: str | os.PathLike[str], field: str) -> Path:
    """Raise :class:`~aanas.errors.OutputPathError` unless ``path`` can be a folder we write in.

    The folder may not exist yet (it is not created here); then its closest existing ancestor
    must be a folder we can write in. ``field`` names the option in the message (``"--out"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{field} {target}: exists and is not a folder")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise OutputPathError(f"{field} {target}: {existing} is a file, not a folder")
    _probe_write(existing, field, target)
    return target


def check_writable_file(path: str | os.PathLike[str], field: str) -> Path:
    """Raise :class:`~aanas.errors.OutputPathError` unless ``path`` can be (re)written as a file.

    :func:`atomic_open` writes a temporary file beside ``path`` and renames it, so what must be
    writable is the folder (or, if it does not exist yet, its closest existing ancestor).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{field} {target}: is a folder, expected a file name")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputPathError(f"{field} {target}: {existing} is a file, not a folder")
    _probe_write(existing, field, target)
    return target


# --- checked torch.load -------------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """First ``limit`` characters of an exception message, whitespace collapsed to one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_torch_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    ``torch.load`` reports a bad file as whatever its reader tripped on: ``EOFError`` (empty),
    ``RuntimeError`` (truncated zip), ``UnpicklingError`` or ``KeyError`` (text, another format).
    Each becomes a :class:`~aanas.errors.CheckpointError` that names the file and ``what`` it
    should have been. torch is imported here, not at the top: this module is L0 (no torch).

    Raises:
        CheckpointError: the file is missing, a folder, empty, truncated or not loadable.
    """
    import torch

    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"{what} {target}: file not found")
    if not target.is_file():
        raise CheckpointError(f"{what} {target}: not a file")
    if target.stat().st_size == 0:
        raise CheckpointError(f"{what} {target}: the file is empty")
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except (
        EOFError,
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        UnicodeDecodeError,
    ) as exc:
        raise CheckpointError(
            f"{what} {target}: not a readable torch.save file (truncated, corrupt or another "
            f"format): {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{what} {target}: cannot read ({exc.strerror or exc})") from None
