"""When iterative pre-copy should stop pre-dumping and do the final dump.

The rules follow P.Haul's and LXD's: keep pre-dumping while each iteration transfers less than the
one before; stop when an iteration was small enough (the final dump's downtime will be short),
when the dirty set stops shrinking (the process dirties memory as fast as we copy it: more
iterations only burn bandwidth), or after a maximum number of iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidOptionError

__all__ = ["PreCopyPolicy", "PreCopyDecision"]


@dataclass(frozen=True)
class PreCopyDecision:
    """Whether to run another pre-dump, and why (the reason lands in the report)."""

    another: bool
    reason: str


@dataclass(frozen=True)
class PreCopyPolicy:
    """Convergence rules of iterative pre-copy.

    Attributes:
        max_iterations: pre-dumps at most (the final dump comes on top). P.Haul: 8.
        min_pages: an iteration that wrote at most this many pages is small enough: stop.
            P.Haul: 64.
        max_growth: stop when an iteration wrote more than ``(1 + max_growth)`` times the pages
            of the previous one (the dirty rate outruns the copy). P.Haul stops at +10 %.
        min_iterations: pre-dumps to do in any case (the first one copies everything).
    """

    max_iterations: int = 8
    min_pages: int = 64
    max_growth: float = 0.10
    min_iterations: int = 1

    def __post_init__(self) -> None:
        for name in ("max_iterations", "min_pages", "min_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidOptionError(f"PreCopyPolicy.{name}={value!r} is invalid: expected an integer >= 0")
        if self.max_iterations < 1:
            raise InvalidOptionError("PreCopyPolicy.max_iterations must be at least 1")
        if self.min_iterations > self.max_iterations:
            raise InvalidOptionError("PreCopyPolicy.min_iterations cannot exceed max_iterations")
        if not isinstance(self.max_growth, (int, float)) or isinstance(self.max_growth, bool) or self.max_growth < 0:
            raise InvalidOptionError(f"PreCopyPolicy.max_growth={self.max_growth!r} is invalid: "
                                     "expected a fraction >= 0 (0.1 = 10 %)")

    def decide(self, pages_written: Sequence[int]) -> PreCopyDecision:
        """Given the pages written by each pre-dump so far, decide whether to pre-dump again."""
        done = len(pages_written)
        if any(not isinstance(p, int) or p < 0 for p in pages_written):
            raise ValueError("pages_written must be non-negative integers")
        if done < self.min_iterations:
            return PreCopyDecision(True, f"iteration {done + 1}: below min_iterations={self.min_iterations}")
        last = pages_written[-1]
        if last <= self.min_pages:
            return PreCopyDecision(False, f"converged: iteration {done} wrote {last} pages "
                                          f"(<= min_pages={self.min_pages})")
        if done >= 2:
            previous = pages_written[-2]
            if previous > 0 and last > previous * (1 + self.max_growth):
                growth = (last - previous) / previous
                return PreCopyDecision(False, f"not converging: iteration {done} wrote {last} pages, "
                                              f"{growth:+.0%} over the previous {previous} "
                                              f"(> max_growth={self.max_growth:.0%})")
        if done >= self.max_iterations:
            return PreCopyDecision(False, f"reached max_iterations={self.max_iterations} "
                                          f"(last iteration wrote {last} pages)")
        return PreCopyDecision(True, f"iteration {done} wrote {last} pages: pre-dump again")
