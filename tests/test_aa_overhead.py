"""benchmarks/aa_overhead.py: the turn order of the timed steps and argument errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "aa_overhead.py"
    spec = importlib.util.spec_from_file_location("aa_overhead_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Counted(nn.Module):
    """Records the order in which the benchmark runs each model's steps."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return x * self.weight


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (1, ["p", "a"] * 3),  # alternated, every step timed
        (2, ["p"] * 3 + ["a"] * 3 + ["p"] * 3 + ["a"] * 3),  # an untimed step, then two timed
    ],
)
def test_turns_of_steps(block: int, expected: list[str]) -> None:
    bench = _bench()
    log: list[str] = []
    models = [_Counted("p", log), _Counted("a", log)]
    medians = bench.bench_pair(
        models, torch.ones(1, 1, 2, 2), 1, 3, False, bench.time.perf_counter, block
    )
    assert log[:2] == ["p", "a"]  # warm-up
    assert log[2:] == expected
    assert len(medians) == 2 and all(m > 0 for m in medians)


def test_bad_block_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--block", "0"])
    assert "--block: must be at least 1, got 0" in capsys.readouterr().err
