"""Records of finished training runs, keyed by what decides their result.

A CIFAR training run costs minutes of CPU, and the same (architecture, recipe, seed) is trained
by more than one command: ``aanas reproduce mobile`` trains MnasNet-A1 and AA-MnasNet-A1 with
the CPU recipe, and ``benchmarks/search_vs_hand.py`` trains the same two as hand baselines.
Each finished run is written once, atomically, as ``<folder>/seed<k>.json``: its metrics plus
an ``identity``, a hash of the full recipe (seed and data included) and the spec string. A
record is reused only under the same identity, so changing any recipe field, the data, the seed
or the architecture trains again, and a killed command resumes after its last finished run.

What the identity leaves out, because it does not change the result: the recipe's ``model``
field (a registered name such as ``mnasnet_a1_cifar_050`` and the spec string it resolves to
build the same network; the spec, hashed separately, decides) and how an ImageFolder path is
spelled (``imagefolder:../data`` and ``imagefolder:/work/data`` name the same images).

Layer: beside ``train`` (uses ``config``, ``data``, ``_io``); used by ``reproduce`` and the
benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aanas._io import atomic_write_text, json_safe
from aanas.config import TrainRecipe, recipe_to_dict
from aanas.data import canonical_data_name

__all__ = [
    "find_run_record",
    "partial_run",
    "read_run_record",
    "recall_or_train",
    "recorded_run",
    "run_identity",
    "write_run_record",
]

_LOG = logging.getLogger(__name__)


def run_identity(recipe: TrainRecipe, spec: str) -> str:
    """20 hex digits of the SHA-256 of the recipe (model name dropped, data path resolved)
    and ``spec``, the encoded architecture that was trained."""
    fields = recipe_to_dict(
        dataclasses.replace(recipe, model="", data=canonical_data_name(recipe.data))
    )
    blob = json.dumps({"recipe": fields, "spec": spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_run_record(path: Path, identity: str) -> dict[str, Any] | None:
    """The stored metrics of a finished run, without the identity.

    None when there is no file, it is unreadable or it belongs to another recipe/spec (logged):
    the caller trains that run again and overwrites the record.
    """
    stored = _load(path, identity)
    if stored is None and path.is_file():
        _LOG.info("%s is unreadable or from another recipe or spec; training again", path)
    return stored


def partial_run(path: Path, identity: str) -> tuple[Path, Path | None]:
    """Where the run to be recorded at ``path`` keeps its checkpoints while it trains, and the
    checkpoint to continue from (None: start afresh).

    Pass them to :func:`aanas.train.fit` as ``out_dir`` and ``resume``: it writes ``last.pt``
    after every epoch, so a command killed in the middle of a run continues that run from its
    last finished epoch instead of from scratch. The folder (``seed<k>.partial/`` beside the
    record) belongs to one identity: one left by another recipe or spec is emptied first.
    :func:`write_run_record` removes it once the run is recorded.
    """
    work = _partial_dir(path)
    tag = work / "identity"
    if work.is_dir() and (not tag.is_file() or tag.read_text(encoding="utf-8") != identity):
        _LOG.info("%s holds another run's checkpoints; starting this run afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tag, identity)
    last = work / "last.pt"
    return work, (last if last.is_file() else None)


def write_run_record(path: Path, identity: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write ``metrics`` under ``identity`` atomically; returns them as stored (NaN/inf become
    None, so strict JSON), which is what a later :func:`read_run_record` gives back. The run's
    :func:`partial_run` checkpoints are removed (the record no longer points at them)."""
    work = _partial_dir(path)
    if str(metrics.get("checkpoint") or "").startswith(str(work)):
        metrics = {**metrics, "checkpoint": None}
    record: dict[str, Any] = json_safe(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"identity": identity, **record}, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return record


def _partial_dir(path: Path) -> Path:
    return path.with_name(path.stem + ".partial")


def find_run_record(
    roots: Iterable[Path], identity: str, name: str
) -> tuple[Path, dict[str, Any]] | None:
    """The first record called ``name`` (e.g. ``seed0.json``) anywhere under ``roots`` whose
    identity matches: how one command reuses another's runs without knowing its folder layout.
    """
    for root in roots:
        for path in sorted(Path(root).rglob(name)):
            record = _load(path, identity)  # quietly: most records are other runs'
            if record is not None:
                return path, record
    return None


def recorded_run(
    path: Path, identity: str, reuse: Iterable[Path] = ()
) -> tuple[dict[str, Any], str] | None:
    """The run recorded at ``path``, else one with ``identity`` under ``path``'s runs folder's
    parent or ``reuse`` (copied to ``path`` with ``reused_from``, so the folder stays complete);
    (record, how it was found), or None when the run has to be trained."""
    record = read_run_record(path, identity)
    if record is not None:
        return record, "recorded"
    found = find_run_record([path.parent.parent, *reuse], identity, path.name)
    if found is None:
        return None
    source, record = found
    return write_run_record(path, identity, {**record, "reused_from": str(source)}), (
        f"reused from {source}"
    )


def recall_or_train(
    path: Path,
    identity: str,
    train: Callable[[Path, Path | None], dict[str, Any]],
    reuse: Iterable[Path] = (),
) -> tuple[dict[str, Any], str]:
    """The run's record: read back (:func:`recorded_run`) or trained now and written.

    ``train(work_dir, resume)`` gets :func:`partial_run`'s checkpoint folder and checkpoint,
    so a run killed mid-way continues from its last epoch, and returns the metrics to record.
    Returns (record as stored, how it was found: ``"trained"`` when it was).
    """
    found = recorded_run(path, identity, reuse)
    if found is not None:
        return found
    work, resume = partial_run(path, identity)
    return write_run_record(path, identity, train(work, resume)), "trained"


def _load(path: Path, identity: str) -> dict[str, Any] | None:
    """The record at ``path`` without its identity, if it is readable and has ``identity``."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.pop("identity", None) != identity:
        return None
    return stored
