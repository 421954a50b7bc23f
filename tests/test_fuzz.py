"""Fuzz the user-input boundaries: spec strings and dicts, search-space YAML, recipe overrides.

Contract (aanas.errors): every call either succeeds or raises :class:`aanas.errors.AanasError`
with a one-line message, within a second. Any other exception type is a bug in aanas (a
``TypeError`` from a list where a number was expected, a ``RecursionError`` from deep YAML, a
``MemoryError`` from an unbounded repeat count...). Hypothesis feeds arbitrary text and bytes,
YAML-shaped data (nested dicts/lists/scalars), and mutations of valid inputs, which reach far
deeper than random text.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aanas import spec as S
from aanas.config import TrainRecipe, apply_overrides, load_recipe
from aanas.errors import AanasError
from aanas.models import get_spec  # import torch now, not inside a timed example
from aanas.search import SearchRecipe
from aanas.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text(encoding="utf-8"))
RESNET_SPACE = yaml.safe_load(
    (ROOT / "search_spaces" / "aa_resnet.yaml").read_text(encoding="utf-8")
)
SPEC_STRINGS = [get_spec(n).encode() for n in ("mnasnet_a1_100", "aa_resnet50", "aa_wrn28_10")]

# One second per call, as the contract says; a loaded 2-core CI box gets no more. CI runs the
# same 100 examples per test every time (derandomize); AANAS_FUZZ_EXAMPLES=5000 hunts further
# with fresh random examples.
_EXAMPLES = int(os.environ.get("AANAS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 100,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=not _EXAMPLES,
)


def _contract(fn: Any, *args: Any) -> Any:
    """Call ``fn``; an AanasError with a one-line message is fine, anything else fails."""
    try:
        return fn(*args)
    except AanasError as exc:
        assert "\n" not in str(exc), f"multi-line message: {exc!r}"
        return None


# --- strategies -------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from([0, 1, 2, 3, 8, 64, 65, 10**9, 0.25, 1.5, -1, "", "relu", "ir", "all"])
)
yamlish = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.integers(-3, 5), inner, max_size=4)
    ),
    max_leaves=20,
)

_TOKENS = [
    "mnasnet", "resnet", "wrn", "i32", "i224", "i0", "i99999", "n10", "n0", "w1", "w0.5", "w1e9",
    "d0", "d0.2", "conv", "resnet", "plain", "c16", "c0", "c999999999", "k3", "k4", "k99", "s1",
    "s2", "s3", "ir", "ds", "basic", "bottle", "preact", "r1", "r999999999", "e6", "e0.25", "e1e9",
    "se0.25", "se1", "relu6", "swish", "noskip", "aa0.2-0.1-8", "aa1-1-1", "aa0.2-0.1-8-abs-d20",
    "aa0.5-0.5-999", "aanan-0.1-2", "einf", "enan", "x", "",
]  # fmt: skip
_SEPARATORS = [":", "_", ",", "/", "-", "::", " "]


@st.composite
def spec_like_strings(draw: st.DrawFn) -> str:
    """Strings built from the grammar's own tokens and separators, so decode gets far."""
    parts = draw(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=20))
    seps = draw(st.lists(st.sampled_from(_SEPARATORS), min_size=len(parts), max_size=len(parts)))
    return "".join(p + s for p, s in zip(parts, seps, strict=True))


@st.composite
def mutated_spec_strings(draw: st.DrawFn) -> str:
    """A real spec string with one token replaced, dropped or duplicated."""
    text = draw(st.sampled_from(SPEC_STRINGS))
    tokens = text.replace(":", ":\0").replace("_", "_\0").replace(",", ",\0").split("\0")
    i = draw(st.integers(0, len(tokens) - 1))
    op = draw(st.sampled_from(["replace", "drop", "dup"]))
    if op == "replace":
        tokens[i] = draw(st.sampled_from(_TOKENS) | st.text(max_size=6)) + tokens[i][-1:]
    elif op == "drop":
        del tokens[i]
    else:
        tokens.insert(i, tokens[i])
    return "".join(tokens)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a nested dict/list structure."""
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one node (a leaf or a whole subtree) replaced by arbitrary YAML data."""
    data = copy.deepcopy(base)
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    node = data
    for key in path[:-1]:
        node = node[key]
    if draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = draw(yamlish)
    return data


# --- spec decoding ----------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=200) | spec_like_strings() | mutated_spec_strings())
def test_decode_fuzz(text: str) -> None:
    spec = _contract(S.decode, text)
    if spec is not None:  # whatever decodes, round-trips
        assert S.decode(S.encode(spec)) == spec


@FUZZ
@given(st.binary(max_size=100) | yamlish)
def test_decode_non_string_fuzz(value: Any) -> None:
    _contract(S.decode, value)


@FUZZ
@given(
    yamlish
    | mutated(S.to_dict(get_spec("aa_mnasnet_a1_100")))
    | mutated(S.to_dict(get_spec("aa_wrn28_10")))
)
def test_from_dict_fuzz(data: Any) -> None:
    spec = _contract(S.from_dict, data)
    if spec is not None:
        assert S.from_dict(S.to_dict(spec)) == spec


