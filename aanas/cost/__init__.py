"""Cost models of aanas networks: params, MACs/FLOPs and latency (measured or predicted).

Every cost takes a spec (plus input size) so results can be cached; see :mod:`aanas.cost.flops`
for the MAC counting convention (Bello et al., arXiv:1904.09925, count FLOPs = 2 x MACs) and
:mod:`aanas.cost.latency` for measurement and the per-block latency table.
"""

from __future__ import annotations

from aanas.cost.flops import (
    Cost,
    aa_conv_cost,
    block_cost,
    count,
    count_module,
    count_spec,
    reference_macs,
)
from aanas.cost.latency import (
    CLOCKS,
    STATS,
    LatencyResult,
    LatencyTable,
    block_kind,
    block_signature,
    cache_dir,
    machine_fingerprint,
    measure,
    measure_onnx,
    robust_ms,
    time_interleaved,
)

__all__ = [
    "CLOCKS",
    "STATS",
    "Cost",
    "LatencyResult",
    "LatencyTable",
    "aa_conv_cost",
    "block_cost",
    "block_kind",
    "block_signature",
    "cache_dir",
    "count",
    "count_module",
    "count_spec",
    "machine_fingerprint",
    "measure",
    "measure_onnx",
    "reference_macs",
    "robust_ms",
    "time_interleaved",
]
