"""Name -> ArchSpec registry of the named architectures (``mnasnet_a1_100``, ``aa_resnet50``).

The registry maps names to spec *data*, not to constructor functions: a width variant is
``spec.scale(width=0.75)`` registered under its own name, and ``create_model`` builds any
registered or ad-hoc spec the same way. Family modules register their specs at import time
(the only import-time side effect the style guide allows).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from aanas.spec import ArchSpec

__all__ = ["get_spec", "list_models", "register_arch"]

_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, spec: ArchSpec) -> ArchSpec:
    """Registers ``spec`` under ``name`` after validating it.

    Args:
        name: unique architecture name; must not contain ``':'`` (that marks a spec string).
        spec: the architecture.

    Returns:
        ``spec``, so module-level constants can be registered inline.

    Raises:
        ValueError: if the name is empty, contains ``':'``, or is already registered.
        TypeError: if ``spec`` is not an ArchSpec.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"architecture name must be a non-empty string without ':', got {name!r}")
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec for {name!r} must be an ArchSpec, got {type(spec).__name__}")
    if name in _ARCHS:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHS[name] = spec.validate()
    return spec


def _patterns(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"a*" -> ("a*",)``; sequences pass through."""
    return (value,) if isinstance(value, str) else tuple(value)


def list_models(pattern: str | Sequence[str] = "*", exclude: str | Sequence[str] = ()) -> list[str]:
    """Sorted registered names matching any ``pattern`` and no ``exclude`` (fnmatch globs).

    Example: ``list_models("*resnet*", exclude="aa_*")`` lists the plain ResNets.
    """
    include, skip = _patterns(pattern), _patterns(exclude)
    return sorted(
        name
        for name in _ARCHS
        if any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in skip)
    )


def get_spec(name: str) -> ArchSpec:
    """The spec registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    try:
        return _ARCHS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ARCHS), n=5, cutoff=0.5)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(
            f"unknown architecture {name!r}{hint} (list_models() shows all "
            f"{len(_ARCHS)} registered names)"
        ) from None
