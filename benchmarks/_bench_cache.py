"""Result cache shared by the benchmarks (``supernet_ranking.py``, ``search_vs_hand.py``).

Trainings cost minutes each on a CPU, so every benchmark that trains keeps its results in one
JSON file keyed by what determines them (spec digest, recipe digest, seed) and rewrites it
atomically (:func:`aanas._io.atomic_open`) after every new result: a rerun, or a run resumed
after a kill, trains only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aanas._io import atomic_open
from aanas.spec import ArchSpec

__all__ = ["ResultCache", "digest"]


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class ResultCache:
    """``{key: result}`` JSON file, rewritten atomically after every new result."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.entries = json.loads(path.read_text(encoding="utf-8"))

    @staticmethod
    def key(what: ArchSpec | str, recipe_digest: str, seed: int | None = None) -> str:
        """``<spec digest or name>-<recipe digest>[-s<seed>]`` (without a seed: the key format
        of the first ``supernet_ranking.py`` caches, which stay readable)."""
        ident = what.digest() if isinstance(what, ArchSpec) else what
        base = f"{ident}-{recipe_digest}"
        return base if seed is None else f"{base}-s{seed}"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result, or None."""
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` and rewrite the file atomically."""
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.path, "w", encoding="utf-8") as fh:
            json.dump(self.entries, fh, indent=1, sort_keys=True)