# --- search-space YAML ------------------------------------------------------------------------


@FUZZ
@given(yamlish | mutated(TINY_SPACE) | mutated(RESNET_SPACE))
def test_space_from_dict_fuzz(data: Any) -> None:
    _contract(SearchSpace.from_dict, data)


@FUZZ
@given(
    st.text(max_size=300)
    | st.binary(max_size=200)
    | yamlish.map(yaml.safe_dump)
    | mutated(TINY_SPACE).map(yaml.safe_dump)
)
def test_space_from_yaml_file_fuzz(tmp_path: Path, content: str | bytes) -> None:
    path = tmp_path / "space.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    _contract(SearchSpace.from_yaml, path)


_TINY = SearchSpace.from_dict(TINY_SPACE)


@st.composite
def tiny_params(draw: st.DrawFn) -> dict[Any, Any]:
    """Valid parameters of the tiny space with entries changed, dropped or added."""
    params: dict[Any, Any] = _TINY.sample_params(np.random.default_rng(draw(st.integers(0, 99))))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(params, key=repr)) | st.text(max_size=8) | st.integers())
        if draw(st.booleans()):
            params.pop(key, None)
        else:
            params[key] = draw(yamlish)
    return params


@FUZZ
@given(tiny_params() | st.dictionaries(st.text(max_size=12) | st.integers(), yamlish))
def test_space_decode_params_fuzz(params: dict[Any, Any]) -> None:
    spec = _contract(_TINY.decode, params)
    if spec is not None:
        assert _TINY.decode(_TINY.encode_params(spec)) == spec


# --- recipes and --set overrides --------------------------------------------------------------

_TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainRecipe)]
_SEARCH_KEYS = [f.name for f in dataclasses.fields(SearchRecipe)]
_values = st.text(max_size=20) | st.sampled_from(
    ["1", "-1", "0", "1e999", "nan", "inf", "-inf", "true", "none", "[1, 2]", "2,1", "[", "]",
     "99999999999999999999999", "sgd", "step", "0.5", "[]", "1,,2", "1e-400"]
)  # fmt: skip


@st.composite
def overrides(draw: st.DrawFn, keys: list[str], section: str) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys) | st.text(max_size=8))
        if draw(st.booleans()):
            key = f"{section}.{key}"
        out.append(f"{key}{draw(st.sampled_from(['=', '', '==']))}{draw(_values)}")
    return draw(st.just(out) | st.lists(st.text(max_size=20), max_size=3))


@FUZZ
@given(overrides(_TRAIN_KEYS, "train"))
def test_train_overrides_fuzz(items: list[str]) -> None:
    _contract(apply_overrides, TrainRecipe(), items)


@FUZZ
@given(overrides(_SEARCH_KEYS, "search"))
def test_search_overrides_fuzz(items: list[str]) -> None:
    _contract(lambda: apply_overrides(SearchRecipe(), items, section="search"))


@FUZZ
@given(
    st.text(max_size=300)
    | st.binary(max_size=200)
    | yamlish.map(yaml.safe_dump)
    | mutated(yaml.safe_load((ROOT / "recipes" / "digits_tiny.yaml").read_text())).map(
        yaml.safe_dump
    ),
    overrides(_TRAIN_KEYS, "train") | st.just([]),
)
def test_load_recipe_fuzz(tmp_path: Path, content: str | bytes, items: list[str]) -> None:
    path = tmp_path / "recipe.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    _contract(load_recipe, path, items)


@pytest.mark.parametrize(
    "call",
    [
        lambda: S.decode("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r999999999_k3_s1_e3_c24:c0"),
        lambda: S.from_dict({"family": "mnasnet", "stem": {}, "stages": 5}),
        lambda: SearchSpace.from_dict(
            {"base": SPEC_STRINGS[0], "stages": {1: {"depth": {"low": 1, "high": 10**9}}}}
        ),
        lambda: SearchSpace.from_dict({"base": SPEC_STRINGS[0], "stages": {1: {"depth": [10**9]}}}),
        lambda: SearchSpace.from_dict(
            {
                "base": SPEC_STRINGS[0],
                "stages": {i: {"kernel": [1, 3, 5, 7, 9, 11]} for i in range(7)}
                | {
                    1: {"kernel": list(range(1, 128, 2))},
                    2: {
                        "kernel": list(range(1, 128, 2)),
                        "expansion": [1, 2, 3, 4, 5, 6],
                        "se": [0.0, 0.1, 0.2, 0.25, 0.3, 0.5],
                    },
                },
            }
        ),
        lambda: load_recipe(ROOT / "recipes" / "digits_tiny.yaml", ["batch_size=10000000"]),
        lambda: apply_overrides(TrainRecipe(), ["epochs=1e999"]),
    ],
)
def test_known_crashers_raise_aanas_errors(call: Any) -> None:
    with pytest.raises(AanasError):
        call()
