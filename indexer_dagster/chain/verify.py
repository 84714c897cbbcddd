"""Catch logs a node silently left out (or made up), using each block header's `logsBloom`.

A node can answer `eth_getLogs` with HTTP 200 and one log missing (a lagging replica behind a load
balancer, a bug, a truncated index); retries never see it because nothing failed. Every header
carries a 2048-bit Bloom filter of all its logs' addresses and topics (Yellow Paper, section 4.3.1:
keccak-256 of the item, bits from the low 11 bits of its first three byte pairs), so:

- forward check: a configured address whose bits are set in a block's bloom must have a fetched log
  in that block; and for an address that has, each event topic0 of its contract's ABI whose bits are
  set must be carried by some fetched log of the block. Otherwise the block is suspect (a dropped log,
  or a bloom false positive). The bloom is one union per block, so this is all it can tell: it cannot
  pair an address with a topic (Swap of pool A and Sync of pool B look like Swap and Sync of both);
- reverse check: every fetched log's address and topics must be in its block's bloom (else the log
  is fabricated or corrupt).

A suspect block's logs are fetched again by block hash (EIP-234), `REFETCH_ATTEMPTS` times. A refetch
with more logs (or without the foreign log) replaces the first answer, and a complete one ends the
search; when the refetches agree with the answer and none ever carried what the bloom suggests, that
is a bloom false positive and is accepted (and counted). After bounded attempts the range fails
with `MissingLogs` — it is never stored.

Blind spot: a dropped log whose address and whose topic0 both appear in other fetched logs of the same
block (e.g. one of two Swaps of a pool, or a Swap of pool A in a block with A's Sync and B's Swap) is
invisible to the bloom. `agree` (the `double` mode) covers it when the fault is intermittent: each answer
is fetched twice and must agree.
"""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import polars as pl
from eth_hash.auto import keccak

from indexer_dagster.parse.abi import event_specs, load_abi

_TOPICS = ("topic0", "topic1", "topic2", "topic3")
REFETCH_ATTEMPTS = 3
BLOCK_REFETCH_LIMIT = 2  # more suspects in a chunk: one chunk refetch first
AGREE_ATTEMPTS = 4
# Bloom masks of recent addresses and topics, ~400 bytes each: 100k of them keep a range's memory ~40 MB
# (500k held 200 MB on a mainnet range of many distinct topics); past it the cache starts again.
_MASK_CACHE_MAX = 100_000


class MissingLogs(RuntimeError):
    """The node's logs for a block range stay inconsistent with the headers' blooms (or with each other)."""


def bloom_mask(item: bytes) -> int:
    """The 3 bloom bits of `item` as an int (bit i of the int is bit i of the 2048-bit filter)."""
    h = keccak(item)
    return (1 << (((h[0] << 8) | h[1]) & 2047)) | (1 << (((h[2] << 8) | h[3]) & 2047)) | (
        1 << (((h[4] << 8) | h[5]) & 2047)
    )


def _hex_bytes(value: str) -> bytes:
    return bytes.fromhex(value[2:] if value.startswith(("0x", "0X")) else value)


def bloom_of(logs: Iterable[tuple[str, Iterable[str]]]) -> int:
    """The bloom of (address, topics) items, as a header's `logsBloom` would hold them."""
    out = 0
    for address, topics in logs:
        out |= bloom_mask(_hex_bytes(address))
        for t in topics:
            out |= bloom_mask(_hex_bytes(t))
    return out


def parse_bloom(value: str | None) -> int | None:
    """A header's `logsBloom` hex as an int (big-endian: byte 255 holds bits 0-7); None if absent."""
    if not value:
        return None
    return int(value, 16)


@dataclass
class Suspect:
    block: int
    # (address, None): the address is in the bloom, no log has it; (address, topic0): the address has
    # logs, the topic0 is in the bloom, no log carries it.
    missing: list[tuple[str, str | None]] = field(default_factory=list)
    outside: int = 0  # distinct addresses/topics of fetched logs that the bloom does not hold

    def describe(self) -> str:
        parts = []
        if self.missing:
            shown = ", ".join(f"{a} {t[:10] + '…' if t else '(any event)'}" for a, t in self.missing[:3])
            parts.append(f"the bloom shows {len(self.missing)} log(s) no answer carries ({shown})")
        if self.outside:
            parts.append(f"fetched logs carry {self.outside} address(es)/topic(s) the bloom does not hold")
        return f"block {self.block}: " + "; ".join(parts)


