"""Run records: one identity per (recipe, spec), whatever the model's name or the path's spelling;
records survive NaN metrics and are never trusted when corrupt or from another run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from aanas.config import TrainRecipe
from aanas.data import canonical_data_name
from aanas.models import create_model
from aanas.run_record import (
    find_run_record,
    partial_run,
    read_run_record,
    recall_or_train,
    run_identity,
    write_run_record,
)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An (empty) ImageFolder root at tmp_path/data, with the working directory beside it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "data"


def test_identity_is_what_decides_the_result(tree: Path) -> None:
    spec = create_model("mnasnet_a1_cifar_050", num_classes=10, input_size=32).spec.encode()
    by_name = TrainRecipe(model="mnasnet_a1_cifar_050", data=f"imagefolder:{tree}", seed=1)
    same = [
        dataclasses.replace(by_name, model=spec),  # the spec string instead of the name
        dataclasses.replace(by_name, data="imagefolder:../data"),  # relative spelling
        dataclasses.replace(by_name, data="imagefolder:../work/../data/"),
    ]
    ident = run_identity(by_name, spec)
    assert all(run_identity(r, spec) == ident for r in same)
    different = [
        (dataclasses.replace(by_name, seed=2), spec),
        (dataclasses.replace(by_name, lr=by_name.lr / 2), spec),
        (dataclasses.replace(by_name, data="cifar10"), spec),
        (by_name, create_model("mnasnet_a1_cifar_075", num_classes=10).spec.encode()),
    ]
    idents = {run_identity(r, s) for r, s in different}
    assert ident not in idents and len(idents) == len(different)


def test_canonical_data_name() -> None:
    assert canonical_data_name("cifar10") == "cifar10"
    assert canonical_data_name("digits") == "digits"
    home = canonical_data_name("imagefolder:~/x")
    assert home == f"imagefolder:{Path('~/x').expanduser().resolve()}" and "~" not in home
    assert canonical_data_name("no_such_set") == "no_such_set"  # build_data names the error


def test_write_read_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "m" / "seed0.json"
    stored = write_run_record(path, "abc", {"test_top1": 0.5, "val_loss": math.nan, "x": (1, 2)})
    assert stored == {"test_top1": 0.5, "val_loss": None, "x": [1, 2]}
    assert json.loads(path.read_text())["identity"] == "abc"  # strict JSON: no NaN token
    assert read_run_record(path, "abc") == stored
    assert read_run_record(path, "other") is None  # another recipe or spec
    assert read_run_record(tmp_path / "missing.json", "abc") is None
    path.write_text('{"identity": "abc", "test_top1"', encoding="utf-8")  # truncated
    assert read_run_record(path, "abc") is None
    path.write_text("[1, 2]", encoding="utf-8")  # valid JSON, not a record
    assert read_run_record(path, "abc") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_find_looks_under_every_root_and_skips_other_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_run_record(a / "x" / "seed0.json", "other", {"test_top1": 0.1})
    (a / "y").mkdir()
    (a / "y" / "seed0.json").write_text("{corrupt", encoding="utf-8")
    write_run_record(b / "deep" / "er" / "seed0.json", "want", {"test_top1": 0.7})
    write_run_record(b / "z" / "seed1.json", "want", {"test_top1": 0.9})  # another seed's name
    found = find_run_record([a, b, tmp_path / "absent"], "want", "seed0.json")
    assert found is not None
    assert found[0] == b / "deep" / "er" / "seed0.json" and found[1] == {"test_top1": 0.7}
    assert find_run_record([a], "want", "seed0.json") is None


def test_partial_run_belongs_to_one_identity_and_goes_with_the_record(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "m" / "seed0.json"
    work, resume = partial_run(path, "a")
    assert work == path.with_name("seed0.partial") and work.is_dir() and resume is None
    (work / "last.pt").write_bytes(b"epoch 3")  # what fit(out_dir=work) leaves after a kill
    assert partial_run(path, "a") == (work, work / "last.pt")
    assert partial_run(path, "b") == (work, None)  # another recipe's checkpoint: not resumed
    assert not (work / "last.pt").exists()
    (work / "last.pt").write_bytes(b"epoch 12")
    record = write_run_record(path, "b", {"test_top1": 0.5, "checkpoint": str(work / "last.pt")})
    assert record["checkpoint"] is None and not work.exists()  # recorded: checkpoints go
    assert read_run_record(path, "b") == record


def test_recall_or_train_trains_once_and_resumes_a_killed_run(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "m" / "seed0.json"
    calls: list[Path | None] = []

    def killed(work: Path, resume: Path | None) -> dict[str, float]:
        calls.append(resume)
        (work / "last.pt").write_bytes(b"epoch 2")
        raise KeyboardInterrupt

    def finishing(work: Path, resume: Path | None) -> dict[str, float]:
        calls.append(resume)
        return {"test_top1": 0.7}

    with pytest.raises(KeyboardInterrupt):
        recall_or_train(path, "a", killed)
    work = path.with_name("seed0.partial")
    assert recall_or_train(path, "a", finishing) == ({"test_top1": 0.7}, "trained")
    assert calls == [None, work / "last.pt"] and not work.exists()
    assert recall_or_train(path, "a", killed) == ({"test_top1": 0.7}, "recorded")
    # another folder reuses the run instead of training it (copied, with where it came from)
    copy = tmp_path / "other" / "runs" / "m" / "seed0.json"
    record, how = recall_or_train(copy, "a", killed, reuse=[tmp_path / "runs"])
    assert how.startswith("reused from") and record["test_top1"] == 0.7 and len(calls) == 2
    assert read_run_record(copy, "a") == record
