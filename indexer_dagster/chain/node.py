"""Checks of the config against the node itself, run before anything is written."""

import asyncio

from indexer_dagster.chain.errors import RpcError
from indexer_dagster.chain.rpc import RetryPolicy, RpcClient
from indexer_dagster.config import ConfigError, IndexerConfig
from indexer_dagster.urls import redact_to_host


async def _probe(url: str) -> tuple[int, int]:
    # Few retries: a wrong URL should fail in seconds, not after the full backoff budget.
    async with RpcClient(url, timeout_s=10, concurrency=1, retry=RetryPolicy(max_retries=2)) as rpc:
        chain_id = int(await rpc.call("eth_chainId"), 16)
        head = int(await rpc.call("eth_blockNumber"), 16)
    return chain_id, head


def _check_endpoint(cfg: IndexerConfig, url: str, key: str) -> int:
    where = redact_to_host(url)
    try:
        chain_id, head = asyncio.run(_probe(url))
    except RpcError as e:
        raise ConfigError(
            f"{key}: the node at {where} did not answer ({e.info.message}); "
            "check the URL, the API key and that the node is running"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot reach {where} ({type(e).__name__}); check the URL") from None
    if chain_id != cfg.chain.chain_id:
        raise ConfigError(
            f"chain.chain_id: the config says {cfg.chain.chain_id} but the node at {where} ({key}) is chain "
            f"{chain_id}; point {key} at the right network or correct chain_id"
        )
    return head


def check_against_node(cfg: IndexerConfig) -> int:
    """Raise ConfigError naming the key to fix, or return the node's head block number.

    With several endpoints (`chain.rpc_urls`) every reachable one must serve the configured chain (a
    fallback on another network would mix chains); unreachable ones are tolerated while one answers
    (failover), and the head is the first reachable endpoint's.
    """
    if not cfg.chain.rpc_urls:
        assert cfg.chain.rpc_url is not None  # ChainConfig requires one of rpc_url and rpc_urls
        head = _check_endpoint(cfg, cfg.chain.rpc_url, "chain.rpc_url")
    else:
        heads, down = [], []
        for i, url in enumerate(cfg.chain.rpc_urls):
            try:
                heads.append(_check_endpoint(cfg, url, f"chain.rpc_urls[{i}]"))
            except ConfigError as e:
                if str(e).startswith("chain.chain_id"):
                    raise
                down.append(str(e))
        if not heads:
            raise ConfigError("no endpoint of chain.rpc_urls answered: " + "; ".join(down))
        head = heads[0]
    for c in cfg.contracts:
        start = cfg.contract_start(c)
        if start > head:
            key = "chain.start_block" if c.start_block is None else f"contracts[{c.name}].start_block"
            raise ConfigError(f"{key}: start block {start} is above the chain head {head}; lower it")
    return head
