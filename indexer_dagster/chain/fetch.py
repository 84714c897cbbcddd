"""Fetch a block range's headers and logs as typed frames, in block order, from one fork only.

The range is cut into chunks sized by the adaptive `RangeSizer`; several chunks are in flight at
once and come out in order, so a caller can stream them into one Parquet file with bounded memory.
Each chunk's logs are checked against its headers (same block hash per block, unbroken parent-hash
chain); a chunk that straddles a fork change is fetched again, and a fork change between chunks
raises `ForkChanged` so the caller restarts the range instead of mixing forks. Each chunk's logs are
also checked against the headers' `logsBloom` (and, in `double` mode, fetched twice): see `verify`.
"""

import asyncio
import io
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
import polars as pl

from indexer_dagster.chain.errors import RpcError, RpcErrorInfo, RpcErrorKind
from indexer_dagster.chain.rpc import RpcClient
from indexer_dagster.chain.spans import RangeSizer
from indexer_dagster.chain.verify import LogVerifier, Query, agree, parse_bloom, reconcile
from indexer_dagster.persist.datasets import BLOCK_SCHEMA, LOG_SCHEMA, in_log_order

MAX_ADDRESSES_PER_REQUEST = 500
# How often a logs-by-hash answer of "unknown block" is asked again (a load-balanced replica may lag by a
# block) before it counts as a changed fork: the block was reorganised away.
UNKNOWN_BLOCK_RETRIES = 2
_UNKNOWN_BLOCK = ("unknown block", "block not found", "header not found")
_CHUNK_ATTEMPTS = 5


class ForkChanged(RuntimeError):
    """The node switched forks while the range was being fetched; fetch the range again."""


@dataclass
class Chunk:
    from_block: int
    to_block: int
    blocks: pl.DataFrame
    logs: pl.DataFrame


def _hex(n: int) -> str:
    return hex(n)


def _hex_int(col: str) -> pl.Expr:
    return pl.col(col).str.slice(2).str.to_integer(base=16, dtype=pl.Int64)


# The fields of an eth_getLogs entry the lake keeps. Parsing against this schema skips polars' inference
# pass over the body (half the parse time); fields a node adds are ignored.
_LOG_JSON = pl.Struct({
    "address": pl.String, "topics": pl.List(pl.String), "data": pl.String, "blockHash": pl.String,
    "blockNumber": pl.String, "transactionHash": pl.String, "transactionIndex": pl.String, "logIndex": pl.String,
})
_LOGS_BODY = {"result": pl.List(_LOG_JSON)}
_REQUIRED = [f for f in _LOG_JSON.to_schema() if f != "topics"]


def parse_logs_body(body: bytes, chain_id: int) -> pl.DataFrame:
    """Turn an eth_getLogs response body into the log schema (without timestamps) in Rust, not per log.
    ValueError if a log lacks a field the lake keeps (the caller fetches the body again)."""
    if len(body) < 200:
        result = orjson.loads(body).get("result") or []
        if not result:
            return pl.DataFrame(schema={k: v for k, v in LOG_SCHEMA.items() if k != "block_timestamp"})
    raw = pl.read_json(io.BytesIO(body), schema=_LOGS_BODY).select(pl.col("result").explode()).unnest("result")
    if missing := [f for f in _REQUIRED if raw[f].has_nulls()]:
        raise ValueError(f"eth_getLogs answered logs without {', '.join(missing)}")
    low = _lower_case if _upper_case_hex(body) else lambda e: e
    topics = pl.col("topics")
    return raw.select(
        pl.lit(chain_id, pl.Int64).alias("chain_id"),
        _hex_int("blockNumber").alias("block_number"),
        low(pl.col("blockHash")).alias("block_hash"),
        low(pl.col("transactionHash")).alias("transaction_hash"),
        _hex_int("transactionIndex").alias("transaction_index"),
        _hex_int("logIndex").alias("log_index"),
        low(pl.col("address")).alias("address"),
        *[low(topics.list.get(i, null_on_oob=True)).alias(f"topic{i}") for i in range(4)],
        low(pl.col("data")).alias("data"),
    )


def _upper_case_hex(body: bytes) -> bool:
    """Whether the body holds an upper-case hex digit (or an "0X"). Nodes answer lower case, and the keys of
    an answer have none of these letters, so the lake's lower case is then the body's own: lower-casing
    every string is skipped (measured: up to a tenth of the parse)."""
    return any(c in body for c in b"ABCDEFX")


