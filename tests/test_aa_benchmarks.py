"""benchmarks/aa_overhead.py and benchmarks/aa_core.py: what they time and print, argument
errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn


def _bench(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
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
def test_overhead_turns_of_steps(block: int, expected: list[str]) -> None:
    bench = _bench("aa_overhead")
    log: list[str] = []
    models = [_Counted("p", log), _Counted("a", log)]
    medians = bench.bench_pair(
        models, torch.ones(1, 1, 2, 2), 1, 3, False, bench.time.perf_counter, block
    )
    assert log[:2] == ["p", "a"]  # warm-up
    assert log[2:] == expected
    assert len(medians) == 2 and all(m > 0 for m in medians)


def test_overhead_bad_block_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench("aa_overhead").main(["--block", "0"])
    assert "--block: must be at least 1, got 0" in capsys.readouterr().err


def test_core_prints_a_row_per_shape(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench("aa_core")
    threads = torch.get_num_threads()
    try:
        bench.main(["--iters", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's thread count
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| AA-")]
    assert [row.split(" | ")[0][2:] for row in rows] == [s[0] for s in bench.SHAPES]
    for row in rows:
        assert re.search(r"\| \d+\.\d\dx \|$", row)


def test_core_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _bench("aa_core").main(["--iters", "0"])
    assert "--threads and --iters must be >= 1, got 1, 0" in capsys.readouterr().err
