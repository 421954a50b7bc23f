"""benchmarks/aa_core.py: one row per preset shape, both paths timed; argument errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "aa_core.py"
    spec = importlib.util.spec_from_file_location("aa_core_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prints_a_row_per_shape(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        bench.main(["--iters", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| AA-")]
    assert [row.split(" | ")[0][2:] for row in rows] == [s[0] for s in bench.SHAPES]
    for row in rows:
        assert re.search(r"\| \d+\.\d\dx \|$", row)


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--iters", "0"])
    assert "--threads and --iters must be >= 1, got 1, 0" in capsys.readouterr().err
