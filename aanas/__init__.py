"""aanas: attention-augmented neural architecture search and mobile models.

Implements the attention-augmented convolution of Bello et al., *Attention Augmented
Convolutional Networks* (ICCV 2019, arXiv:1904.09925), MnasNet/ResNet/Wide-ResNet backbones built
from one frozen architecture spec, search spaces over attention placement and ratios, cost models
and search engines.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
