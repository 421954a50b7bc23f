"""Search spaces over attention-augmented architectures, read from YAML.

A space starts from a base :class:`~aanas.spec.ArchSpec` (a registered model name or a spec
string) and declares, per stage, the choices a search may make: depth (trailing blocks are
skipped), kernel, expansion and squeeze-excitation of the blocks, and where and how the
blocks are attention-augmented (Bello et al., arXiv:1904.09925: the placement over blocks, the
``mode`` naming which conv of a block is augmented (``spatial``, ``expansion``, ``projection``;
see ``aanas.block_types``), kappa = dk/Fout, upsilon = dv/Fout, heads, relative logits on/off).
Everything the file does not mention stays as in the base.

The space is engine-agnostic: it lists its parameters as value objects (:class:`Categorical`,
:class:`IntRange`, each with the :class:`Condition` s under which it exists), samples from a
``numpy.random.Generator`` and turns a flat parameter dict into a spec with :meth:`decode`.
The Optuna and Ray adapters (``aanas.search.adapters``) only translate these objects. The YAML
format is documented in the README ("Search-space files").

This module is layer L0: no torch, optuna or ray. Only a base given as a registered model name
imports ``aanas.models`` (and so torch), lazily.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aanas import spec as _spec
from aanas.errors import SpaceError
from aanas.spec import SPEC_LIMITS, AASpec, ArchSpec, BlockSpec

__all__ = [
    "PLACEMENTS",
    "Categorical",
    "Condition",
    "IntRange",
    "Parameter",
    "SearchSpace",
]

# Where attention augmentation goes inside a stage: nowhere, on the last (active) block, on
# every block, or a per-block on/off switch (``stage<i>.block<j>.aa``).
PLACEMENTS: tuple[str, ...] = ("none", "last", "all", "each")
# Preference orders used by largest() / smallest(): most attention first, least first.
_MOST_AA = ("all", "each", "last", "none")
_LEAST_AA = ("none", "last", "each", "all")
# aa.mode for largest() / smallest(): spatial attention has the widest Fout (the expanded
# tensor), projection the narrowest (the block output); expansion reads the narrow input.
_MOST_MODE = ("spatial", "expansion", "projection")
_LEAST_MODE = ("projection", "expansion", "spatial")

_TOP_KEYS = ("name", "description", "base", "input_size", "num_classes", "dropout", "width")
_STAGE_KEYS = ("depth", "per_block", "kernel", "expansion", "se", "aa")
_AA_KEYS = ("placement", "mode", "kappa", "upsilon", "heads", "relative", "min_key_depth")
_BLOCK_KEYS = ("kernel", "expansion", "se")  # per-block when the stage says per_block: true

# Bounds on what a space file may ask for, checked while loading, before anything is expanded:
# the load-time check validates one probe spec per (width, stage, choice combination), so the
# product of the choice lists, not just each list, must stay small. The shipped aa_mnasnet
# space has 608 probes (checked in 0.28 s on a 2-core box at load average 15) and no list
# longer than 4.
_MAX_CHOICES = 64  # entries of one choice list
_MAX_PROBES = 4096  # specs the load-time check validates (~0.1-0.5 ms each: under a second)
# A stage's depth counts blocks after expanding repeats: bounded like a whole network's blocks.
_MAX_DEPTH = int(SPEC_LIMITS["total_blocks"][0])


# --- parameter value objects ------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A parameter exists only while ``parent`` exists and takes one of ``values``."""

    parent: str
    values: tuple[Any, ...]

    def holds(self, params: Mapping[str, Any]) -> bool:
        """True when ``params`` (the values chosen so far) satisfy the condition."""
        return self.parent in params and any(_same(params[self.parent], v) for v in self.values)


