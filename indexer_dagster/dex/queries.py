"""The DEX tables' query helpers: pool state, candles, volume and swaps of the `dex` views."""

from __future__ import annotations

from typing import Any

import polars as pl

from indexer_dagster.persist.datasets import CANDLE_INTERVALS, VOLUME_INTERVALS
from indexer_dagster.query.api import CatalogReader, Where, address_param, check_status, int_param, time_param


class DexQueries(CatalogReader):
    """Helpers over the DEX views (`indexer_dagster.connect()` returns an `Indexer` that has them)."""

    def pool_state(
        self, pool: str | None = None, min_status: str = "unconfirmed", *, chain_id: int | None = None
    ) -> pl.DataFrame:
        """Latest reserves and spot price of one pool (None: of every pool), ordered by (chain_id, pool)."""
        check_status(min_status)
        w = _pool_filter(pool, chain_id)
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, "pool_state")
            w.status(min_status, "pool_state", cols)
            return self._select(con, "pool_state", w, ["chain_id", "pool"])

    def candles(
        self,
        pool: str,
        interval: str = "1h",
        start: Any = None,
        end: Any = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """OHLC price candles of one pool with ``start <= bucket_start < end`` (None = unbounded),
        ordered by (chain_id, bucket_start). Times: datetime (naive = UTC), date, ISO string or
        Unix seconds. Buckets without swaps are absent."""
        return self._buckets("pool_candles", pool, interval, CANDLE_INTERVALS, start, end, min_status, chain_id,
                             pool_required=True)

    def volume(
        self,
        pool: str | None = None,
        interval: str = "1d",
        start: Any = None,
        end: Any = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """Swap count and volume per bucket of one pool (None: of every pool) with
        ``start <= bucket_start < end``, ordered by (chain_id, pool, bucket_start)."""
        return self._buckets("pool_volume", pool, interval, VOLUME_INTERVALS, start, end, min_status, chain_id,
                             pool_required=False)

    def swaps(
        self,
        pool: str | None = None,
        from_block: int | None = None,
        to_block: int | None = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """Swaps of one pool (None: of every pool) in blocks ``from_block..to_block`` (inclusive),
        ordered by (chain_id, block_number, log_index)."""
        check_status(min_status)
        w = _pool_filter(pool, chain_id)
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, "swaps")
            self._block_range(w, "swaps", cols, from_block, to_block)
            w.status(min_status, "swaps", cols)
            return self._select(con, "swaps", w, ["chain_id", "block_number", "log_index"])

    def _buckets(
        self,
        view: str,
        pool: str | None,
        interval: str,
        allowed: tuple[str, ...],
        start: Any,
        end: Any,
        min_status: str,
        chain_id: int | None,
        pool_required: bool,
    ) -> pl.DataFrame:
        check_status(min_status)
        if interval not in allowed:
            raise ValueError(f"interval must be one of {', '.join(map(repr, allowed))} for {view}; got {interval!r}")
        w = Where()
        if pool is not None or pool_required:
            w.add("pool = ?", address_param(pool, "pool"))
        w.add('"interval" = ?', interval)
        lo, hi = time_param(start, "start"), time_param(end, "end")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"start ({lo.isoformat()}) is after end ({hi.isoformat()})")
        if lo is not None:
            w.add("bucket_start >= ?", lo)
        if hi is not None:
            w.add("bucket_start < ?", hi)
        if chain_id is not None:
            w.add("chain_id = ?", int_param(chain_id, "chain_id"))
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, view)
            w.status(min_status, view, cols)
            order = ["chain_id", "bucket_start"] if pool_required else ["chain_id", "pool", "bucket_start"]
            return self._select(con, view, w, order)


def _pool_filter(pool: str | None, chain_id: int | None) -> Where:
    """The optional pool and chain conditions shared by the pool helpers."""
    w = Where()
    if pool is not None:
        w.add("pool = ?", address_param(pool, "pool"))
    if chain_id is not None:
        w.add("chain_id = ?", int_param(chain_id, "chain_id"))
    return w
