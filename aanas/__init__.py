"""aanas: attention-augmented neural architecture search and mobile models.

Implements the attention-augmented convolution of Bello et al., *Attention Augmented
Convolutional Networks* (ICCV 2019, arXiv:1904.09925), MnasNet/ResNet/Wide-ResNet backbones built
from one frozen architecture spec, search spaces over attention placement and ratios, cost models
and search engines.
"""

from __future__ import annotations

from typing import Any

from aanas.space import SearchSpace
from aanas.spec import ArchSpec

__version__ = "0.1.0"

__all__ = ["ArchSpec", "SearchSpace", "__version__", "create_model", "list_models"]


def __getattr__(name: str) -> Any:
    """Lazy ``create_model``/``list_models``: ``import aanas`` (and aanas.spec) stays torch-free."""
    if name in ("create_model", "list_models"):
        from aanas import models

        return getattr(models, name)
    raise AttributeError(f"module 'aanas' has no attribute {name!r}")
