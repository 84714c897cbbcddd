"""Reorg detection logic against a scripted node (no I/O): extend, wait, reorg, too deep."""

import asyncio

import pytest

from indexer_dagster.reorg.detect import Extend, LocalChain, Reorg, TooDeep, Wait, next_step
from indexer_dagster.state import Header


def chain(start: int, end: int, fork: str = "a", parent_of_start: str | None = None) -> list[Header]:
    out = []
    parent = parent_of_start or f"0x{fork}{start - 1}"
    for n in range(start, end + 1):
        h = Header(number=n, hash=f"0x{fork}{n}", parent_hash=parent, timestamp=n)
        out.append(h)
        parent = h.hash
    return out


class Node:
    def __init__(self, headers: list[Header]):
        self.by_number = {h.number: h for h in headers}
        self.calls = 0

    @property
    def head(self) -> int:
        return max(self.by_number)

    async def fetch(self, n: int):
        self.calls += 1
        return self.by_number.get(n)


def step(local_headers, node, head=None):
    return asyncio.run(next_step(LocalChain(local_headers), node.head if head is None else head, node.fetch))


def test_extend_follows_parent_hashes():
    local = chain(0, 10)
    node = Node(chain(0, 13))
    s = step(local, node)
    assert isinstance(s, Extend) and [h.number for h in s.headers] == [11, 12, 13]


def test_same_head_same_hash_is_nothing_to_do():
    assert step(chain(0, 10), Node(chain(0, 10))) == Extend([])


def test_lagging_node_is_not_a_reorg():
    node = Node(chain(0, 7))  # same fork, just behind
    s = step(chain(0, 10), node)
    assert isinstance(s, Wait) and "behind" in s.reason


def test_missing_block_means_wait():
    node = Node(chain(0, 10))
    del node.by_number[10]
    s = step(chain(0, 10), node, head=10)
    assert isinstance(s, Wait)


def test_reorg_at_the_tip_finds_the_ancestor():
    local = chain(0, 10)
    node = Node(chain(0, 7) + chain(8, 12, fork="b", parent_of_start="0xa7"))
    s = step(local, node)
    assert isinstance(s, Reorg)
    assert s.ancestor.number == 7 and s.depth == 3 and s.old_tip.number == 10
    assert [h.hash for h in s.new_chain] == ["0xb8", "0xb9", "0xb10", "0xb11", "0xb12"]  # up to the node's head


def test_same_height_reorg():
    local = chain(0, 10)
    node = Node(chain(0, 9) + chain(10, 10, fork="b", parent_of_start="0xa9"))
    s = step(local, node)
    assert isinstance(s, Reorg) and s.ancestor.number == 9 and s.depth == 1


def test_shorter_fork_is_a_reorg_only_when_a_block_conflicts():
    local = chain(0, 10)
    node = Node(chain(0, 5) + chain(6, 8, fork="b", parent_of_start="0xa5"))
    s = step(local, node)
    assert isinstance(s, Reorg) and s.ancestor.number == 5 and [h.number for h in s.new_chain] == [6, 7, 8]


def test_reorg_below_the_window_is_too_deep():
    local = chain(5, 10)  # window starts at 5
    node = Node(chain(0, 2) + chain(3, 12, fork="b", parent_of_start="0xa2"))
    s = step(local, node)
    assert isinstance(s, TooDeep) and s.lowest_checked == 5


def test_empty_local_chain_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        step([], Node(chain(0, 1)))


def test_a_reorg_seen_ahead_of_the_tip_records_the_new_fork_up_to_the_node_head():
    """Issue 13, finding 10: with the node ahead of the indexed tip, the new fork was recorded only up to
    the old tip's height (blocks b8..b10 of b8..b13): the ledger's new head and the restore's target fell
    short. The contract: `new_chain` runs from the ancestor + 1 to the node's head."""
    local = chain(0, 10)
    node = Node(chain(0, 7) + chain(8, 13, fork="b", parent_of_start="0xa7"))
    s = step(local, node)
    assert isinstance(s, Reorg) and s.ancestor.number == 7 and s.depth == 3
    assert [h.number for h in s.new_chain] == list(range(8, 14))
    assert all(h.hash.startswith("0xb") for h in s.new_chain)
    # Capped like an extension (max_batch): never an unbounded walk up a long new fork.
    long = Node(chain(0, 7) + chain(8, 400, fork="b", parent_of_start="0xa7"))
    capped = asyncio.run(next_step(LocalChain(local), long.head, long.fetch, max_batch=50))
    assert isinstance(capped, Reorg) and capped.new_chain[-1].number == 10 + 50
