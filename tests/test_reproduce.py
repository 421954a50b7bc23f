"""`reproduce mobile`: a tiny real run writes the three-row table; paired test, matched width."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest

from aanas.cli import main
from aanas.reproduce import (
    MOBILE_PAIR_CIFAR,
    macs_matched_width,
    paired_t_test,
    reproduce_mobile,
)


def test_reproduce_mobile_smoke(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    result = reproduce_mobile(
        recipe="reproduce_mobile_cpu",
        overrides=[
            "max_train_batches=1",
            "batch_size=32",
            "bn_recalibrate_batches=1",
            "val_fraction=0",
        ],
        epochs=1,
        seeds=(0, 1),
        width=0.5,
        out=tmp_path,
        latency_backend="torch",
        latency_repeats=3,
        on_run=lambda name, seed, _m: seen.append((name, seed)),
    )
    base, aa, matched = result.rows
    # Same seeds for every model, baseline first within each seed.
    labels = [base.label, aa.label, matched.label]
    assert seen == [(n, s) for s in (0, 1) for n in labels]
    assert base.label == "MnasNet-A1-CIFAR (w0.5)" and aa.label == "AA-MnasNet-A1-CIFAR (w0.5)"
    assert matched.label == f"MnasNet-A1-CIFAR (w{matched.width:g}, MACs-matched)"
    assert (base.model, aa.model) == MOBILE_PAIR_CIFAR  # 32x32 input: the CIFAR-sized pair
    assert "aa" in aa.spec and "_aa" not in base.spec and "_aa" not in matched.spec
    for row in result.rows:
        assert row.params > 0 and row.macs > 0 and row.latency_ms > 0
        assert len(row.top1) == 2 and all(0.0 <= t <= 1.0 for t in row.top1)
        assert all(r["epochs"] == 1 for r in row.runs)
    assert aa.params > base.params and aa.macs > base.macs
    # matched: wider plain net within 1 % of the AA model's MACs, built and counted for real
    assert matched.width > 0.5 and abs(matched.macs / aa.macs - 1) < 0.01
    lines = result.table.splitlines()
    assert lines[2].startswith("| MnasNet-A1-CIFAR (w0.5) |")
    assert lines[3].startswith("| AA-MnasNet-A1-CIFAR (w0.5) |")
    assert lines[4].startswith("| MnasNet-A1-CIFAR (w0.5")
    assert "(n=2)" in lines[2] and "±" in lines[2]
    assert "paired t-test" in result.table
    assert (tmp_path / "reproduce.md").read_text().strip() == result.table.strip()
    data = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["model"] for r in data["rows"]] == [base.model, aa.model, base.model]
    assert data["seeds"] == [0, 1] and data["recipe"]["max_train_batches"] == 1
    assert math.isclose(data["rows"][1]["top1_mean_pct"], 50 * sum(aa.top1))
    cmp = data["comparisons"]
    assert [c["versus"] for c in cmp] == [base.label, matched.label]
    want = [100 * (x - y) for x, y in zip(aa.top1, base.top1, strict=True)]
    assert cmp[0]["delta_top1_pct"] == pytest.approx(want)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_paired_t_test_against_the_formula() -> None:
    a = [0.71, 0.69, 0.74, 0.70]
    b = [0.68, 0.69, 0.70, 0.66]
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    t_ref = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(n))
    test = paired_t_test(a, b)
    assert test is not None
    t, p = test
    assert t == pytest.approx(t_ref)
    # two-sided p from the t distribution with n - 1 = 3 dof, by numeric integration of its pdf
    dof = n - 1
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    steps, hi = 200_000, 200.0
    h = (hi - abs(t_ref)) / steps
    tail = sum(
        c * (1 + ((abs(t_ref) + (i + 0.5) * h) ** 2) / dof) ** (-(dof + 1) / 2) * h
        for i in range(steps)
    )
    assert p == pytest.approx(2 * tail, rel=1e-3)
    assert paired_t_test([0.5], [0.4]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_test([0.5, 0.6], [0.4])


def test_macs_matched_width_is_the_closest_step() -> None:
    from aanas.cost import count_spec
    from aanas.models import get_spec

    target = count_spec(get_spec("aa_mnasnet_a1_cifar_050")).macs
    w, macs = macs_matched_width(
        "mnasnet_a1_cifar_100", target, width=0.5, num_classes=10, input_size=32
    )
    spec = dataclasses.replace(get_spec("mnasnet_a1_cifar_100"), width=w)
    assert count_spec(spec).macs == macs and 0.5 < w < 0.6
    # no width on the 0.0025 grid between 0.5 and 0.6 is closer to the target
    for i in range(41):
        other = count_spec(dataclasses.replace(spec, width=0.5 + i * 0.0025)).macs
        assert abs(other - target) >= abs(macs - target)


def test_paper_columns_only_at_width_one(tmp_path: Path) -> None:
    """Paper numbers describe width 1.0; other widths print n/a (checked without training)."""
    from aanas.reproduce import PAPER_REFERENCE

    ref = PAPER_REFERENCE["mnasnet_a1_100"]
    assert ref["params_m"] == 3.9 and ref["top1"] == 75.2 and "1807.11626" in ref["source"]
    # Unverified values must stay None (printed as n/a), never guessed.
    assert PAPER_REFERENCE["aa_mnasnet_a1_100"]["top1"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "duplicates"),
        (["--width", "0"], "width"),
        (["--recipe", "no_such_recipe"], "no_such_recipe"),
    ],
)
def test_cli_rejects_bad_flags(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reproduce", "mobile", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_rerun_reads_finished_runs_back_and_trains_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed run resumes: finished runs are records on disk, reused only for the same recipe."""
    import aanas.train

    real_fit = aanas.train.fit
    trained: list[str] = []

    def counting_fit(model, data, recipe, **kw):  # type: ignore[no-untyped-def]
        trained.append(recipe.model)
        return real_fit(model, data, recipe, **kw)

    monkeypatch.setattr(aanas.train, "fit", counting_fit)
    tiny = ["max_train_batches=1", "batch_size=32", "bn_recalibrate_batches=0", "val_fraction=0"]

    def run(extra: list[str] = []) -> object:  # noqa: B006 (never mutated)
        return reproduce_mobile(
            overrides=[*tiny, *extra], epochs=1, seeds=(0,), out=tmp_path,
            latency_backend="torch", latency_repeats=2,
        )  # fmt: skip

    first = run()
    assert len(trained) == 3
    records = sorted(tmp_path.glob("runs/*/seed0.json"))
    assert len(records) == 3 and not list(tmp_path.glob("runs/*/.*.tmp"))
    # As after a kill during the third run: its record was never written.
    aa_record = next(p for p in records if p.parent.name.startswith("aa_"))
    aa_record.unlink()
    trained.clear()
    second = run()
    assert trained == [MOBILE_PAIR_CIFAR[1]]  # only the missing AA run trains again
    for a, b in zip(first.rows, second.rows, strict=True):  # type: ignore[attr-defined]
        if a.model != MOBILE_PAIR_CIFAR[1]:
            assert a.runs == b.runs  # read back exactly, training time included
    # A changed recipe field is another experiment: everything trains again.
    trained.clear()
    run(["lr=0.05"])
    assert len(trained) == 3
    # A corrupt record is ignored (and replaced), never trusted.
    records[0].write_text("{not json", encoding="utf-8")
    trained.clear()
    run(["lr=0.05"])
    assert len(trained) == 1
