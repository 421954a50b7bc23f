"""Tests of aanas.cost: three independent MAC counts agree, latency measurement and its cache,
the per-block latency table, and the ``aanas profile`` command."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aanas.cli import main
from aanas.cost import (
    LatencyTable,
    aa_conv_cost,
    count,
    count_module,
    count_spec,
    measure,
    measure_onnx,
    reference_macs,
)
from aanas.cost import latency as latency_mod
from aanas.models import create_model, get_spec, list_models
from aanas.ops.attention import AAConv2d
from aanas.space import SearchSpace
from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec

SPACES = sorted(Path(__file__).resolve().parents[1].glob("search_spaces/*.yaml"))
# Presets whose 224x224 forward is too slow for the default run are counted at 32x32 (the AA
# tables are sized for that input, as create_model(input_size=32) does); 64 and 224 in
# benchmarks/cost_table.py --check.
SMALL_SIZE = 32


def _small(spec: ArchSpec) -> ArchSpec:
    return dataclasses.replace(spec, input_size=min(spec.input_size, SMALL_SIZE)).validate()


def _three_counts(
    spec: ArchSpec, device: str = "meta"
) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """(analytical (params, MACs), thop (params, MACs), FlopCounterMode MACs, true params).

    Both hook-based counts need only shapes, so by default the model is built and run on the
    meta device (no weights allocated, no arithmetic): the sweep stays fast on small CPUs.
    """
    with torch.device(device):
        model = create_model(spec)
    a, t = count_spec(spec), count_module(model)
    n_params = sum(p.numel() for p in model.parameters())
    return (a.params, a.macs), (t.params, t.macs), reference_macs(model, spec.input_size), n_params


def _random_mnasnet(rng: np.random.Generator) -> ArchSpec:
    """A random valid MnasNet-style spec with attention on some low-resolution blocks."""
    size = int(rng.choice([32, 48, 64]))
    stages: list[tuple[BlockSpec, ...]] = [(BlockSpec("ds", 16, skip=False),)]
    res = size // 2
    for c in (24, 40, 64):
        stride = 2
        res = -(-res // stride)
        aa = None
        if res <= 8 and rng.random() < 0.6:
            aa = AASpec(
                kappa=float(rng.choice([0.1, 0.25, 0.5])),
                upsilon=float(rng.choice([0.1, 0.25])),
                heads=int(rng.choice([1, 2, 4])),
                relative=bool(rng.random() < 0.7),
            )
        stages.append(
            (
                BlockSpec(
                    "ir",
                    c,
                    repeats=int(rng.integers(1, 3)),
                    kernel=int(rng.choice([3, 5])),
                    stride=stride,
                    expansion=float(rng.choice([3, 6])),
                    se=float(rng.choice([0.0, 0.25])),
                    act=str(rng.choice(["relu", "swish"])),
                    aa=aa,
                ),
            )
        )
    return ArchSpec(
        family="mnasnet",
        stem=StemSpec("conv", 16, 3, 2),
        stages=tuple(stages),
        head_channels=int(rng.choice([0, 128])),
        num_classes=10,
        input_size=size,
        width=float(rng.choice([0.75, 1.0])),
    ).validate()


def _random_specs() -> list[tuple[str, ArchSpec]]:
    rng = np.random.default_rng(0)
    out = [(f"random{i}", _random_mnasnet(rng)) for i in range(4)]
    for path in SPACES:
        space = SearchSpace.from_yaml(path)
        out += [(f"{path.stem}{i}", _small(space.sample(rng))) for i in range(3)]
    return out


# --- MACs and params ---------------------------------------------------------------------------


def test_aaconv_macs_match_hand_formula() -> None:
    # Config 1: 32 -> 64 channels, 3x3, stride 1 on 8x8, dk = dv = 16, 4 heads, relative.
    # HW = 64, H = W = 8, conv branch 64 - 16 = 48 channels.
    conv = 64 * 48 * 32 * 9  # out positions * out channels * in channels * k*k
    qkv = 64 * 32 * (2 * 16 + 16)
    qk = 4 * 64 * 64 * (16 // 4)  # Nh * HW * HW * dkh
    av = 4 * 64 * 64 * (16 // 4)  # Nh * HW * HW * dvh
    rel = 4 * 64 * (8 + 8) * (16 // 4)  # Nh * HW * (H + W) * dkh
    out = 64 * 16 * 16
    macs1 = conv + qkv + qk + av + rel + out
    params1 = 48 * 32 * 9 + (32 * 48 + 48) + (16 * 16 + 16) + 2 * (2 * 8 - 1) * 4
    layer1 = AAConv2d(32, 64, 3, 1, dk=16, dv=16, num_heads=4, max_size=8, bias=False)
    # Config 2: depthwise 48 channels, 3x3 stride 2 on 14x14 -> 7x7 (attention on the pooled
    # map), dk = dv = 8, 2 heads, no relative logits. HW = 49; conv branch 48 - 8 = 40 channels.
    macs2 = 49 * 40 * 9 + 49 * 48 * (2 * 8 + 8) + 49 * 49 * 8 + 49 * 49 * 8 + 49 * 8 * 8
    params2 = 40 * 9 + (48 * 24 + 24) + (8 * 8 + 8)
    layer2 = AAConv2d(
        48,
        48,
        3,
        2,
        dk=8,
        dv=8,
        num_heads=2,
        relative=False,
        max_size=14,
        depthwise=True,
        bias=False,
    )
    for layer, size, out_size, macs, params in (
        (layer1, 8, 8, macs1, params1),
        (layer2, 14, 7, macs2, params2),
    ):
        assert macs == 1146880 if layer is layer1 else macs == 115640  # the arithmetic above
        wrapped = nn.Sequential(layer)  # thop hooks children, not the root module
        x = torch.randn(1, layer.in_channels, size, size)
        thop_cost = count_module(_Adapter(wrapped, layer.in_channels), size)
        assert (thop_cost.params, thop_cost.macs) == (params, macs)
        assert sum(p.numel() for p in layer.parameters()) == params
        analytical = aa_conv_cost(
            layer.in_channels,
            layer.out_channels,
            3,
            out_size,
            dk=layer.dk,
            dv=layer.dv,
            num_heads=layer.num_heads,
            relative=layer.relative,
            max_size=size,
            depthwise=layer.depthwise,
        )
        assert analytical == (params, macs)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            wrapped(x)
        assert fc.get_total_flops() == 2 * macs


class _Adapter(nn.Module):
    """Feeds count_module's (1, 3, S, S) input to a layer with other input channels."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.new_zeros(x.shape[0], self.channels, *x.shape[2:]))


