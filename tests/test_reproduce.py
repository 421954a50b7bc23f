"""`reproduce mobile` smoke test: a tiny real run of the pair writes a two-row table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aanas.cli import main
from aanas.reproduce import reproduce_mobile


def test_reproduce_mobile_smoke(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    result = reproduce_mobile(
        recipe="reproduce_mobile_cpu",
        overrides=["max_train_batches=2", "batch_size=32", "bn_recalibrate_batches=1"],
        epochs=1,
        seeds=(0, 1),
        width=0.5,
        out=tmp_path,
        latency_backend="torch",
        latency_repeats=3,
        on_run=lambda name, seed, _m: seen.append((name, seed)),
    )
    # Same seeds for both models, baseline first within each seed.
    assert seen == [
        ("mnasnet_a1_100", 0),
        ("aa_mnasnet_a1_100", 0),
        ("mnasnet_a1_100", 1),
        ("aa_mnasnet_a1_100", 1),
    ]
    base, aa = result.rows
    assert base.label == "MnasNet-A1 (w0.5)" and aa.label == "AA-MnasNet-A1 (w0.5)"
    assert "aa" in aa.spec and "_aa" not in base.spec  # only the second row has attention
    for row in result.rows:
        assert row.params > 0 and row.macs > 0 and row.latency_ms > 0
        assert len(row.top1) == 2 and all(0.0 <= t <= 1.0 for t in row.top1)
        assert all(r["epochs"] == 1 for r in row.runs)
    assert aa.params > base.params and aa.macs > base.macs
    lines = result.table.splitlines()
    assert lines[2].startswith("| MnasNet-A1 (w0.5) |")
    assert lines[3].startswith("| AA-MnasNet-A1 (w0.5) |")
    assert "(n=2)" in lines[2] and "±" in lines[2]
    assert (tmp_path / "reproduce.md").read_text().strip() == result.table.strip()
    data = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["mnasnet_a1_100", "aa_mnasnet_a1_100"]
    assert data["seeds"] == [0, 1] and data["recipe"]["max_train_batches"] == 2
    assert math.isclose(data["rows"][1]["top1_mean_pct"], 50 * sum(aa.top1))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


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
