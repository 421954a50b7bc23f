"""Where attention goes in AA-MnasNet-A1: candidates, their exact cost, and the preset's choice.

Bello et al. (arXiv:1904.09925, Sec. 4.3) augment "the inverted bottlenecks of the last 13
blocks" of MnasNet, starting at 28x28, and report about 3.9M -> 4.1M parameters at width 1.0
(figures we could not check offline), but not which convolution of the bottleneck attention
augments. ``aanas.block_types`` offers three modes (``spatial``: the depthwise conv, attention
reading the expanded tensor; ``expansion``: the 1x1 expansion, attention reading the narrow
block input; ``projection``: the 1x1 projection, attention reading the expanded tensor and its
maps joining the block output). This script costs candidates analytically
(:func:`aanas.cost.count_spec`, equal to thop and FlopCounterMode, see ``tests/test_cost.py``)
at 224x224 against MnasNet-A1 of the same width, and applies the preset's rule:

1. budget: at most +6 % parameters and +8 % MACs over MnasNet-A1, at every registered width;
2. ratios: the paper's kappa = 2 upsilon = 0.1 with Nh = 4 (as the existing presets read it);
3. coverage: attention on the longest tail of the last 13 blocks (13 = every block from the
   28x28 stage on; 10 = from 14x14; a run is split where the tail starts inside it) that the
   budget allows;
4. the mode with the most augmented blocks wins; ties go to fewer MACs.

Rows marked ``ref`` are reference points outside rule 2 (half the ratios, or other head counts).
The rule calibrates to the paper's stated parameter budget; the paper's placement itself could
not be checked.

Usage::

    python benchmarks/aa_placement_table.py
"""

from __future__ import annotations

from dataclasses import dataclass

from aanas.cost import count_spec
from aanas.errors import SpecError
from aanas.models import get_spec
from aanas.models.mnasnet import augment_tail
from aanas.spec import AA_MODES, AASpec, ArchSpec

BUDGET_PARAMS = 0.06
BUDGET_MACS = 0.08
WIDTHS = {"050": 0.5, "075": 0.75, "100": 1.0, "140": 1.4}  # aanas.models.mnasnet._A1_WIDTHS
PAPER_RATIOS = (0.1, 0.05, 4)  # kappa, upsilon, heads
TAIL = 13  # the paper's "last 13 blocks": MnasNet-A1's blocks from the 28x28 stage on


@dataclass(frozen=True)
class Candidate:
    """One placement: mode, ratios, heads and the number of augmented blocks at the end."""

    mode: str
    kappa: float
    upsilon: float
    heads: int
    blocks: int  # the last ``blocks`` of MnasNet-A1's 16 blocks

    def apply(self, spec: ArchSpec) -> ArchSpec:
        """``spec`` with this attention on its last :attr:`blocks` blocks."""
        aa = AASpec(self.kappa, self.upsilon, self.heads, True, 0, self.mode)
        return augment_tail(spec, self.blocks, aa)


def overhead(c: Candidate, width: float) -> tuple[int, int, float, float]:
    """``(params, MACs, params ratio - 1, MACs ratio - 1)`` against MnasNet-A1 at ``width``."""
    base = get_spec("mnasnet_a1_100").scale(width=width)
    plain, aug = count_spec(base), count_spec(c.apply(base))
    return aug.params, aug.macs, aug.params / plain.params - 1, aug.macs / plain.macs - 1


def fits(c: Candidate) -> bool:
    """Rule 1 at every registered width."""
    try:
        for w in WIDTHS.values():
            _, _, dp, dm = overhead(c, w)
            if dp > BUDGET_PARAMS or dm > BUDGET_MACS:
                return False
    except SpecError:
        return False
    return True


def choose() -> tuple[Candidate, list[Candidate]]:
    """The preset's candidate by the module docstring's rule, and each mode's best."""
    kappa, upsilon, heads = PAPER_RATIOS
    best: list[Candidate] = []
    for mode in AA_MODES:
        for blocks in range(TAIL, 0, -1):  # longest tail first
            c = Candidate(mode, kappa, upsilon, heads, blocks)
            if fits(c):
                best.append(c)
                break
    chosen = min(best, key=lambda c: (-c.blocks, overhead(c, 1.0)[1]))
    return chosen, best


def main() -> None:
    """Prints the candidate table (markdown, width 1.0) and the choice across widths."""
    chosen, best = choose()
    kappa, upsilon, heads = PAPER_RATIOS
    rows: list[tuple[Candidate, str]] = []
    for mode in AA_MODES:
        tails = {13, 10, 6, 1} | {c.blocks for c in best if c.mode == mode}
        for blocks in sorted(tails, reverse=True):
            rows.append((Candidate(mode, kappa, upsilon, heads, blocks), "rule"))
    for mode in AA_MODES:
        rows.append((Candidate(mode, kappa / 2, upsilon / 2, 2, 13), "ref"))
    n = chosen.blocks
    rows.append((Candidate(chosen.mode, kappa, upsilon, 1, n), "ref"))
    rows.append((Candidate(chosen.mode, kappa, upsilon, 8, n), "ref"))
    rows.append((Candidate(chosen.mode, 2 * kappa, 2 * upsilon, heads, n), "ref"))
    base = count_spec(get_spec("mnasnet_a1_100"))
    print(
        f"MnasNet-A1 (w1.0, 224 px): {base.params / 1e6:.3f}M params, {base.macs / 1e6:.1f}M MACs"
    )
    print(f"budget: <= +{BUDGET_PARAMS:.0%} params and <= +{BUDGET_MACS:.0%} MACs at every width\n")
    print("| mode | kappa | upsilon | Nh | blocks | params | vs A1 | MACs | vs A1 | fits | kind |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for c, kind in rows:
        try:
            params, macs, dp, dm = overhead(c, 1.0)
        except SpecError as exc:
            print(
                f"| {c.mode} | {c.kappa} | {c.upsilon} | {c.heads} | {c.blocks} | invalid: {exc} |"
            )
            continue
        mark = "**chosen**" if c == chosen else ("yes" if fits(c) else "no")
        print(
            f"| {c.mode} | {c.kappa:g} | {c.upsilon:g} | {c.heads} | {c.blocks} | "
            f"{params / 1e6:.3f}M | {dp:+.1%} | {macs / 1e6:.1f}M | {dm:+.1%} | {mark} | {kind} |"
        )
    print("\nlongest tail per mode under the rule (paper ratios):")
    for c in best:
        print(f"  {c.mode:<10} last {c.blocks:>2} blocks")
    print(
        f"\nchosen: mode={chosen.mode}, kappa={chosen.kappa:g}, upsilon={chosen.upsilon:g}, "
        f"Nh={chosen.heads}, last {chosen.blocks} blocks"
    )
    for tag, w in WIDTHS.items():
        params, macs, dp, dm = overhead(chosen, w)
        print(f"  w{tag}: {params / 1e6:.3f}M ({dp:+.1%}), {macs / 1e6:.1f}M MACs ({dm:+.1%})")


if __name__ == "__main__":
    main()