def test_aaconv_without_attention_costs_a_plain_conv() -> None:
    aa = AAConv2d(24, 40, 5, 2, dk=0, dv=0, num_heads=1, max_size=16, bias=False)
    conv = nn.Conv2d(24, 40, 5, 2, padding=2, bias=False)
    a = count_module(_Adapter(nn.Sequential(aa), 24), 16)
    c = count_module(_Adapter(nn.Sequential(conv), 24), 16)
    assert (a.params, a.macs) == (c.params, c.macs) == (40 * 24 * 25, 8 * 8 * 40 * 24 * 25)
    assert aa_conv_cost(24, 40, 5, 8, dk=0, dv=0, num_heads=1, relative=True, max_size=16) == (
        c.params,
        c.macs,
    )


@pytest.mark.parametrize("name", list_models())
def test_preset_counts_agree(name: str) -> None:
    spec = _small(get_spec(name))
    analytical, thop_count, reference, n_params = _three_counts(spec)
    assert analytical == thop_count
    assert analytical[0] == n_params
    assert abs(reference - analytical[1]) <= 0.01 * analytical[1]


@pytest.mark.parametrize(("name", "device"), [("mnasnet_b1_100", "cpu"), ("aa_resnet50", "meta")])
def test_full_size_counts_agree(name: str, device: str) -> None:
    spec = get_spec(name)
    assert spec.input_size == 224
    analytical, thop_count, reference, n_params = _three_counts(spec, device)
    assert analytical == thop_count
    assert analytical[0] == n_params
    assert abs(reference - analytical[1]) <= 0.01 * analytical[1]