@dataclass(frozen=True)
class Categorical:
    """A choice among ``choices`` (ints, floats, bools or strings), in the file's order."""

    name: str
    choices: tuple[Any, ...]
    conditions: tuple[Condition, ...] = ()  # all must hold (parents come first in the space)

    def contains(self, value: Any) -> bool:
        """True when ``value`` is one of the choices (``True`` is not ``1``)."""
        return any(_same(value, c) for c in self.choices)


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[low, high]`` (both inclusive) on a grid of ``step``."""

    name: str
    low: int
    high: int
    step: int = 1
    conditions: tuple[Condition, ...] = ()

    @property
    def choices(self) -> tuple[int, ...]:
        """All values of the range, ascending."""
        return tuple(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        """True for an int (not a bool) on the grid."""
        return bool(
            isinstance(value, int | np.integer)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )


Parameter = Categorical | IntRange


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from numbers (True == 1 in Python)."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


# --- per-stage plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _AAChoices:
    placement: tuple[str, ...]
    kappa: tuple[float, ...]
    upsilon: tuple[float, ...]
    heads: tuple[int, ...]
    relative: tuple[bool, ...]
    min_key_depth: int
    mode: tuple[str, ...] = ("spatial",)  # which conv is augmented (aanas.block_types)

    def combos(self) -> Iterator[AASpec]:
        """Every AASpec the ratio and mode choices allow (the 'R' of size())."""
        for k, u, h, r, m in itertools.product(
            self.kappa, self.upsilon, self.heads, self.relative, self.mode
        ):
            yield AASpec(k, u, h, r, self.min_key_depth, m)


@dataclass(frozen=True)
class _StageChoices:
    index: int
    layers: tuple[BlockSpec, ...]  # the base stage, one BlockSpec per block (repeats = 1)
    depth: tuple[int, ...]
    depth_range: tuple[int, int, int] | None  # (low, high, step) when given as a range
    per_block: bool
    kernel: tuple[int, ...] | None  # None: keep the base's value
    expansion: tuple[float, ...] | None
    se: tuple[float, ...] | None
    aa: _AAChoices | None  # None: keep the base's attention

    @property
    def prefix(self) -> str:
        return f"stage{self.index}"

    def layer(self, j: int) -> BlockSpec:
        """Base block j; blocks past the base depth repeat the last one with stride 1."""
        if j < len(self.layers):
            return self.layers[j]
        return dataclasses.replace(self.layers[-1], stride=1)


# --- the space --------------------------------------------------------------------------------


class SearchSpace:
    """A search space: a base spec plus per-stage choices, as ordered parameters.

    Build one with :meth:`from_yaml`. Parameters are listed parents-first, so a define-by-run
    engine can walk :attr:`parameters` in order and skip those whose conditions fail.
    """

    def __init__(
        self,
        name: str,
        base: ArchSpec,
        stages: Sequence[_StageChoices],
        widths: tuple[float, ...] | None = None,
        source: str = "<memory>",
    ) -> None:
        self.name = name
        self.base = base
        self.source = source
        self._stages = tuple(stages)
        self._widths = widths
        self._params = self._build_parameters()
        self._by_name = {p.name: p for p in self._params}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SearchSpace:
        """Load a space from a YAML file, or a shipped one by bare name (``"tiny"``).

        Raises:
            SpaceError: one line naming the file, the key path and the bad value: unknown
                keys, empty choice lists, out-of-range values, an unknown base, or any
                combination of choices that gives an invalid block (checked exhaustively).
        """
        file = _find_file(path)
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        # PyYAML raises ValueError for impossible timestamps (2020-13-45) and RecursionError
        # for very deep nesting; UnicodeDecodeError is a ValueError too.
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            detail = " ".join(str(exc).split())
            raise SpaceError(f"{file}: invalid YAML: {detail}") from None
        return cls.from_dict(data, source=str(file))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SearchSpace:
        """Build a space from the parsed YAML mapping (see :meth:`from_yaml`)."""
        return _Loader(source).load(data)

    # -- parameters --------------------------------------------------------------------------

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """All parameters, parents before the parameters conditioned on them."""
        return self._params

    def parameter(self, name: str) -> Parameter:
        """The parameter called ``name`` (SpaceError if absent)."""
        if name not in self._by_name:
            raise SpaceError(f"{self.name}: unknown parameter {name!r}")
        return self._by_name[name]

    @staticmethod
    def is_active(param: Parameter, params: Mapping[str, Any]) -> bool:
        """Whether ``param`` exists given the parents' values in ``params``."""
        return all(c.holds(params) for c in param.conditions)

    def _build_parameters(self) -> tuple[Parameter, ...]:
        out: list[Parameter] = []
        if self._widths is not None and len(self._widths) > 1:
            out.append(Categorical("width", self._widths))
        for st in self._stages:
            out.extend(_stage_parameters(st))
        return tuple(out)

    # -- sampling ----------------------------------------------------------------------------

    def sample_params(self, rng: np.random.Generator) -> dict[str, Any]:
        """Uniform choice for every active parameter, drawn in :attr:`parameters` order."""
        params: dict[str, Any] = {}
        for p in self._params:
            if self.is_active(p, params):
                choices = p.choices
                params[p.name] = choices[int(rng.integers(len(choices)))]
        return params

    def sample(self, rng: np.random.Generator) -> ArchSpec:
        """A random architecture: ``decode(sample_params(rng))``."""
        return self.decode(self.sample_params(rng))

    def _extreme_params(self, most: bool) -> dict[str, Any]:
        order = _MOST_AA if most else _LEAST_AA
        params: dict[str, Any] = {}
        for p in self._params:
            if not self.is_active(p, params):
                continue
            if p.name.endswith(".aa.placement"):
                value = min(p.choices, key=order.index)
            elif p.name.endswith(".aa.mode"):
                value = min(p.choices, key=(_MOST_MODE if most else _LEAST_MODE).index)
            else:  # numbers and bools: True > False, so most = on
                value = max(p.choices) if most else min(p.choices)
            params[p.name] = value
        return params

    def largest(self) -> ArchSpec:
        """Every choice at its maximum (attention on as many blocks as allowed)."""
        return self.decode(self._extreme_params(True))

    def smallest(self) -> ArchSpec:
        """Every choice at its minimum (attention on as few blocks as allowed)."""
        return self.decode(self._extreme_params(False))

    # -- decoding ----------------------------------------------------------------------------

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``params`` strictly and return them with values normalized to the choices.

        Raises:
            SpaceError: naming unknown, missing, inactive-but-given or invalid parameters.
        """
        unknown = sorted((k for k in params if k not in self._by_name), key=repr)
        if unknown:
            raise SpaceError(f"{self.name}: unknown parameter(s) {unknown}")
        out: dict[str, Any] = {}
        missing: list[str] = []
        for p in self._params:
            active = self.is_active(p, out)
            if not active:
                if p.name in params:
                    raise SpaceError(
                        f"{self.name}: parameter {p.name!r} is inactive here "
                        f"(needs {_describe(p.conditions)}) and must be absent"
                    )
                continue
            if p.name not in params:
                missing.append(p.name)
                continue
            value = params[p.name]
            if not p.contains(value):
                raise SpaceError(
                    f"{self.name}: parameter {p.name!r}: invalid value {value!r}; "
                    f"expected one of {list(p.choices)}"
                )
            out[p.name] = next(c for c in p.choices if _same(c, value))
        if missing:
            raise SpaceError(f"{self.name}: missing parameter(s) {missing}")
        return out

    def decode(self, params: Mapping[str, Any]) -> ArchSpec:
        """The architecture ``params`` select (strict, see :meth:`check_params`)."""
        values = self.check_params(params)
        stages = list(self.base.stages)
        for st in self._stages:
            stages[st.index] = _merge_runs(_stage_layers(st, values))
        spec = dataclasses.replace(self.base, stages=tuple(stages))
        if self._widths is not None:
            spec = dataclasses.replace(spec, width=float(values.get("width", self._widths[0])))
        return spec.validate()

    def encode_params(self, spec: ArchSpec) -> dict[str, Any]:
        """The parameters that decode to ``spec`` (inverse of :meth:`decode`).

        Where two placements give the same blocks (``last`` and ``all`` on a one-block stage)
        the one listed first in the file is used.

        Raises:
            SpaceError: ``spec`` is not in this space.
        """
        params: dict[str, Any] = {}
        if self._widths is not None and len(self._widths) > 1:
            params["width"] = float(spec.width)
        if len(spec.stages) != len(self.base.stages):
            raise SpaceError(f"{self.name}: spec has {len(spec.stages)} stages, not in space")
        for st in self._stages:
            layers = _expand(spec.stages[st.index])
            params.update(_encode_stage(st, layers))
        params = {k: v for k, v in params.items() if k in self._by_name}
        try:
            decoded = self.decode(params)
        except ValueError as exc:
            raise SpaceError(f"{self.name}: spec is not in this space: {exc}") from None
        if decoded != spec:
            raise SpaceError(f"{self.name}: spec is not in this space: {spec.encode()}")
        return params

    # -- counting ----------------------------------------------------------------------------

    def size(self) -> int:
        """Number of distinct architectures (distinct specs, not parameter dicts).

        Stages are independent, so the count is ``|widths| * prod(stage counts)``. Per stage
        and depth d, the block settings (kernel/expansion/SE: one per stage or one per block)
        multiply with the number of distinct attention patterns, which counts the overlaps
        between placements: ``last`` and ``all`` coincide at d = 1, and ``each`` contains the
        others, including all-off (= ``none``).
        """
        total = len(self._widths) if self._widths is not None else 1
        for st in self._stages:
            total *= _stage_size(st)
        return total

    def variant_specs(self) -> Iterator[ArchSpec]:
        """Specs that together contain every block variant the space allows.

        At every block position, each kernel/expansion/SE/attention-ratio choice at every
        width appears in at least one of them (a stage at full depth with one combination on
        all its blocks). The load-time check validates them; the supernet sizes its weights
        from them.
        """
        for probe, _, _ in _variant_probes(self):
            yield probe

    def __repr__(self) -> str:
        return f"SearchSpace(name={self.name!r}, parameters={len(self._params)})"


# --- stage parameters, decoding and counting -----------------------------------------------------


def _depth_condition(st: _StageChoices, j: int) -> tuple[Condition, ...] | None:
    """Conditions for block j to exist; None when it never does."""
    deeper = tuple(d for d in st.depth if d > j)
    if not deeper:
        return None
    if len(deeper) == len(st.depth) or len(st.depth) == 1:
        return ()
    return (Condition(f"{st.prefix}.depth", deeper),)


def _placement_condition(st: _StageChoices, wanted: Sequence[str]) -> tuple[Condition, ...] | None:
    """Conditions for the placement to be one of ``wanted``; None when it never is."""
    assert st.aa is not None
    hits = tuple(p for p in st.aa.placement if p in wanted)
    if not hits:
        return None
    if len(st.aa.placement) == 1:
        return ()
    return (Condition(f"{st.prefix}.aa.placement", hits),)


def _categorical(
    name: str, choices: tuple[Any, ...] | None, cond: tuple[Condition, ...]
) -> list[Parameter]:
    if choices is None or len(choices) < 2:
        return []
    return [Categorical(name, choices, cond)]


def _stage_parameters(st: _StageChoices) -> list[Parameter]:
    p = st.prefix
    out: list[Parameter] = []
    if len(st.depth) > 1:
        if st.depth_range is not None:
            low, high, step = st.depth_range
            out.append(IntRange(f"{p}.depth", low, high, step))
        else:
            out.append(Categorical(f"{p}.depth", st.depth))
    if not st.per_block:
        for key in _BLOCK_KEYS:
            out += _categorical(f"{p}.{key}", getattr(st, key), ())
    aa = st.aa
    if aa is not None:
        out += _categorical(f"{p}.aa.placement", aa.placement, ())
        ratio_cond = _placement_condition(st, ("last", "all", "each"))
        if ratio_cond is not None:
            for key in ("mode", "kappa", "upsilon", "heads", "relative"):
                out += _categorical(f"{p}.aa.{key}", getattr(aa, key), ratio_cond)
    for j in range(max(st.depth)):
        dcond = _depth_condition(st, j)
        assert dcond is not None
        if st.per_block:
            for key in _BLOCK_KEYS:
                out += _categorical(f"{p}.block{j}.{key}", getattr(st, key), dcond)
        if aa is not None:
            each = _placement_condition(st, ("each",))
            if each is not None:
                out.append(Categorical(f"{p}.block{j}.aa", (False, True), dcond + each))
    return out


def _value(values: Mapping[str, Any], name: str, choices: tuple[Any, ...] | None) -> Any:
    """The chosen value: from ``values`` if searched, the only choice if fixed."""
    if name in values:
        return values[name]
    assert choices is not None and len(choices) == 1, name
    return choices[0]


def _stage_layers(st: _StageChoices, values: Mapping[str, Any]) -> list[BlockSpec]:
    p = st.prefix
    depth = int(_value(values, f"{p}.depth", st.depth))
    aa = st.aa
    placement = _value(values, f"{p}.aa.placement", aa.placement) if aa else None
    aa_spec: AASpec | None = None
    if aa is not None and placement != "none":
        aa_spec = AASpec(
            kappa=float(_value(values, f"{p}.aa.kappa", aa.kappa)),
            upsilon=float(_value(values, f"{p}.aa.upsilon", aa.upsilon)),
            heads=int(_value(values, f"{p}.aa.heads", aa.heads)),
            relative=bool(_value(values, f"{p}.aa.relative", aa.relative)),
            min_key_depth=aa.min_key_depth,
            mode=str(_value(values, f"{p}.aa.mode", aa.mode)),
        )
    layers = []
    for j in range(depth):
        block = st.layer(j)
        changes: dict[str, Any] = {}
        for key in _BLOCK_KEYS:
            choices = getattr(st, key)
            if choices is None:
                continue
            name = f"{p}.block{j}.{key}" if st.per_block else f"{p}.{key}"
            changes[key] = _value(values, name, choices)
        for key in ("expansion", "se"):
            if key in changes:
                changes[key] = float(changes[key])
        if aa is not None:
            on = (
                placement == "all"
                or (placement == "last" and j == depth - 1)
                or (placement == "each" and bool(values.get(f"{p}.block{j}.aa", False)))
            )
            changes["aa"] = aa_spec if on else None
        layers.append(dataclasses.replace(block, **changes))
    return layers


def _expand(stage: Sequence[BlockSpec]) -> list[BlockSpec]:
    """One BlockSpec per block (repeats = 1); only a run's first block keeps its stride."""
    out = []
    for b in stage:
        for k in range(b.repeats):
            out.append(dataclasses.replace(b, repeats=1, stride=b.stride if k == 0 else 1))
    return out


