"""The one rule every publisher of a chain's files follows: publish under the chain's writer lock, and
only if no reorg began since the work started (else its rows could be of the old fork), the chain is
not halted for an operator, and the blocks it publishes are those of the local canonical chain."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import polars as pl

from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.state import StateStore

# The blocks a publish brings, (number, hash), between two block numbers: asked only for the span of the
# local chain's stored headers (its recent window), so a range of any size is compared without holding it.
BlocksBetween = Callable[[int, int], pl.DataFrame]


def publish_guard(
    store: StateStore, chain: str, refused: str, after: Callable[[], None] | None = None,
    blocks: BlocksBetween | None = None,
) -> Callable[[], AbstractContextManager[None]]:
    """A guard factory for `Lake.transaction`, taken when the work starts (it remembers the reorg epoch).
    The guard raises ForkChanged(`refused`) if a reorg began since, ChainHalted if the chain is halted,
    ForkChanged if `blocks` (number, hash of the blocks about to be published) differ from the local
    chain's; `after()` runs once the files are visible, still under the lock."""
    epoch = store.reorg_epoch(chain)

    @contextmanager
    def guard() -> Iterator[None]:
        with store.writer_lock(chain):
            store.check_not_halted(chain)
            if store.reorg_epoch(chain) != epoch or store.active_reorg(chain) is not None:
                raise ForkChanged(refused)
            if blocks is not None:
                check_local_chain(store, chain, blocks)
            yield
            if after is not None:
                after()

    return guard


def check_local_chain(store: StateStore, chain: str, blocks: BlocksBetween) -> None:
    """ForkChanged if a block of `blocks` (number, hash) is not the local chain's block of that number,
    where the local chain keeps one: an endpoint on another fork (a failover, a reorg the follower has
    not seen yet) must not replace canonical rows. The follower or a reorg run settles the fork first."""
    stored = {h.number: h.hash for h in store.headers(chain)}
    if not stored:
        return
    for number, block_hash in blocks(min(stored), max(stored)).select("number", "hash").rows():
        if stored.get(number, block_hash) != block_hash:
            raise ForkChanged(f"block {number} from the node is of another fork than the local chain "
                              f"({block_hash} vs {stored[number]}); fetching again")