def test_known_numbers() -> None:
    # torchvision mnasnet1_0: 4,383,312 params, 0.31 GFLOPS (torchvision's MACs); ResNet-50:
    # 25,557,032 params, 4.09 GMACs (AA paper Table 2: 8.2 GFLOPs = 2 x MACs).
    b1, r50 = count("mnasnet_b1_100"), count("resnet50")
    assert b1.params == 4_383_312
    assert round(b1.macs / 1e9, 2) == 0.31
    assert r50.params == 25_557_032
    assert round(r50.flops / 1e9, 1) == 8.2
    assert r50.flops == 2 * r50.macs


@pytest.mark.parametrize(
    ("label", "spec"), _random_specs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_random_spec_counts_agree(label: str, spec: ArchSpec) -> None:
    analytical, thop_count, reference, n_params = _three_counts(spec)
    assert analytical == thop_count, label
    assert analytical[0] == n_params
    assert abs(reference - analytical[1]) <= 0.01 * analytical[1]


def test_count_breakdown_and_cache() -> None:
    spec = get_spec("aa_mnasnet_a1_100")
    cost = count_spec(spec)
    assert count_spec(spec) is cost  # lru_cache on the frozen spec
    assert sum(p for p, _ in cost.blocks.values()) == cost.params
    assert sum(m for _, m in cost.blocks.values()) == cost.macs
    assert {"stem", "head", "classifier", "stage3.block0.0"} <= set(cost.blocks)
    small = count("aa_mnasnet_a1_100", input_size=64)
    assert small == count_spec(dataclasses.replace(spec, input_size=64))
    assert small.macs < cost.macs
    with pytest.raises(ValueError, match="input_size"):
        count(nn.Conv2d(3, 8, 3))


# --- measured latency ---------------------------------------------------------------------------


@pytest.fixture
def timing_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the timing loop (each is one real measurement)."""
    calls: list[int] = []
    real = latency_mod._time_runs

    def counted(*args: object, **kwargs: object) -> list[float]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(latency_mod, "_time_runs", counted)
    return calls


def test_measure_positive_and_cached(tmp_path: Path, timing_calls: list[int]) -> None:
    threads = torch.get_num_threads()
    kw = {"repeats": 3, "warmup": 1, "cache_path": tmp_path}
    first = measure("test_aa_mnasnet", **kw)
    assert math.isfinite(first.median_ms) and first.median_ms > 0
    assert first.iqr_ms >= 0 and not first.cached
    assert torch.get_num_threads() == threads  # restored
    assert len(timing_calls) == 1
    second = measure("test_aa_mnasnet", **kw)
    assert second.cached and second.median_ms == first.median_ms
    assert len(timing_calls) == 1  # no second measurement
    measure("test_aa_mnasnet", threads=2, **kw)  # other settings: another key
    assert len(timing_calls) == 2
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert not _temp_leftovers(tmp_path)  # atomic writes leave no temp files
    assert all(p.suffix == ".json" for p in tmp_path.iterdir())  # nor anything else


def _temp_leftovers(folder: Path) -> list[Path]:
    """Temp files ``aanas._io.atomic_open`` would leave behind: ``.<name>.<random>.tmp``."""
    return sorted(folder.glob(".*.tmp"))


def test_leftover_check_sees_real_temp_files(tmp_path: Path) -> None:
    # The check above must be able to fail: while a write is in flight, its temp file is there.
    from aanas._io import atomic_open

    with atomic_open(tmp_path / "entry.json", "w", encoding="utf-8") as fh:
        fh.write("{}")
        assert [p.name.startswith(".entry.json.") for p in _temp_leftovers(tmp_path)] == [True]
    assert not _temp_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_cache_dir_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timing_calls: list[int]
) -> None:
    monkeypatch.setenv("AANAS_CACHE_DIR", str(tmp_path / "env"))
    measure(get_spec("test_aa_mnasnet"), repeats=2, warmup=0)
    assert len(list((tmp_path / "env").glob("*.json"))) == 1


def test_corrupt_cache_entry_is_remeasured(
    tmp_path: Path, timing_calls: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    kw = {"repeats": 2, "warmup": 0, "cache_path": tmp_path}
    measure("test_aa_mnasnet", **kw)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"key": {"spec": ', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="aanas.cost.latency"):
        again = measure("test_aa_mnasnet", **kw)
    assert "corrupt" in caplog.text
    assert not again.cached and len(timing_calls) == 2
    json.loads(entry.read_text(encoding="utf-8"))  # rewritten whole


def test_measure_onnxruntime(tmp_path: Path) -> None:
    res = measure("test_aa_mnasnet", backend="onnxruntime", repeats=3, warmup=1, cache=False)
    assert math.isfinite(res.median_ms) and res.median_ms > 0
    assert res.backend == "onnxruntime"


def test_measure_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="backend"):
        measure("test_aa_mnasnet", backend="tflite")
    with pytest.raises(ValueError, match="threads"):
        measure("test_aa_mnasnet", threads=0)


def test_measure_onnx_file_and_one_iqr_definition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """measure() and measure_onnx() summarise the same timings the same way (numpy percentiles).

    The timing loop is replaced by fixed times so the statistics can be checked by hand: for
    1..8 ms, the 25th/75th percentiles (linear interpolation) are 2.75 and 6.25, IQR 3.5.
    """
    from aanas.export import to_onnx

    model = create_model("test_aa_mnasnet")
    onnx_path = to_onnx(model, tmp_path / "m.onnx", check=False).path
    real = measure_onnx(onnx_path, repeats=3, warmup=1)  # really timed first
    assert math.isfinite(real.median_ms) and real.median_ms > 0 and not real.cached
    with pytest.raises(ValueError, match="repeats"):
        measure_onnx(onnx_path, repeats=0)
    seen: list[int] = []

    def fixed(
        run: Callable[[], object], repeats: int, warmup: int, *a: object, **k: object
    ) -> list[float]:
        run()  # the real model / session runs once, so a broken feed would still fail
        seen.append(repeats)
        return [ms / 1e3 for ms in range(1, 9)]

    monkeypatch.setattr(latency_mod, "_time_runs", fixed)
    by_torch = measure(model, cache=False)
    by_onnx = measure_onnx(onnx_path)
    for res in (by_torch, by_onnx):
        assert res.median_ms == pytest.approx(4.5) and res.iqr_ms == pytest.approx(3.5)
        assert res.min_ms == pytest.approx(1.0) and res.repeats == 8
    assert by_onnx.backend == "onnxruntime" and by_onnx.input_size == 32 and len(seen) == 2


def _cache_write_attempts(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = latency_mod._write_cache

    def counted(path: Path, *args: Any) -> None:
        calls.append(path)
        real(path, *args)

    monkeypatch.setattr(latency_mod, "_write_cache", counted)
    return calls


def test_unwritable_cache_warns_once_and_measures(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    timing_calls: list[int],
) -> None:
    """A cache that cannot be written is skipped with one warning; results still come back."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setattr(latency_mod, "_UNWRITABLE_CACHES", set())
    writes = _cache_write_attempts(monkeypatch)
    kw = {"repeats": 2, "warmup": 0, "cache_path": blocker / "cache"}
    with caplog.at_level(logging.WARNING, logger="aanas.cost.latency"):
        first = measure("test_aa_mnasnet", **kw)
        second = measure("test_aa_mnasnet", threads=2, **kw)  # another key, same folder
    assert first.median_ms > 0 and second.median_ms > 0 and not second.cached
    assert len(writes) == 2 and len(timing_calls) == 2  # both tried to write, both measured
    warnings = [r for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 1 and str(blocker / "cache") in warnings[0].getMessage()


def test_profile_with_read_only_cache(
    readonly_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """AANAS_CACHE_DIR on a read-only file system: `aanas profile` measures and exits 0."""
    monkeypatch.setenv("AANAS_CACHE_DIR", str(readonly_dir / "sub"))
    monkeypatch.setattr(latency_mod, "_UNWRITABLE_CACHES", set())
    with caplog.at_level(logging.WARNING, logger="aanas.cost.latency"):
        code = main(["profile", "test_aa_mnasnet", "--repeats", "2", "--warmup", "0"])
    assert code == 0
    assert "median" in capsys.readouterr().out
    assert "Read-only file system" in caplog.text and list((readonly_dir / "sub").iterdir()) == []


def test_build_lut_checks_out_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], timing_calls: list[int]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["profile", "--build-lut", "tiny", "--out", str(blocker / "lut.yaml"), "--samples", "2"]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err and timing_calls == []


# --- latency table -------------------------------------------------------------------------------


def test_latency_table_predicts_sum_plus_overhead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = get_spec("test_aa_mnasnet")
    table = LatencyTable.build([spec], repeats=2, warmup=0, fit_networks=1)
    parts = table.parts(spec)
    assert [name for name, _ in parts][0] == "stem" and parts[-1][0] == "head"
    assert len(parts) == 2 + len(spec.stages[0]) + 1 + 2  # stem, 4 blocks, head
    assert all(ms > 0 for _, ms in parts)
    assert table.predict(spec) == pytest.approx(sum(ms for _, ms in parts) + table.overhead_ms)
    table.save(tmp_path / "lut.yaml")
    loaded = LatencyTable.load(tmp_path / "lut.yaml")
    assert loaded is not None and loaded.entries == pytest.approx(table.entries)
    assert loaded.predict(spec) == pytest.approx(table.predict(spec), rel=1e-6)
    other = get_spec("test_resnet")
    assert table.missing(other)
    with pytest.raises(KeyError, match="no latency entry"):
        table.predict(other)
    # A table from another machine is refused with a warning.
    text = (tmp_path / "lut.yaml").read_text(encoding="utf-8")
    (tmp_path / "other.yaml").write_text(text.replace("torch: ", "torch: 0.0-"), "utf-8")
    with caplog.at_level(logging.WARNING, logger="aanas.cost.latency"):
        assert LatencyTable.load(tmp_path / "other.yaml") is None
    assert "not using it" in caplog.text


def test_latency_table_overhead_is_least_squares() -> None:
    spec = get_spec("test_aa_mnasnet")
    table = LatencyTable.build([spec], repeats=1, warmup=0, fit_networks=0)
    base = sum(ms for _, ms in table.parts(spec))
    assert table.fit_overhead([spec, spec], [base + 1.0, base + 3.0]) == pytest.approx(2.0)
    assert table.predict(spec) == pytest.approx(base + 2.0)
    other = get_spec("test_resnet")
    table.update([other], repeats=1, warmup=0)
    base2 = sum(ms for _, ms in table.parts(other))
    # measured = 0.8 * sum + 1.5 exactly: the two-parameter fit recovers it.
    c = table.fit_overhead([spec, other], [0.8 * base + 1.5, 0.8 * base2 + 1.5], fit_scale=True)
    assert (table.scale, c) == (pytest.approx(0.8), pytest.approx(1.5))
    assert table.predict(other) == pytest.approx(0.8 * base2 + 1.5)


# --- CLI -----------------------------------------------------------------------------------------


def test_profile_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AANAS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["profile", "test_aa_mnasnet", "--no-latency"]) == 0
    out = capsys.readouterr().out
    cost = count("test_aa_mnasnet")
    assert f"{cost.params:,}" in out and f"{cost.macs:,}" in out and "stage2.block0.1" in out
    lut = tmp_path / "lut.yaml"
    LatencyTable.build([get_spec("test_aa_mnasnet")], repeats=1, warmup=0).save(lut)
    args = ["profile", "test_aa_mnasnet", "--repeats", "2", "--warmup", "0", "--lut", str(lut)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "median" in out and "predicted" in out
    assert main(["profile", "no_such_model", "--no-latency"]) == 2
