"""Reorg detection against the local chain (the recent canonical headers the indexer has written).

`next_step` compares the node with the local chain and says what to do:
- `Extend`: the node has new blocks whose parent hashes continue the local tip;
- `Wait`: the node is behind the local tip, or a block is momentarily missing (a lagging or syncing
  node, or a reorg in progress on the node): not data loss, check again later;
- `Reorg`: the node has a block that conflicts with a stored one; the common ancestor is found by
  walking back by parent hash, and the new fork's headers are returned;
- `TooDeep`: the fork point is below the stored window: stop and alert, never guess.

No I/O here except through the `NodeView` callbacks, so the logic is unit-tested without a node.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from indexer_dagster.state import Header

# Fetches the node's canonical header at a number (None when the node has no such block now).
FetchHeader = Callable[[int], Awaitable[Header | None]]


@dataclass(frozen=True)
class Extend:
    headers: list[Header]  # consecutive, parent-linked, starting at local tip + 1


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Reorg:
    ancestor: Header
    old_tip: Header
    new_chain: list[Header]  # ancestor + 1 .. the node's head on the new fork (may be empty: a rollback)

    @property
    def depth(self) -> int:
        return self.old_tip.number - self.ancestor.number


@dataclass(frozen=True)
class TooDeep:
    lowest_checked: int
    old_tip: Header


Step = Extend | Wait | Reorg | TooDeep


class LocalChain:
    """The stored window of canonical headers, indexed by number."""

    def __init__(self, headers: Sequence[Header]) -> None:
        self.by_number = {h.number: h for h in headers}

    @property
    def tip(self) -> Header | None:
        return self.by_number[max(self.by_number)] if self.by_number else None

    @property
    def floor(self) -> int | None:
        return min(self.by_number) if self.by_number else None

    def get(self, number: int) -> Header | None:
        return self.by_number.get(number)


async def find_ancestor(local: LocalChain, fetch: FetchHeader, start: int) -> tuple[Header | None, list[Header], int]:
    """Walk back from `start` until the node's header equals the stored one.

    Returns (ancestor or None if the window is exhausted, the node's headers above the ancestor in
    ascending order, the lowest number checked).
    """
    node_headers: list[Header] = []
    n = start
    floor = local.floor if local.floor is not None else start
    while n >= floor:
        mine = local.get(n)
        theirs = await fetch(n)
        if theirs is None:
            raise _Missing(n)
        if mine is not None and mine.hash == theirs.hash:
            return mine, list(reversed(node_headers)), n
        node_headers.append(theirs)
        n -= 1
    return None, list(reversed(node_headers)), floor


class _Missing(Exception):
    def __init__(self, number: int) -> None:
        self.number = number


async def next_step(local: LocalChain, node_head: int, fetch: FetchHeader, max_batch: int = 50) -> Step:
    tip = local.tip
    if tip is None:
        raise ValueError("the local chain is empty: seed it with the start block's header first")
    try:
        if node_head < tip.number:
            # Behind us: a lagging node, or a fork that is shorter (e.g. a rollback). Only a block
            # that conflicts with a stored one proves a reorg; otherwise wait for the node.
            theirs = await fetch(node_head)
            if theirs is None:
                return Wait(f"node head {node_head} is not readable yet")
            mine = local.get(node_head)
            if mine is None or mine.hash == theirs.hash:
                return Wait(f"node head {node_head} is behind the indexed tip {tip.number}")
            return await _reorg(local, fetch, node_head, tip)
        if node_head == tip.number:
            theirs = await fetch(tip.number)
            if theirs is None:
                return Wait(f"block {tip.number} is not readable yet")
            if theirs.hash == tip.hash:
                return Extend([])
            return await _reorg(local, fetch, tip.number, tip)
        # Ahead: fetch up to max_batch new headers and check they continue our tip.
        new: list[Header] = []
        parent = tip
        for n in range(tip.number + 1, min(node_head, tip.number + max_batch) + 1):
            h = await fetch(n)
            if h is None:
                break  # the node's head moved back while we read: take what chains, re-check later
            if h.parent_hash != parent.hash:
                if n == tip.number + 1:
                    step = await _reorg(local, fetch, tip.number, tip)
                    if isinstance(step, Reorg):
                        # The new fork goes on above the old tip's height: record it up to the node's head.
                        above = await _headers_after(fetch, step.new_chain[-1] if step.new_chain else step.ancestor,
                                                     min(node_head, tip.number + max_batch))
                        step = Reorg(ancestor=step.ancestor, old_tip=step.old_tip, new_chain=[*step.new_chain, *above])
                    return step
                break  # the node reorganised above our tip while we read: re-check next time
            new.append(h)
            parent = h
        return Extend(new)
    except _Missing as m:
        return Wait(f"block {m.number} is momentarily missing on the node")


async def _headers_after(fetch: FetchHeader, parent: Header, last: int) -> list[Header]:
    """The node's headers after `parent` up to block `last`, as far as they chain from it."""
    out: list[Header] = []
    for n in range(parent.number + 1, last + 1):
        h = await fetch(n)
        if h is None or h.parent_hash != parent.hash:
            break  # gone, or the node moved again: what chains is recorded, the rest is seen next time
        out.append(h)
        parent = h
    return out


async def _reorg(local: LocalChain, fetch: FetchHeader, start: int, tip: Header) -> Step:
    ancestor, above, lowest = await find_ancestor(local, fetch, start)
    if ancestor is None:
        return TooDeep(lowest_checked=lowest, old_tip=tip)
    return Reorg(ancestor=ancestor, old_tip=tip, new_chain=above)