def _merge_runs(layers: Sequence[BlockSpec]) -> tuple[BlockSpec, ...]:
    """Canonical form: consecutive equal blocks (later ones stride 1) become one run.

    So a decoded spec equals the base where the choices match it, and equal block lists give
    equal specs: ``[k3_s2, k3_s1, k5_s1]`` -> ``(r2_k3_s2, r1_k5_s1)``.
    """
    runs: list[BlockSpec] = []
    for b in layers:
        if runs and b.stride == 1:
            last = runs[-1]
            if dataclasses.replace(b, stride=last.stride, repeats=last.repeats) == last:
                runs[-1] = dataclasses.replace(last, repeats=last.repeats + 1)
                continue
        runs.append(b)
    return tuple(runs)


def _encode_stage(st: _StageChoices, layers: list[BlockSpec]) -> dict[str, Any]:
    p = st.prefix
    out: dict[str, Any] = {f"{p}.depth": len(layers)}
    first = layers[0]
    for key in _BLOCK_KEYS:
        if st.per_block:
            for j, b in enumerate(layers):
                out[f"{p}.block{j}.{key}"] = getattr(b, key)
        else:
            out[f"{p}.{key}"] = getattr(first, key)
    aa = st.aa
    if aa is None:
        return out
    on = [b.aa is not None for b in layers]
    d = len(layers)
    fits = {
        "none": not any(on),
        "last": on == [j == d - 1 for j in range(d)],
        "all": all(on),
        "each": True,
    }
    placement = next((pl for pl in aa.placement if fits[pl]), aa.placement[0])
    out[f"{p}.aa.placement"] = placement
    spec_aa: AASpec | None = next((b.aa for b in layers if b.aa is not None), None)
    if placement != "none":
        # each with every switch off still has (unused) ratio parameters: take the first ones
        ref: AASpec = spec_aa if spec_aa is not None else next(aa.combos())
        out[f"{p}.aa.kappa"] = ref.kappa
        out[f"{p}.aa.upsilon"] = ref.upsilon
        out[f"{p}.aa.heads"] = ref.heads
        out[f"{p}.aa.relative"] = ref.relative
        out[f"{p}.aa.mode"] = ref.mode
    if placement == "each":
        for j, flag in enumerate(on):
            out[f"{p}.block{j}.aa"] = flag
    return out


