"""Checks of the config against the node itself, run before anything is written."""

import asyncio

from indexer_dagster.config import ConfigError, IndexerConfig, redact_url
from indexer_dagster.monitor.errors import RpcError
from indexer_dagster.monitor.rpc import RetryPolicy, RpcClient


async def _probe(cfg: IndexerConfig) -> tuple[int, int]:
    # Few retries: a wrong URL should fail in seconds, not after the full backoff budget.
    async with RpcClient(cfg.chain.rpc_url, timeout_s=10, concurrency=1, retry=RetryPolicy(max_retries=2)) as rpc:
        chain_id = int(await rpc.call("eth_chainId"), 16)
        head = int(await rpc.call("eth_blockNumber"), 16)
    return chain_id, head


def check_against_node(cfg: IndexerConfig) -> int:
    """Raise ConfigError naming the key to fix, or return the node's head block number."""
    where = redact_url(cfg.chain.rpc_url)
    try:
        chain_id, head = asyncio.run(_probe(cfg))
    except RpcError as e:
        raise ConfigError(
            f"chain.rpc_url: the node at {where} did not answer ({e.info.message}); "
            "check the URL, the API key and that the node is running"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"chain.rpc_url: cannot reach {where} ({type(e).__name__}); check the URL") from None
    if chain_id != cfg.chain.chain_id:
        raise ConfigError(
            f"chain.chain_id: the config says {cfg.chain.chain_id} but the node at {where} is chain {chain_id}; "
            "point rpc_url at the right network or correct chain_id"
        )
    for c in cfg.contracts:
        start = cfg.contract_start(c)
        if start > head:
            key = "chain.start_block" if c.start_block is None else f"contracts[{c.name}].start_block"
            raise ConfigError(f"{key}: start block {start} is above the chain head {head}; lower it")
    return head
