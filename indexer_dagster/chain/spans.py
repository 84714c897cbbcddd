"""Adaptive block spans for eth_getLogs, and exact splitting of block ranges.

`RangeSizer` keeps one block span shared by every request of a backfill:

* range errors shrink it: to the provider's suggested range or declared maximum when the error
  carried one, else to half the span that failed (never below 1, nor below ``minimum`` unless the
  provider's own maximum is smaller: a request above that can never succeed);
* a response holding far more logs than ``target_logs`` shrinks it towards the span that would
  have held ``target_logs`` at that density;
* repeated timeouts halve it (``on_timeout``);
* a success well under ``target_logs`` at the current span grows it by ``grow_factor`` (×1.25).
  Many concurrent successes at the same span grow it once, not once each: growth counts only for
  requests that used at least the current span.

Growth stops at ``maximum``, at a provider-declared maximum (kept for the sizer's life), and just
below the last span that failed with a size error (forgotten after ``relax_after`` successes, since
log density changes along the chain).

All methods are plain synchronous code with no awaits, so many asyncio tasks can share one sizer;
the result depends only on the order of calls.
"""

from __future__ import annotations

import math
import operator

from indexer_dagster.chain.errors import RpcErrorInfo

__all__ = ["RangeSizer", "split_range"]


class RangeSizer:
    """Adaptive eth_getLogs block span; see the module docstring."""

    def __init__(
        self,
        initial: int = 1000,
        minimum: int = 1,
        maximum: int = 100_000,
        target_logs: int = 2000,
        *,
        grow_factor: float = 1.25,
        grow_below: float = 0.5,
        shrink_above: float = 2.0,
        timeouts_before_shrink: int = 2,
        relax_after: int = 64,
    ) -> None:
        initial, minimum, maximum = operator.index(initial), operator.index(minimum), operator.index(maximum)
        target_logs = operator.index(target_logs)
        if minimum < 1:
            raise ValueError("minimum must be at least 1 block")
        if maximum < minimum:
            raise ValueError("maximum must be at least minimum")
        if target_logs < 1:
            raise ValueError("target_logs must be at least 1")
        if not grow_factor > 1:
            raise ValueError("grow_factor must be above 1")
        if not 0 < grow_below <= 1:
            raise ValueError("grow_below must be in (0, 1]")
        if not shrink_above >= 1:
            raise ValueError("shrink_above must be at least 1")
        if timeouts_before_shrink < 1 or relax_after < 1:
            raise ValueError("timeouts_before_shrink and relax_after must be at least 1")
        self.minimum = minimum
        self.maximum = maximum
        self.target_logs = target_logs
        self.grow_factor = grow_factor
        self.grow_below = grow_below
        self.shrink_above = shrink_above
        self.timeouts_before_shrink = timeouts_before_shrink
        self.relax_after = relax_after
        self._hard_cap: int | None = None  # the provider's declared maximum span
        self._soft_cap: int | None = None  # just below the last span that was too large
        self._successes_since_error = 0
        self._timeouts = 0
        self._span = max(minimum, min(initial, maximum))

    # -- state ---------------------------------------------------------------------------------

    @property
    def span(self) -> int:
        """The block span (inclusive count) to use for the next request."""
        return self._span

    @property
    def provider_max_span(self) -> int | None:
        """The smallest block-span maximum a provider has declared, if any."""
        return self._hard_cap

    @property
    def floor(self) -> int:
        """The smallest span the sizer will use: ``minimum``, or less if the provider demands it."""
        return self.minimum if self._hard_cap is None else min(self.minimum, self._hard_cap)

    @property
    def ceiling(self) -> int:
        """The largest span growth may reach now."""
        c = self.maximum
        if self._hard_cap is not None:
            c = min(c, self._hard_cap)
        if self._soft_cap is not None:
            c = min(c, self._soft_cap)
        return max(c, self.floor)

    def _set(self, value: int) -> None:
        self._span = max(self.floor, min(value, self.ceiling))

    # -- events --------------------------------------------------------------------------------

    def on_success(self, span_used: int, n_logs: int) -> None:
        """A request over ``span_used`` blocks returned ``n_logs`` logs."""
        span_used, n_logs = operator.index(span_used), operator.index(n_logs)
        if span_used < 1 or n_logs < 0:
            raise ValueError("span_used must be >= 1 and n_logs >= 0")
        self._timeouts = 0
        self._successes_since_error += 1
        if self._soft_cap is not None and self._successes_since_error >= self.relax_after:
            self._soft_cap = None
        if n_logs > self.target_logs * self.shrink_above:
            # Aim at target_logs for the density just seen.
            proposed = max(1, span_used * self.target_logs // n_logs)
            if proposed < self._span:
                self._set(proposed)
        elif n_logs <= self.target_logs * self.grow_below and span_used >= self._span:
            grown = max(self._span + 1, math.ceil(self._span * self.grow_factor))
            self._set(grown)

    def on_range_error(self, info: RpcErrorInfo, from_block: int, to_block: int) -> int:
        """[from_block, to_block] was refused as too large; returns the span to split it with.

        Uses the error's suggested range (its end, counted from ``from_block``) or its declared
        block maximum; otherwise halves. The result is below the failed span unless the failed
        span was already at the floor (a single block cannot be split). The shared span is
        lowered to it as well.
        """
        from_block, to_block = operator.index(from_block), operator.index(to_block)
        failed = to_block - from_block + 1
        if failed < 1:
            raise ValueError("to_block must be >= from_block")
        self._timeouts = 0
        self._successes_since_error = 0

        retry: int | None = None
        if info.max_block_span is not None and info.max_block_span >= 1:
            cap = int(info.max_block_span)
            self._hard_cap = cap if self._hard_cap is None else min(self._hard_cap, cap)
            retry = cap
        if info.suggested_range is not None:
            a, b = info.suggested_range
            if b >= a:
                s = b - from_block + 1 if a <= from_block <= b else b - a + 1
                retry = s if retry is None else min(retry, s)
        if retry is None or retry >= failed:
            retry = max(1, failed // 2)  # no hint, or a hint that would not shrink this request: halve
        if failed > 1 and (info.max_block_span is None or failed <= info.max_block_span):
            # A size limit (results, bytes, time), not the declared span limit: do not grow back
            # to the span that failed until the log density has had time to change.
            self._soft_cap = failed - 1 if self._soft_cap is None else min(self._soft_cap, failed - 1)

        retry = min(failed, max(self.floor, retry))
        if retry < self._span:
            self._set(retry)
        return retry

    def on_timeout(self, span_used: int) -> None:
        """A request over ``span_used`` blocks timed out; repeated timeouts halve the span."""
        span_used = operator.index(span_used)
        if span_used < 1:
            raise ValueError("span_used must be >= 1")
        self._timeouts += 1
        if self._timeouts >= self.timeouts_before_shrink:
            self._timeouts = 0
            proposed = max(1, span_used // 2)
            if proposed < self._span:
                self._set(proposed)

    def next_range(self, from_block: int, to_block: int) -> tuple[int, int]:
        """The first request of [from_block, to_block] at the current span."""
        if to_block < from_block:
            raise ValueError("to_block must be >= from_block")
        return from_block, min(to_block, from_block + self._span - 1)

    def __repr__(self) -> str:
        return (
            f"RangeSizer(span={self._span}, floor={self.floor}, ceiling={self.ceiling}, "
            f"provider_max_span={self._hard_cap}, target_logs={self.target_logs})"
        )


def split_range(from_block: int, to_block: int, span: int) -> list[tuple[int, int]]:
    """Inclusive (start, end) pieces of at most ``span`` blocks covering [from_block, to_block]
    exactly, in order, without overlap. An empty list when ``from_block > to_block``."""
    from_block, to_block, span = operator.index(from_block), operator.index(to_block), operator.index(span)
    if span < 1:
        raise ValueError("span must be at least 1 block")
    if from_block < 0:
        raise ValueError("block numbers are not negative")
    if from_block > to_block:
        return []
    return [(s, min(s + span - 1, to_block)) for s in range(from_block, to_block + 1, span)]