def _stage_size(st: _StageChoices) -> int:
    settings = 1
    for key in _BLOCK_KEYS:
        choices = getattr(st, key)
        settings *= len(choices) if choices is not None else 1
    aa = st.aa
    ratios = (
        math.prod(len(c) for c in (aa.kappa, aa.upsilon, aa.heads, aa.relative, aa.mode))
        if aa
        else 0
    )
    total = 0
    for d in st.depth:
        base = settings**d if st.per_block else settings
        if aa is None:
            patterns = 1
        else:
            pl = set(aa.placement)
            off = 1 if ("none" in pl or "each" in pl) else 0
            if "each" in pl:
                on_sets = 2**d - 1
            else:
                on_sets = ("last" in pl) + ("all" in pl) - ("last" in pl and "all" in pl and d == 1)
            patterns = off + ratios * on_sets
        total += base * patterns
    return total


def _describe(conditions: Sequence[Condition]) -> str:
    return " and ".join(f"{c.parent} in {list(c.values)}" for c in conditions)


# --- loading --------------------------------------------------------------------------------------


def _find_file(path: str | os.PathLike[str]) -> Path:
    """A path as given, else a shipped space by bare name (``aanas.search_spaces``)."""
    file = Path(path)
    if file.is_file():
        return file
    name = str(path)
    if re.fullmatch(r"[A-Za-z0-9_\-]+(\.yaml)?", name):
        stem = name.removesuffix(".yaml")
        shipped = Path(str(importlib.resources.files("aanas.search_spaces") / f"{stem}.yaml"))
        if shipped.is_file():
            return shipped
        known = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
        raise SpaceError(
            f"{name}: no such file and no shipped space of that name; shipped: {known}"
        )
    raise SpaceError(f"{name}: no such search-space file")