class LogVerifier:
    """Checks fetched logs against their blocks' blooms for the given address → topic0s."""

    def __init__(self, topics_by_address: Mapping[str, Iterable[str]]) -> None:
        self._pairs: list[tuple[str, int, list[tuple[str, int]]]] = []
        for address, topics in sorted(topics_by_address.items()):
            a = address.lower()
            ts = sorted({t.lower() for t in topics if t})
            self._pairs.append((a, bloom_mask(_hex_bytes(a)), [(t, bloom_mask(_hex_bytes(t))) for t in ts]))
        self._masks: dict[str, int] = {}

    def _mask(self, value: str) -> int:
        m = self._masks.get(value)
        if m is None:
            if len(self._masks) > _MASK_CACHE_MAX:
                self._masks.clear()
            m = self._masks[value] = bloom_mask(_hex_bytes(value))
        return m

    def suspects(self, blooms: Mapping[int, int | None], logs: pl.DataFrame) -> dict[int, Suspect]:
        """Blocks of `blooms` whose logs fail the forward or reverse check. `logs` holds every fetched
        log of those blocks for the configured addresses (block_number, address, topic0..3)."""
        out: dict[int, Suspect] = {}
        # One row per block with the distinct values of each column: a few dozen values per block, so
        # the Python below does one big-int OR per distinct value, not per log.
        per_block: dict[int, tuple[list[str], ...]] = {}
        if logs.height:
            cols = ("address", *_TOPICS)
            grouped = logs.group_by("block_number").agg(pl.col(c).unique().drop_nulls() for c in cols)
            for row in grouped.iter_rows():
                per_block[row[0]] = row[1:]
        cache, new_mask = self._masks, self._mask

        def mask(v: str) -> int:
            m = cache.get(v)
            return new_mask(v) if m is None else m

        for n, bloom in blooms.items():
            if not bloom:
                continue  # no bloom (or an all-zero one some chains return): nothing to check against
            values = per_block.get(n)
            # Forward: addresses (and, for active addresses, topic0s) the bloom holds that no fetched log carries.
            have_a = set(values[0]) if values else ()
            have_t = set(values[1]) if values else ()
            for a, ma, topics in self._pairs:
                if bloom & ma != ma:
                    continue
                if a not in have_a:
                    out.setdefault(n, Suspect(n)).missing.append((a, None))
                    continue
                for t, mt in topics:
                    if t not in have_t and bloom & mt == mt:
                        out.setdefault(n, Suspect(n)).missing.append((a, t))
            # Reverse: every address and topic of the fetched logs must be in the bloom.
            if values:
                union = 0
                for col in values:
                    for v in col:
                        union |= mask(v)
                if bloom & union != union:
                    outside = sum(1 for col in values for v in col if bloom & mask(v) != mask(v))
                    out.setdefault(n, Suspect(n)).outside = outside
        return out


def verifier_for(cfg, addresses: Iterable[str] | None = None) -> LogVerifier:
    """The verifier for `addresses` (default: the config's): every non-anonymous event of its contract's
    ABI (the `logs` dataset keeps all events of an address, not only the decoded ones). An address no
    contract lists is a factory child: it gets the events of the factory-created contracts."""
    static: dict[str, set[str]] = {}
    children: set[str] = set()
    for c in cfg.contracts:
        specs = event_specs(c.name, load_abi(cfg.resolve(c.abi)), None)
        t = {s.topic0 for s in specs if s.topic0 and not s.anonymous}
        if getattr(c, "factory", None) is not None:
            children |= t
        for a in c.addresses:
            static.setdefault(a.lower(), set()).update(t)
    wanted = static.keys() if addresses is None else {a.lower() for a in addresses}
    return LogVerifier({a: static.get(a, children) for a in wanted})