def _lower_case(e: pl.Expr) -> pl.Expr:
    return e.str.to_lowercase()


def parse_headers(results: Sequence[Mapping | None], numbers: Sequence[int], chain_id: int) -> pl.DataFrame:
    rows_n, rows_h, rows_p, rows_t, rows_b = [], [], [], [], []
    for n, block in zip(numbers, results, strict=True):
        if block is None:
            # A lagging node or a reorg in progress (anvil shows this too): not data, try again.
            raise ForkChanged(f"block {n} is not available on the node right now")
        rows_n.append(int(block["number"], 16))
        rows_h.append(block["hash"].lower())
        rows_p.append(block["parentHash"].lower())
        rows_t.append(int(block["timestamp"], 16) * 1_000_000)
        rows_b.append(block.get("logsBloom"))
    return pl.DataFrame(
        {"chain_id": [chain_id] * len(rows_n), "number": rows_n, "hash": rows_h, "parent_hash": rows_p,
         "timestamp": rows_t, "logs_bloom": rows_b},
        schema={**BLOCK_SCHEMA, "timestamp": pl.Int64, "logs_bloom": pl.String},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))


def address_groups(addresses: Sequence[str]) -> list[Sequence[str]]:
    """`addresses` cut into the groups one eth_getLogs request names (providers cap the list)."""
    return [addresses[i : i + MAX_ADDRESSES_PER_REQUEST] for i in range(0, len(addresses), MAX_ADDRESSES_PER_REQUEST)]


def _unknown_block(info: RpcErrorInfo) -> bool:
    return any(m in info.message.lower() for m in _UNKNOWN_BLOCK)


def _unknown_block_retries(info: RpcErrorInfo) -> int | None:
    return UNKNOWN_BLOCK_RETRIES if _unknown_block(info) else None


@contextmanager
def _unknown_block_is_a_fork_change(block: str) -> Iterator[None]:
    """An "unknown block" answer to a by-hash request: the block was reorganised away (or a replica has
    not seen it yet), a fork to re-check rather than an RPC failure."""
    try:
        yield
    except RpcError as e:
        if _unknown_block(e.info):
            raise ForkChanged(f"{block} is not on the node's chain (any more): {e.info.message}") from None
        raise


def _of_block(logs: pl.DataFrame, block_hash: str) -> pl.DataFrame:
    """`logs`, answered for the block `block_hash`; ForkChanged if any is of another block."""
    if logs.height and not (logs["block_hash"] == block_hash).all():
        raise ForkChanged("the node answered logs of another block")
    return logs


async def logs_by_hash(rpc: RpcClient, block_hash: str, addresses: Sequence[str], chain_id: int) -> pl.DataFrame:
    """The logs of `addresses` in one block, by its hash (EIP-234), parsed inside the client's retries (a
    truncated 200 body is fetched again). ForkChanged when the node does not know the block (any more) or
    answers logs of another block: a fork to re-check, not a failure."""
    with _unknown_block_is_a_fork_change(f"block {block_hash}"):
        frames = await asyncio.gather(*[
            rpc.call_raw("eth_getLogs", [{"blockHash": block_hash, "address": list(g)}],
                         parse=lambda b: parse_logs_body(b, chain_id), retries_for=_unknown_block_retries)
            for g in address_groups(addresses)
        ])
    return _of_block(pl.concat(frames, how="vertical") if frames else parse_logs_body(b'{"result":[]}', chain_id),
                     block_hash)


