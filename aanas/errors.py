"""The error types aanas raises for bad user input.

Every error that a user can cause (a spec string, a search-space or recipe YAML, a ``--set``
override, a checkpoint file, an output path) is an :class:`AanasError`. Each is a ``ValueError``,
so existing ``except ValueError`` code keeps working, and its message is one line that names the
field or file and the bad value. The CLI prints it as ``aanas: error: <message>`` and exits 2; any
other exception is a bug in aanas, which is what the fuzz tests check.
"""

from __future__ import annotations

__all__ = [
    "AanasError",
    "CheckpointError",
    "OutputPathError",
    "RecipeError",
    "SpaceError",
    "SpecError",
]


class AanasError(ValueError):
    """Base class: bad input from a user, reported as one line naming the field and value."""


class SpecError(AanasError):
    """An architecture spec (string, dict or YAML) that cannot be decoded, validated or built."""


class SpaceError(AanasError):
    """A search-space YAML that is malformed or names an impossible choice."""


class RecipeError(AanasError):
    """A recipe YAML or ``--set`` override with an unknown key or a value of the wrong type."""


class CheckpointError(AanasError):
    """A checkpoint file that is missing, empty, truncated or not an aanas checkpoint."""


class OutputPathError(AanasError):
    """An output path that cannot be written (a file where a folder is needed, read-only, ...)."""
