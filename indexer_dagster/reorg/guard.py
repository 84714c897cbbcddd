"""The one rule every publisher of a chain's files follows: publish under the chain's writer lock, and
only if no reorg began since the work started (else its rows could be of the old fork) and the chain
is not halted for an operator."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.state import StateStore


def publish_guard(
    store: StateStore, chain: str, refused: str, after: Callable[[], None] | None = None
) -> Callable[[], AbstractContextManager[None]]:
    """A guard factory for `Lake.transaction`, taken when the work starts (it remembers the reorg epoch).
    The guard raises ForkChanged(`refused`) if a reorg began since, ChainHalted if the chain is halted;
    `after()` runs once the files are visible, still under the lock."""
    epoch = store.reorg_epoch(chain)

    @contextmanager
    def guard() -> Iterator[None]:
        with store.writer_lock(chain):
            store.check_not_halted(chain)
            if store.reorg_epoch(chain) != epoch or store.active_reorg(chain) is not None:
                raise ForkChanged(refused)
            yield
            if after is not None:
                after()

    return guard