def _same(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    if a.height != b.height:
        return False
    return a.sort("block_number", "log_index").equals(b.sort("block_number", "log_index"))


RefetchBlock = Callable[[int], Awaitable[pl.DataFrame]]
# Per block: (number, addresses, topic0s or None for any) -> the logs of those addresses with those topic0s
# in each block, by block hash: what a suspect block's missing pairs ask the node, in one batch.
Query = tuple[int, list[str], list[str] | None]
RefetchMatching = Callable[[list[Query]], Awaitable[list[pl.DataFrame]]]
MATCHING_ANSWERS = 2  # each suspect's question is asked twice: one answer may drop the very log


async def reconcile(
    verifier: LogVerifier,
    blooms: Mapping[int, int | None],
    logs: pl.DataFrame,
    refetch: RefetchBlock,
    stats: Counter,
    attempts: int = REFETCH_ATTEMPTS,
    refetch_all: Callable[[], Awaitable[pl.DataFrame]] | None = None,
    refetch_matching: RefetchMatching | None = None,
) -> pl.DataFrame:
    """`logs` with every suspect block's logs replaced by a consistent refetch; raises `MissingLogs`.

    With `refetch_matching`, suspect blocks (those without foreign logs) are first settled by asking the
    node, in one batch per answer, only for the logs the bloom suggests are missing: those of the
    suspect addresses with the suspect topic0s, in that block. A busy chain, where another contract's
    event sets a watched topic's bits in most blocks (ERC-20 Transfer), then costs a few small answers
    per chunk (usually empty), not the chunk again. Asked twice: a log either answer has that the first
    fetch lacked is recovered; when neither has one, the bloom is a false positive.

    Otherwise, with more than `BLOCK_REFETCH_LIMIT` suspects, `refetch_all()` fetches the whole chunk once
    more: suspect blocks whose two answers are identical (and inside the bloom) are accepted, and only
    the blocks whose answers differ are refetched by hash."""
    found = verifier.suspects(blooms, logs)
    checked = sum(1 for b in blooms.values() if b)
    stats["verify:blocks_checked"] += checked
    if checked < len(blooms):
        stats["verify:blocks_without_bloom"] += len(blooms) - checked
    if not found:
        return logs
    stats["verify:suspect_blocks"] += len(found)
    if refetch_matching is not None:
        logs = await _settle_by_matching(verifier, blooms, logs, found, refetch_matching, stats)
        if not found:
            return logs.sort("block_number", "log_index")
    elif refetch_all is not None and len(found) > BLOCK_REFETCH_LIMIT:
        second = await refetch_all()
        stats["verify:chunk_refetches"] += 1
        for n in sorted(found):
            a = logs.filter(pl.col("block_number") == n)
            b = second.filter(pl.col("block_number") == n)
            if _same(a, b) and not found[n].outside:
                stats["verify:bloom_unsettled"] += len(found.pop(n).missing)
            elif b.height > a.height and not (bad := verifier.suspects({n: blooms[n]}, b).get(n) or Suspect(n)).outside:
                # The second answer has logs the first lacked: take it; if the bloom still suggests
                # more, the block is refetched by hash below, starting from this answer.
                stats["verify:logs_recovered"] += b.height - a.height
                logs = pl.concat([logs.filter(pl.col("block_number") != n), b], how="vertical")
                if bad.missing:
                    found[n] = bad
                else:
                    found.pop(n)
        if not found:
            return logs.sort("block_number", "log_index")
    settled = await asyncio.gather(
        *[
            _settle(verifier, s, blooms[n], logs.filter(pl.col("block_number") == n), refetch, stats, attempts)
            for n, s in sorted(found.items())
        ]
    )
    kept = logs.filter(~pl.col("block_number").is_in(list(found)))
    return pl.concat([kept, *settled], how="vertical").sort("block_number", "log_index")


async def _settle_by_matching(
    verifier: LogVerifier, blooms: Mapping[int, int | None], logs: pl.DataFrame, found: dict[int, Suspect],
    refetch_matching: RefetchMatching, stats: Counter,
) -> pl.DataFrame:
    """Settle the suspects of `found` without foreign logs by the narrow questions (see `reconcile`);
    settled blocks leave `found`, the rest stay for the refetch by hash. Returns `logs`, recovered."""
    blocks = sorted(n for n, s in found.items() if not s.outside)
    if not blocks:
        return logs
    queries: list[Query] = []
    for n in blocks:
        missing = found[n].missing
        addresses = sorted({a for a, _t in missing})
        any_topic = any(t is None for _a, t in missing)
        queries.append((n, addresses, None if any_topic else sorted({t for _a, t in missing if t})))
    answers = [await refetch_matching(queries) for _ in range(MATCHING_ANSWERS)]
    stats["verify:matching_refetches"] += len(queries) * MATCHING_ANSWERS
    for i, (n, _addresses, _topics) in enumerate(queries):
        mine = logs.filter(pl.col("block_number") == n)
        new = (pl.concat([a[i] for a in answers], how="vertical")
               .filter(~pl.col("log_index").is_in(mine["log_index"].implode()))
               .unique("log_index", keep="first", maintain_order=True))
        if new.height == 0:
            # Neither answer has a log of the suspect pairs that the fetch lacked: a bloom false positive
            # (another contract's logs set those bits).
            stats["verify:bloom_unsettled"] += len(found.pop(n).missing)
            continue
        merged = pl.concat([mine, new.select(mine.columns)], how="vertical").sort("log_index")
        bad = verifier.suspects({n: blooms[n]}, merged).get(n)
        if bad is not None and bad.outside:
            continue  # an answer carries a log the bloom does not hold: the block is refetched by hash
        stats["verify:logs_recovered"] += new.height
        logs = pl.concat([logs.filter(pl.col("block_number") != n), merged], how="vertical")
        found.pop(n)
    return logs


async def _settle(
    verifier: LogVerifier, suspect: Suspect, bloom: int | None, original: pl.DataFrame, refetch: RefetchBlock,
    stats: Counter, attempts: int,
) -> pl.DataFrame:
    n = suspect.block
    best, best_bad = original, suspect
    # Addresses and topic0s some answer did carry: missing from another answer, they are no false positive.
    carried = set(original["address"]) | set(original["topic0"])
    agreeing = 0
    # Every refetch is made: a node that drops a log may drop the same one twice in a row.
    for _ in range(attempts):
        ref = await refetch(n)
        stats["verify:refetches"] += 1
        bad = verifier.suspects({n: bloom}, ref).get(n)
        if bad is not None and bad.outside:
            stats["verify:answers_outside_bloom"] += 1
            continue
        carried.update(ref["address"])
        carried.update(ref["topic0"])
        if ref.height > best.height or best_bad.outside:
            stats["verify:logs_recovered"] += max(ref.height - best.height, 0)
            if bad is None:
                return ref
            best, best_bad, agreeing = ref, bad, 0
        elif _same(ref, best):
            agreeing += 1
    if agreeing >= min(2, attempts) and not best_bad.outside and not any((t or a) in carried for a, t in best_bad.missing):
        # The answers agree, and none ever carried what the bloom suggests: a bloom false positive.
        stats["verify:bloom_false_positives"] += len(best_bad.missing)
        return best
    raise MissingLogs(
        f"{best_bad.describe()} — still after {attempts} refetches by block hash; the range was not stored. "
        "The node's eth_getLogs and its block headers disagree: check the node (or point chain.rpc_url at "
        "another provider) and run the range again."
    )


async def agree(
    fetch: Callable[[], Awaitable[pl.DataFrame]], first: pl.DataFrame, stats: Counter, what: str,
    attempts: int = AGREE_ATTEMPTS,
) -> pl.DataFrame:
    """Fetch again until two answers are identical (the `double` mode); raises `MissingLogs`."""
    answers = [first]
    for _ in range(attempts):
        nxt = await fetch()
        stats["verify:double_fetches"] += 1
        if any(_same(a, nxt) for a in answers):
            stats["verify:double_mismatches"] += len(answers) - 1
            return nxt
        answers.append(nxt)
    raise MissingLogs(
        f"{what}: {len(answers)} fetches of the same logs gave {len(answers)} different answers "
        f"(sizes {[a.height for a in answers]}); the range was not stored. The node is inconsistent: check it "
        "or point chain.rpc_url at another provider, then run the range again."
    )
