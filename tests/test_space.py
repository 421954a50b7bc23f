"""Tests for aanas.space (YAML search spaces) and aanas.search.adapters (Optuna / Ray)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from aanas import spec as spec_mod
from aanas.errors import SpaceError
from aanas.search.adapters import (
    active_params,
    ray_config_to_spec,
    ray_define_by_run,
    ray_param_space,
    suggest,
    suggest_params,
)
from aanas.space import Categorical, Condition, IntRange, SearchSpace

SHIPPED = ("tiny", "aa_mnasnet", "aa_resnet")


@pytest.fixture(scope="module")
def spaces() -> dict[str, SearchSpace]:
    return {name: SearchSpace.from_yaml(name) for name in SHIPPED}


@pytest.fixture(scope="module")
def tiny(spaces: dict[str, SearchSpace]) -> SearchSpace:
    return spaces["tiny"]


def _enumerate(space: SearchSpace) -> Iterator[dict[str, Any]]:
    """Every valid parameter dict, by walking the conditional parameters depth-first."""

    def walk(params: dict[str, Any], i: int) -> Iterator[dict[str, Any]]:
        if i == len(space.parameters):
            yield dict(params)
            return
        p = space.parameters[i]
        if not space.is_active(p, params):
            yield from walk(params, i + 1)
            return
        for choice in p.choices:
            params[p.name] = choice
            yield from walk(params, i + 1)
            del params[p.name]

    return walk({}, 0)


# --- loading and the shipped files ----------------------------------------------------------


def test_shipped_by_name_and_path(tiny: SearchSpace) -> None:
    path = Path(__file__).resolve().parent.parent / "search_spaces" / "tiny.yaml"
    assert SearchSpace.from_yaml(path).parameters == tiny.parameters
    assert tiny.name == "tiny"
    assert tiny.base.input_size == 32 and tiny.base.num_classes == 10


def test_parameters_are_value_objects(tiny: SearchSpace) -> None:
    names = [p.name for p in tiny.parameters]
    assert len(names) == len(set(names))
    kappa = tiny.parameter("stage2.aa.kappa")
    assert kappa == Categorical(
        "stage2.aa.kappa", (0.25, 0.5), (Condition("stage2.aa.placement", ("last",)),)
    )
    assert hash(kappa) == hash(tiny.parameter("stage2.aa.kappa"))
    # parents come before their children
    seen: set[str] = set()
    for p in tiny.parameters:
        assert all(c.parent in seen for c in p.conditions), p
        seen.add(p.name)


def test_size_matches_brute_force(tiny: SearchSpace) -> None:
    dicts = list(_enumerate(tiny))
    specs = {tiny.decode(d) for d in dicts}
    assert len(dicts) > len(specs)  # placements overlap, so dicts over-count
    assert tiny.size() == len(specs) == 2880


def test_sizes_of_shipped_spaces(spaces: dict[str, SearchSpace]) -> None:
    # 40,673,903,542,272 before the aa.mode choice (3 modes in each of its 4 AA stages)
    assert spaces["aa_mnasnet"].size() == 2706689986560000
    assert spaces["aa_resnet"].size() == 580788


def test_size_small_handmade_space() -> None:
    # one stage, depth 1..3 from a range, AA placement last/all/each with 2 ratio combos
    space = SearchSpace.from_dict(
        {
            "base": "mnasnet:i32_n10_w1_d0:conv_c16_k3_s1:ir_r2_k3_s2_e3_c32:c0",
            "width": [0.5, 1.0],
            "stages": {
                0: {
                    "depth": {"low": 1, "high": 3},
                    "aa": {
                        "placement": ["last", "all"],
                        "kappa": [0.25, 0.5],
                        "upsilon": 0.25,
                        "heads": 2,
                    },
                }
            },
        }
    )
    assert isinstance(space.parameter("stage0.depth"), IntRange)
    specs = {space.decode(d) for d in _enumerate(space)}
    assert space.size() == len(specs) == 2 * (2 + 4 + 4)


def test_aa_mode_parameter_size_and_round_trip() -> None:
    # aa.mode (which conv attention augments) is one more per-stage choice under the placement:
    # depth 1..2, placement none/last/each, 2 modes x 2 kappas = 4 attention settings.
    space = SearchSpace.from_dict(
        {
            "base": "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r2_k3_s2_e3_c32:c0",
            "stages": {
                0: {
                    "depth": [1, 2],
                    "aa": {
                        "placement": ["none", "last", "each"],
                        "mode": ["expansion", "projection"],
                        "kappa": [0.25, 0.5],
                        "upsilon": 0.25,
                        "heads": 2,
                    },
                }
            },
        }
    )
    mode = space.parameter("stage0.aa.mode")
    assert isinstance(mode, Categorical) and mode.choices == ("expansion", "projection")
    assert mode.conditions == (Condition("stage0.aa.placement", ("last", "each")),)
    dicts = list(_enumerate(space))
    specs = {space.decode(d) for d in dicts}
    # depth 1: off, or on x 4 settings; depth 2: off, or 3 on-patterns x 4 settings
    assert space.size() == len(specs) == (1 + 4) + (1 + 3 * 4)
    modes = {b.aa.mode for s in specs for st in s.stages for b in st if b.aa is not None}
    assert modes == {"expansion", "projection"}
    # largest(): the mode listed first in aanas.space's widest-first order, not str order
    largest = space.largest().stages[0]
    assert {b.aa.mode for b in largest if b.aa is not None} == {"expansion"}
    for spec in specs:
        assert space.decode(space.encode_params(spec)) == spec


def test_aa_mode_errors() -> None:
    base = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ds_r1_k3_s1_e1_c16:c0"
    bad_value = {
        "base": base,
        "stages": {0: {"aa": {"mode": "dw", "kappa": 0.5, "upsilon": 0.5, "heads": 2}}},
    }
    with pytest.raises(ValueError, match=r"stages\.0\.aa\.mode: mode must be one of"):
        SearchSpace.from_dict(bad_value)
    # ds blocks have no expansion conv: every combination is resolved at load time
    no_site = {
        "base": base,
        "stages": {
            0: {"aa": {"mode": ["spatial", "expansion"], "kappa": 0.5, "upsilon": 0.5, "heads": 2}}
        },
    }
    with pytest.raises(ValueError, match="mode=expansion.*aa.mode"):
        SearchSpace.from_dict(no_site)


@pytest.mark.parametrize("name", SHIPPED)
def test_samples_validate_roundtrip_and_encode(name: str, spaces: dict[str, SearchSpace]) -> None:
    space = spaces[name]
    rng = np.random.default_rng(0)
    for _ in range(100):
        params = space.sample_params(rng)
        spec = space.decode(params)
        spec.validate()
        assert spec_mod.decode(spec.encode()) == spec
        assert spec_mod.from_dict(spec.to_dict()) == spec
        assert space.decode(space.encode_params(spec)) == spec


def test_sample_deterministic(spaces: dict[str, SearchSpace]) -> None:
    for space in spaces.values():
        a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
        b = [space.sample(np.random.default_rng(7)) for _ in range(3)]
        assert a == b
        rng = np.random.default_rng(1)
        assert len({space.sample(rng) for _ in range(20)}) > 1


def test_largest_smallest(tiny: SearchSpace) -> None:
    big, small = tiny.largest(), tiny.smallest()
    rb, rs = spec_mod.resolve(big), spec_mod.resolve(small)
    assert len(rb.blocks) == 7 and len(rs.blocks) == 4
    assert max(b.kernel for b in rb.blocks) == 5 and all(b.dk == 0 for b in rs.blocks)


def test_builds_samples(spaces: dict[str, SearchSpace]) -> None:
    import torch

    from aanas.models import create_model

    rng = np.random.default_rng(3)
    for _ in range(3):
        model = create_model(spaces["tiny"].sample(rng)).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for name in ("aa_mnasnet", "aa_resnet"):  # 224x224 models: build only
        model = create_model(spaces[name].sample(rng))
        assert sum(p.numel() for p in model.parameters()) > 1e6


# --- strict decoding ------------------------------------------------------------------------


def test_decode_strict(tiny: SearchSpace) -> None:
    params = tiny.sample_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown parameter.*'bogus'"):
        tiny.decode({**params, "bogus": 1})
    missing = dict(params)
    del missing["stage1.kernel"]
    with pytest.raises(ValueError, match="missing parameter.*stage1.kernel"):
        tiny.decode(missing)
    with pytest.raises(ValueError, match="stage1.kernel.*invalid value 7"):
        tiny.decode({**params, "stage1.kernel": 7})
    off = {**params, "stage2.aa.placement": "none"}
    off.pop("stage2.aa.kappa", None)
    with pytest.raises(ValueError, match="stage2.aa.kappa.*inactive"):
        tiny.decode({**off, "stage2.aa.kappa": 0.25})
    assert tiny.decode(off) is not None
    with pytest.raises(ValueError, match="stage3.block0.aa.*invalid value 1"):
        tiny.decode(
            {
                **params,
                "stage3.aa.placement": "each",
                "stage3.aa.heads": 2,
                "stage3.block0.aa": 1,
                **({"stage3.block1.aa": True} if params["stage3.depth"] == 2 else {}),
            }
        )


# --- invalid YAML -----------------------------------------------------------------------------

_TINY_BASE = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s1:ir_r2_k3_s2_e3_c32/ir_r2_k3_s2_e3_c48:c0"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"base: '{_TINY_BASE}'\nbogus: 1\n", r"bad\.yaml: bogus: unknown key"),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    kernal: [3]\n", r"stages\.1\.kernal: unknown"),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    kernel: []\n", r"stages\.1\.kernel: empty"),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    kernel: [3, 4]\n", r"stages\.1\.kernel: .*odd"),
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    aa:\n      kappa: [0.25, 0]\n"
            "      upsilon: [0.25]\n      heads: [2]\n",
            r"stages\.1\.aa\.kappa: .*\(got 0\)",
        ),
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    aa:\n      kappa: [0.25]\n"
            "      upsilon: [0.25, 1.0]\n      heads: [2, 128]\n",
            r"stages\.1\.aa: choices .*heads=128.*num_heads",
        ),
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    aa:\n      placement: [sometimes]\n",
            r"stages\.1\.aa\.placement: .*'sometimes'",
        ),
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    aa:\n      kappa: [0.25]\n",
            r"stages\.1\.aa\.upsilon: missing",
        ),
        (f"base: '{_TINY_BASE}'\nstages:\n  5:\n    depth: [1]\n", r"stages\.5: .*stages 0\.\.1"),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    depth: [0, 1]\n", r"stages\.1\.depth: .*>= 1"),
        (f"base: '{_TINY_BASE}'\nstages:\n  0:\n    se: [0.0, 0.0]\n", r"stages\.0\.se: duplicate"),
        (f"base: '{_TINY_BASE}'\nstages:\n  0:\n    expansion: [0]\n", r"stages\.0\.expansion"),
        ("base: no_such_model\n", r"base: unknown model name.*'no_such_model'"),
        ("base: 'mnasnet:i32:bad'\n", r"bad\.yaml: base: "),
        ("stages: {}\n", r"base: missing"),
        (f"base: '{_TINY_BASE}'\nstages: [\n", r"bad\.yaml: invalid YAML"),
        (f"base: '{_TINY_BASE}'\nwidth: []\n", r"width: empty choice list"),
        # bounds: nothing in a space file may make loading expand or enumerate without limit
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    depth: {{low: 1, high: 1000000000}}\n",
            r"stages\.1\.depth\.high: must be an integer in \[1, 1024\]",
        ),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    depth: [1, 99999]\n", r"stages\.1\.depth: "),
        (
            f"base: '{_TINY_BASE}'\nstages:\n  1:\n    kernel: {list(range(1, 131, 2))}\n",
            r"stages\.1\.kernel: at most 64 choices",
        ),
        (f"base: '{_TINY_BASE}'\ninput_size: 100000\n", r"base \(with overrides\): input_size"),
        (f"base: '{_TINY_BASE}'\nwidth: [1.0, 1.0e+300]\n", r"width\[1\]: width: must be <= 8"),
        (f"base: '{_TINY_BASE}'\nstages:\n  1:\n    expansion: [.inf]\n", r"expansion"),
        # PyYAML itself raises ValueError on an impossible date; still one SpaceError line
        (f"base: '{_TINY_BASE}'\nname: 2020-13-45\n", r"bad\.yaml: invalid YAML: month"),
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=match) as info:
        SearchSpace.from_yaml(path)
    assert "\n" not in str(info.value)


def test_not_utf8_is_a_space_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpaceError, match=r"latin1\.yaml: invalid YAML: .*utf-8"):
        SearchSpace.from_yaml(path)


def test_too_many_load_time_checks_is_refused_quickly() -> None:
    # Every list is valid and short, but their product would make the load-time check validate
    # 64 widths x 16 kernels x 8 expansions x 8 SE ratios = 65536 probe specs.
    import time

    data = {
        "base": _TINY_BASE,
        "width": [1.0 + i / 64 for i in range(64)],
        "stages": {
            1: {
                "kernel": list(range(1, 32, 2)),
                "expansion": [1, 2, 3, 4, 5, 6, 7, 8],
                "se": [0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6],
            }
        },
    }
    start = time.perf_counter()
    with pytest.raises(SpaceError, match=r"stages: the choices give 65536 .* at most 4096"):
        SearchSpace.from_dict(data)
    assert time.perf_counter() - start < 1.0


def test_heads_checked_on_every_width_and_expansion(tmp_path: Path) -> None:
    # 3 heads fit c24 (mid 72 at e3) but not at width 0.25, where the expanded tensor shrinks
    base = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s1:ir_r1_k3_s2_e1_c8:c0"
    path = tmp_path / "w.yaml"
    path.write_text(
        f"base: '{base}'\nwidth: [1.0, 0.25]\nstages:\n  0:\n    aa:\n      kappa: [0.5]\n"
        "      upsilon: [1.0]\n      heads: [16]\n"
    )
    with pytest.raises(ValueError, match=r"stages\.0\.aa: .*heads=16"):
        SearchSpace.from_yaml(path)


def test_unknown_shipped_name() -> None:
    with pytest.raises(ValueError, match="no shipped space"):
        SearchSpace.from_yaml("nope")


# --- engine adapters --------------------------------------------------------------------------


def _optuna_specs(space: SearchSpace, seed: int, n: int, tpe: bool) -> list[spec_mod.ArchSpec]:
    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
        if tpe
        else optuna.samplers.RandomSampler(seed=seed)
    )
    study = optuna.create_study(sampler=sampler)
    specs = []
    for i in range(n):
        trial = study.ask()
        spec = suggest(space, trial)
        specs.append(spec)
        study.tell(trial, float(i % 3))
    return specs


def test_optuna_seeded_and_conditional(tiny: SearchSpace) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for tpe in (False, True):
        a = _optuna_specs(tiny, 3, 12, tpe)
        assert a == _optuna_specs(tiny, 3, 12, tpe)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        params = suggest_params(tiny, trial)
        # only active parameters were suggested, and they decode strictly
        assert set(trial.params) == set(params)
        tiny.decode(trial.params)
        study.tell(trial, 0.0)


def test_optuna_and_ray_decode_identically(tiny: SearchSpace) -> None:
    from ray.tune.search.sample import Domain

    param_space = ray_param_space(tiny)
    assert set(param_space) == {p.name for p in tiny.parameters}
    assert all(isinstance(d, Domain) for d in param_space.values())
    rng = np.random.default_rng(0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        optuna_spec = suggest(tiny, trial)
        # a Ray config: the same active values plus sampled inactive ones and foreign keys
        config = {p.name: p.choices[int(rng.integers(len(p.choices)))] for p in tiny.parameters}
        config.update(trial.params)
        config["lr"] = 0.1
        assert active_params(tiny, config) == trial.params
        assert ray_config_to_spec(tiny, config) == optuna_spec
        study.tell(trial, 0.0)
    define = ray_define_by_run(tiny)
    trial = study.ask()
    assert define(trial) is None and tiny.decode(trial.params) is not None


def test_ray_domains_sample_valid_configs(tiny: SearchSpace) -> None:
    param_space = ray_param_space(tiny)
    for i in range(10):
        config = {
            k: d.sample(random_state=np.random.RandomState(i)) for k, d in param_space.items()
        }
        ray_config_to_spec(tiny, config).validate()


def test_enumerate_helper_consistent(tiny: SearchSpace) -> None:
    # brute-force enumeration is itertools-free; spot-check against a product of one stage
    stage1 = [p for p in tiny.parameters if p.name.startswith("stage1.")]
    assert len(list(itertools.product(*(p.choices for p in stage1)))) == 8