class RangeFetcher:
    """Fetches headers and the logs of `addresses` for block ranges; see the module docstring."""

    def __init__(
        self,
        rpc: RpcClient,
        chain_id: int,
        addresses: Sequence[str],
        sizer: RangeSizer,
        *,
        headers_batch_size: int = 100,
        address_starts: Mapping[str, int] | None = None,
        verifier: LogVerifier | None = None,
        verify_mode: str = "bloom",
    ) -> None:
        self.rpc = rpc
        self.chain_id = chain_id
        self.addresses = sorted({a.lower() for a in addresses})
        self.sizer = sizer
        self.headers_batch_size = headers_batch_size
        # Addresses whose logs count only from their own start block (per-contract start_block).
        self.address_starts = {a.lower(): s for a, s in (address_starts or {}).items()}
        # Missing-log detection (`chain.verify_logs`): "bloom", "double" (bloom + every answer twice), "off".
        self.verifier = verifier if verify_mode != "off" else None
        self.double = verify_mode == "double"

    async def head(self) -> int:
        return int(await self.rpc.call("eth_blockNumber"), 16)

    async def headers(self, from_block: int, to_block: int) -> pl.DataFrame:
        numbers = list(range(from_block, to_block + 1))
        batches = [numbers[i : i + self.headers_batch_size] for i in range(0, len(numbers), self.headers_batch_size)]
        results = await asyncio.gather(
            *[self.rpc.batch("eth_getBlockByNumber", [[_hex(n), False] for n in b]) for b in batches]
        )
        return pl.concat(
            [parse_headers(r, b, self.chain_id) for r, b in zip(results, batches, strict=True)], how="vertical"
        )

    def _parse(self, body: bytes) -> pl.DataFrame:
        return parse_logs_body(body, self.chain_id)

    async def _logs_once(self, from_block: int, to_block: int, addresses: Sequence[str]) -> pl.DataFrame:
        # Parsed in a worker thread (Polars releases the GIL: the event loop keeps reading the other
        # responses meanwhile), inside the client's retries: a truncated 200 body is fetched again.
        return await self.rpc.call_raw(
            "eth_getLogs",
            [{"fromBlock": _hex(from_block), "toBlock": _hex(to_block), "address": list(addresses)}],
            parse=self._parse,
        )

    async def logs_by_hash(self, block_hash: str) -> pl.DataFrame:
        """All logs of the addresses in one block, by its hash (EIP-234): of that block's fork only."""
        return (await logs_by_hash(self.rpc, block_hash, self.addresses, self.chain_id)).sort("log_index")

    async def verified(self, blocks: pl.DataFrame, logs: pl.DataFrame, again) -> pl.DataFrame:
        """`logs` of `blocks` (with `logs_bloom`) after missing-log detection; `again()` fetches them anew
        (double mode). Suspect blocks are fetched again by hash; raises `MissingLogs`."""
        if self.verifier is None:
            return logs
        stats = self.rpc.stats.errors
        if self.double:
            first, last = blocks["number"].min(), blocks["number"].max()
            logs = await agree(again, logs, stats, f"logs of blocks {first}-{last}")  # type: ignore[str-bytes-safe]  # polars stubs: min/max may be bytes; here Int64
        hashes = dict(zip(blocks["number"].to_list(), blocks["hash"].to_list(), strict=True))
        blooms = blooms_of(blocks)
        return await reconcile(self.verifier, blooms, logs, lambda n: self.logs_by_hash(hashes[n]), stats,
                               refetch_all=again, refetch_matching=lambda qs: self.matching_logs(qs, hashes))

    async def matching_logs(self, queries: list[Query], hashes: Mapping[int, str]) -> list[pl.DataFrame]:
        """For each (block, addresses, topic0s or None): those addresses' logs with those topic0s in that
        block, by its hash (EIP-234), all in one JSON-RPC batch: the narrow questions of the bloom check."""
        params = [[{"blockHash": hashes[n], "address": addresses, **({"topics": [topics]} if topics else {})}]
                  for n, addresses, topics in queries]
        with _unknown_block_is_a_fork_change("a block"):
            results = await self.rpc.batch("eth_getLogs", params)
        return [_of_block(parse_logs_body(orjson.dumps({"result": result or []}), self.chain_id), hashes[n])
                for (n, _a, _t), result in zip(queries, results, strict=True)]

    async def logs(self, from_block: int, to_block: int) -> pl.DataFrame:
        """Logs of all addresses in [from_block, to_block], splitting the range when the node says it is too big."""
        groups = address_groups(self.addresses)
        frames = await asyncio.gather(*[self._logs_split(from_block, to_block, g) for g in groups])
        out = pl.concat(frames, how="vertical") if frames else parse_logs_body(b'{"result":[]}', self.chain_id)
        return out.sort("block_number", "log_index") if len(groups) > 1 else out

    async def _logs_split(self, from_block: int, to_block: int, addresses: Sequence[str]) -> pl.DataFrame:
        try:
            df = await self._logs_once(from_block, to_block, addresses)
        except RpcError as e:
            if e.info.kind is not RpcErrorKind.RANGE_TOO_LARGE or from_block == to_block:
                raise
            span = self.sizer.on_range_error(e.info, from_block, to_block)
            span = max(1, min(span, (to_block - from_block + 1) // 2 or 1))
            parts = [(s, min(s + span - 1, to_block)) for s in range(from_block, to_block + 1, span)]
            frames = await asyncio.gather(*[self._logs_split(a, b, addresses) for a, b in parts])
            return pl.concat(frames, how="vertical")
        self.sizer.on_success(to_block - from_block + 1, df.height)
        return df

    async def chunk(self, from_block: int, to_block: int) -> Chunk:
        """Headers and logs of one chunk, fetched again until both come from the same fork."""
        for _attempt in range(_CHUNK_ATTEMPTS):
            try:
                blocks, logs = await asyncio.gather(self.headers(from_block, to_block), self.logs(from_block, to_block))
            except ForkChanged:
                await asyncio.sleep(0.5)
                continue
            if _consistent(blocks, logs):
                logs = await self.verified(blocks, logs, lambda: self.logs(from_block, to_block))
                if not _consistent(blocks, logs):
                    continue
                blocks = blocks.drop("logs_bloom")
                return Chunk(from_block, to_block, blocks, await asyncio.to_thread(self._finish_logs, blocks, logs))
            await asyncio.sleep(0.2)
        raise ForkChanged(f"blocks {from_block}-{to_block} kept changing fork across {_CHUNK_ATTEMPTS} fetches")

    def _finish_logs(self, blocks: pl.DataFrame, logs: pl.DataFrame) -> pl.DataFrame:
        if self.address_starts:
            starts = pl.DataFrame(
                {"address": list(self.address_starts), "_start": list(self.address_starts.values())},
                schema={"address": pl.String, "_start": pl.Int64},
            )
            logs = logs.join(starts, on="address", how="left").filter(
                pl.col("_start").is_null() | (pl.col("block_number") >= pl.col("_start"))
            ).drop("_start")
        at = _positions(blocks, logs)
        assert at is not None  # the chunk's logs are of its blocks (`_consistent`)
        stamped = logs.with_columns(blocks["timestamp"].gather(at).alias("block_timestamp"))
        stamped = stamped.select(list(LOG_SCHEMA))
        return stamped if in_log_order(stamped) else stamped.sort("block_number", "log_index")

    async def iter_chunks(self, from_block: int, to_block: int, in_flight: int = 4) -> AsyncIterator[Chunk]:
        """Chunks covering [from_block, to_block] in order, `in_flight` fetched concurrently."""
        pending: list[asyncio.Task[Chunk]] = []
        next_start = from_block
        previous_hash: str | None = None
        try:
            while pending or next_start <= to_block:
                while next_start <= to_block and len(pending) < in_flight:
                    end = min(next_start + self.sizer.span - 1, to_block)
                    pending.append(asyncio.create_task(self.chunk(next_start, end)))
                    next_start = end + 1
                chunk = await pending.pop(0)
                if chunk.blocks.height:
                    first_parent = chunk.blocks["parent_hash"][0]
                    if previous_hash is not None and first_parent != previous_hash:
                        raise ForkChanged(
                            f"block {chunk.from_block}'s parent hash does not match block {chunk.from_block - 1}"
                        )
                    previous_hash = chunk.blocks["hash"][-1]
                yield chunk
        finally:
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def blooms_of(blocks: pl.DataFrame) -> dict[int, int | None]:
    """Each header's `logs_bloom` as an int (None: the node gave none), by block number."""
    return {n: parse_bloom(b) for n, b in zip(blocks["number"].to_list(), blocks["logs_bloom"].to_list(), strict=True)}


def _positions(blocks: pl.DataFrame, logs: pl.DataFrame) -> pl.Series | None:
    """Each log's row in `blocks` (a chunk's headers: consecutive numbers in order), or None if a log is
    of a block outside them. A gather by position instead of a join: this runs for every log."""
    at = logs["block_number"] - blocks["number"][0]
    if logs.height and (at.min() < 0 or at.max() >= blocks.height):
        return None
    return at


def _consistent(blocks: pl.DataFrame, logs: pl.DataFrame) -> bool:
    if blocks.height > 1:
        hashes = blocks["hash"]
        parents = blocks["parent_hash"]
        if not (parents.slice(1) == hashes.slice(0, blocks.height - 1)).all():
            return False
        if not (blocks["number"].diff().slice(1) == 1).all():
            return False  # a node that answered other blocks than those asked: fetched again
    if logs.height == 0:
        return True
    at = _positions(blocks, logs)
    return at is not None and bool((blocks["hash"].gather(at) == logs["block_hash"]).all())