class _Loader:
    """Parses the YAML mapping; every error is one line naming file, key path and value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: Any, why: str) -> SpaceError:
        return SpaceError(f"{self.source}: {key}: {why} (got {value!r})")

    def load(self, data: Any) -> SearchSpace:
        if not isinstance(data, Mapping):
            raise SpaceError(f"{self.source}: expected a mapping at the top level")
        self.check_keys("", data, _TOP_KEYS + ("stages",))
        if "base" not in data:
            raise SpaceError(f"{self.source}: base: missing (a model name or a spec string)")
        base = self.base(data["base"])
        changes: dict[str, Any] = {}
        for key in ("input_size", "num_classes"):
            if key in data:
                changes[key] = self.integer(key, data[key], 1)
        if "dropout" in data:
            changes["dropout"] = self.number("dropout", data["dropout"], 0.0, 1.0, hi_open=True)
        widths: tuple[float, ...] | None = None
        if "width" in data:
            widths = tuple(
                float(self.number(f"width[{i}]", w, 0.0, math.inf, lo_open=True))
                for i, w in enumerate(self.choice_list("width", data["width"]))
            )
            changes["width"] = widths[0]
        base = dataclasses.replace(base, **changes)
        try:
            base.validate()
        except ValueError as exc:
            raise SpaceError(f"{self.source}: base (with overrides): {exc}") from None
        # every width, even where no stage is searched (the probes only cover searched stages)
        for i, width in enumerate(widths or ()):
            try:
                dataclasses.replace(base, width=width).validate()
            except ValueError as exc:
                raise SpaceError(f"{self.source}: width[{i}]: {exc}") from None
        stages_data = data.get("stages") or {}
        if not isinstance(stages_data, Mapping):
            raise self.fail("stages", stages_data, "must be a mapping keyed by stage index")
        stages = []
        for key in sorted(stages_data, key=str):
            index = key
            if isinstance(index, bool) or not isinstance(index, int):
                raise self.fail(f"stages.{key}", key, "stage keys must be integer indices")
            if not 0 <= index < len(base.stages):
                raise self.fail(f"stages.{key}", key, f"base has stages 0..{len(base.stages) - 1}")
            stages.append(self.stage(base, index, stages_data[key]))
        stages.sort(key=lambda s: s.index)
        name = data.get("name", Path(self.source).stem)
        if not isinstance(name, str) or not name:
            raise self.fail("name", name, "must be a non-empty string")
        space = SearchSpace(name, base, stages, widths, source=self.source)
        self.check_combinations(space)
        return space

    # -- pieces --------------------------------------------------------------------------------

    def base(self, value: Any) -> ArchSpec:
        if not isinstance(value, str) or not value:
            raise self.fail("base", value, "must be a model name or a spec string")
        if ":" in value:
            try:
                return _spec.decode(value)
            except ValueError as exc:
                raise SpaceError(f"{self.source}: base: {exc}") from None
        from aanas.models import get_spec, list_models  # lazy: imports torch

        if value not in list_models():
            raise self.fail("base", value, "unknown model name; see aanas.list_models()")
        base: ArchSpec = get_spec(value)
        return base

    def check_keys(self, where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for key in data:
            if key not in allowed:
                # a key with a newline or an empty key would break the one-line message
                text = str(key) if str(key).isprintable() and str(key) else repr(key)
                path = f"{where}.{text}" if where else text
                raise self.fail(path, key, f"unknown key; expected one of {list(allowed)}")

    def choice_list(self, key: str, value: Any) -> list[Any]:
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not items:
            raise self.fail(key, value, "empty choice list")
        if len(items) > _MAX_CHOICES:
            raise self.fail(key, f"<{len(items)} choices>", f"at most {_MAX_CHOICES} choices")
        for i, item in enumerate(items):
            if any(_same(item, other) for other in items[:i]):
                raise self.fail(key, value, f"duplicate choice {item!r}")
        return items

    def integer(self, key: str, value: Any, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, value, f"must be an integer >= {low}")
        if high is not None and value > high:
            raise self.fail(key, value, f"must be an integer in [{low}, {high}]")
        return value

    def number(
        self,
        key: str,
        value: Any,
        low: float,
        high: float,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            ok = (value > low if lo_open else value >= low) and (
                value < high if hi_open else value <= high
            )
        if not ok:
            interval = f"{'(' if lo_open else '['}{low}, {high}{')' if hi_open else ']'}"
            raise self.fail(key, value, f"must be a number in {interval}")
        return float(value)

    def choices(self, key: str, value: Any, check: Any) -> tuple[Any, ...]:
        return tuple(check(f"{key}", v) for v in self.choice_list(key, value))

    def stage(self, base: ArchSpec, index: int, data: Any) -> _StageChoices:
        where = f"stages.{index}"
        if not isinstance(data, Mapping):
            raise self.fail(where, data, "must be a mapping of choices")
        self.check_keys(where, data, _STAGE_KEYS)
        layers = tuple(_expand(base.stages[index]))
        depth_range = None
        if "depth" in data and isinstance(data["depth"], Mapping):
            rng = data["depth"]
            self.check_keys(f"{where}.depth", rng, ("low", "high", "step"))
            low = self.integer(f"{where}.depth.low", rng.get("low"), 1, _MAX_DEPTH)
            high = self.integer(f"{where}.depth.high", rng.get("high"), low, _MAX_DEPTH)
            step = self.integer(f"{where}.depth.step", rng.get("step", 1), 1, _MAX_DEPTH)
            depth_range = (low, high, step)
            depth = tuple(range(low, high + 1, step))
        elif "depth" in data:
            depth = self.choices(
                f"{where}.depth", data["depth"], lambda k, v: self.integer(k, v, 1, _MAX_DEPTH)
            )
        else:
            depth = (len(layers),)
        per_block = data.get("per_block", False)
        if not isinstance(per_block, bool):
            raise self.fail(f"{where}.per_block", per_block, "must be true or false")

        def kernel(k: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise self.fail(k, v, "kernel must be an odd integer >= 1")
            return v

        def expansion(k: str, v: Any) -> float:
            return self.number(k, v, 0.0, math.inf, lo_open=True)

        def se(k: str, v: Any) -> float:
            return self.number(k, v, 0.0, 1.0, hi_open=True)

        checks = {"kernel": kernel, "expansion": expansion, "se": se}
        fields: dict[str, Any] = {}
        for key, check in checks.items():
            fields[key] = self.choices(f"{where}.{key}", data[key], check) if key in data else None
        aa = self.aa(f"{where}.aa", data["aa"]) if "aa" in data else None
        return _StageChoices(
            index=index,
            layers=layers,
            depth=depth,
            depth_range=depth_range,
            per_block=per_block,
            aa=aa,
            **fields,
        )

    def aa(self, where: str, data: Any) -> _AAChoices:
        if not isinstance(data, Mapping):
            raise self.fail(where, data, "must be a mapping of attention choices")
        self.check_keys(where, data, _AA_KEYS)

        def placement(k: str, v: Any) -> str:
            if v not in PLACEMENTS:
                raise self.fail(k, v, f"placement must be one of {list(PLACEMENTS)}")
            return str(v)

        def ratio(k: str, v: Any) -> float:
            return self.number(k, v, 0.0, 1.0, lo_open=True)

        def heads(k: str, v: Any) -> int:
            return self.integer(k, v, 1)

        def relative(k: str, v: Any) -> bool:
            if not isinstance(v, bool):
                raise self.fail(k, v, "must be true or false")
            return v

        def mode(k: str, v: Any) -> str:
            if v not in _spec.AA_MODES:
                raise self.fail(k, v, f"mode must be one of {list(_spec.AA_MODES)}")
            return str(v)

        placements = self.choices(f"{where}.placement", data.get("placement", "all"), placement)
        modes = self.choices(f"{where}.mode", data.get("mode", "spatial"), mode)
        needs_ratios = any(p != "none" for p in placements)
        values: dict[str, Any] = {}
        for key, check, default in (
            ("kappa", ratio, None),
            ("upsilon", ratio, None),
            ("heads", heads, None),
            ("relative", relative, True),
        ):
            if key in data:
                values[key] = self.choices(f"{where}.{key}", data[key], check)
            elif default is not None or not needs_ratios:
                values[key] = (default,) if default is not None else (0.0 if key != "heads" else 1,)
            else:
                raise SpaceError(f"{self.source}: {where}.{key}: missing (placement {placements})")
        mkd = self.integer(f"{where}.min_key_depth", data.get("min_key_depth", 0), 0)
        return _AAChoices(placement=placements, min_key_depth=mkd, mode=modes, **values)

    # -- exhaustive validity check -----------------------------------------------------------

    def check_combinations(self, space: SearchSpace) -> None:
        """Resolve every choice of every stage (attention: every ratio x expansion combination).

        A stage's blocks depend on the other stages only through their fixed output channels,
        so checking each stage's combinations at its maximum depth, for every width, covers
        the whole product without enumerating it (see :func:`_variant_probes`).
        """
        count = _probe_count(space)
        if count > _MAX_PROBES:
            raise SpaceError(
                f"{self.source}: stages: the choices give {count} (width, stage, kernel, "
                f"expansion, se, attention) combinations to check; at most {_MAX_PROBES}"
            )
        for probe, key, what in _variant_probes(space):
            try:
                probe.validate()
            except ValueError as exc:
                raise SpaceError(
                    f"{self.source}: {key}: choices {{{what}}} give an invalid block: {exc}"
                ) from None


def _probe_count(space: SearchSpace) -> int:
    """How many specs :func:`_variant_probes` yields, counted without building them."""
    total = 0
    for st in space._stages:
        combos = 1
        if st.aa is not None and any(p != "none" for p in st.aa.placement):
            combos = math.prod(len(c) for c in (st.aa.kappa, st.aa.upsilon, st.aa.heads))
            combos *= len(st.aa.relative)
        for choices in (st.kernel, st.expansion, st.se):
            combos *= len(choices) if choices else 1
        total += combos
    return total * len(space._widths or (space.base.width,))


def _variant_probes(space: SearchSpace) -> Iterator[tuple[ArchSpec, str, str]]:
    """Specs that together hold every block variant of the space, with a key path and a note.

    One probe per (width, stage, kernel, expansion, SE, attention ratios): that stage at its
    maximum depth with the choice applied to all its blocks, the other stages as in the base.
    """
    widths = space._widths or (space.base.width,)
    for width in widths:
        for st in space._stages:
            where = f"stages.{st.index}"
            combos: list[AASpec | None] = [None]
            if st.aa is not None and any(p != "none" for p in st.aa.placement):
                combos = list(st.aa.combos())
            for k, e, s, a in itertools.product(
                st.kernel or (None,), st.expansion or (None,), st.se or (None,), combos
            ):
                changes: dict[str, Any] = {}
                for name, v in (("kernel", k), ("expansion", e), ("se", s)):
                    if v is not None:
                        changes[name] = v
                if st.aa is not None:
                    changes["aa"] = a
                layers = [dataclasses.replace(st.layer(j), **changes) for j in range(max(st.depth))]
                stages = list(space.base.stages)
                stages[st.index] = tuple(layers)
                probe = dataclasses.replace(space.base, stages=tuple(stages), width=width)
                what = ", ".join(f"{n}={v}" for n, v in changes.items() if n != "aa")
                key = where
                if a is not None:
                    key = f"{where}.aa"
                    what += (", " if what else "") + (
                        f"kappa={a.kappa}, upsilon={a.upsilon}, heads={a.heads}, mode={a.mode}"
                    )
                if space._widths is not None:
                    what += f", width={width}"
                yield probe, key, what
