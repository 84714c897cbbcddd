"""Several RPC endpoints per chain: requests move to the next endpoint when one keeps failing, come back
to the preferred one later, and a backfill whose first endpoint is dead completes on the second."""

import asyncio
import socket

import pytest
import yaml

from indexer_dagster.chain.rpc import RetryPolicy, RpcClient, RpcStats
from indexer_dagster.config import ConfigError, parse_config
from tests.chain.test_budget import CountingProxy
from tests.conftest import cfg_of
from tests.sync.test_historical import backfill, node_logs, view


def dead_url() -> str:
    """A local port nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _with_urls(path, urls):
    doc = yaml.safe_load(path.read_text())
    del doc["chain"]["rpc_url"]
    doc["chain"]["rpc_urls"] = urls
    path.write_text(yaml.safe_dump(doc))
    return path


# --- config ------------------------------------------------------------------------------------------

BASE = """
chain: {{name: devnet, chain_id: 31337, {urls}}}
contracts: [{{name: Pair, abi: abi.json, addresses: ["0x{addr}"]}}]
"""


def _parse(tmp_path, urls: str):
    (tmp_path / "abi.json").write_text(
        '[{"type":"event","name":"Sync","anonymous":false,"inputs":[{"name":"r0","type":"uint112","indexed":false}]}]'
    )
    return parse_config(BASE.format(urls=urls, addr="11" * 20), tmp_path)


def test_rpc_urls_config(tmp_path):
    cfg = _parse(tmp_path, 'rpc_urls: ["http://a:1", "https://b/key"]')
    assert cfg.chain.endpoints == ["http://a:1", "https://b/key"]
    assert cfg.chain.rpc_url == "http://a:1"  # the preferred one, for single-endpoint callers
    assert _parse(tmp_path, 'rpc_url: "http://a:1"').chain.endpoints == ["http://a:1"]
    for urls, words in [
        ('rpc_url: "http://a:1", rpc_urls: ["http://b:1"]', "exactly one of chain.rpc_url"),
        ("confirmations: 1", "chain.rpc_url is missing"),
        ('rpc_urls: ["http://a:1", "ws://b:1"]', "rpc_urls: entry [1] must start with http"),
        ('rpc_urls: ["http://a:1", "http://a:1"]', "listed twice"),
        ("rpc_urls: []", "rpc_urls"),
    ]:
        with pytest.raises(ConfigError) as e:
            _parse(tmp_path, urls)
        assert words in str(e.value), str(e.value)


# --- the client --------------------------------------------------------------------------------------


async def _block_number(client: RpcClient) -> int:
    return int(await client.call("eth_blockNumber"), 16)


@pytest.mark.slow
def test_client_fails_over_from_a_dead_endpoint_and_returns_later(devnet):
    node, _ = devnet
    dead = dead_url()
    port = int(dead.rsplit(":", 1)[1])
    back = CountingProxy(node.url)
    stats = RpcStats()

    async def scenario():
        nonlocal back
        client = RpcClient([dead, node.url], concurrency=2, retry=RetryPolicy(max_retries=1, base_delay_s=0.01),
                           stats=stats, failover_after=3, failback_after_s=1.0)
        async with client:
            # max_retries=1 and still fine: moving to the next endpoint is not a retry.
            heads = await asyncio.gather(*[_block_number(client) for _ in range(4)])
            assert heads == [node.block_number()] * 4
            assert client.active_endpoint == 1 and stats.failovers == 1
            assert await _block_number(client) == node.block_number() and client.active_endpoint == 1
            back = CountingProxy(node.url, port=port).start()  # the preferred endpoint is up again
            await asyncio.sleep(1.1)
            assert await _block_number(client) == node.block_number()
            assert client.active_endpoint == 0 and len(back.arrivals) == 1

    try:
        asyncio.run(scenario())
    finally:
        if back._thread.is_alive():
            back.stop()


@pytest.mark.slow
def test_client_fails_over_from_a_rate_limited_endpoint(devnet):
    node, _ = devnet
    limited = CountingProxy(node.url, fail_status=429).start()
    stats = RpcStats()

    async def scenario():
        async with RpcClient([limited.url, node.url], retry=RetryPolicy(max_retries=5, base_delay_s=0.01),
                             stats=stats, failover_after=3) as client:
            return await _block_number(client), client.active_endpoint

    try:
        head, active = asyncio.run(scenario())
    finally:
        limited.stop()
    assert head == node.block_number() and active == 1
    assert len(limited.arrivals) == 3 and stats.failovers == 1


@pytest.mark.slow
def test_all_endpoints_down_fails_with_a_clear_message(tmp_path):
    async def scenario():
        async with RpcClient([dead_url(), dead_url()], retry=RetryPolicy(max_retries=2, base_delay_s=0.01),
                             failover_after=2) as client:
            await client.call("eth_blockNumber")

    with pytest.raises(Exception) as e:
        asyncio.run(scenario())
    assert "gave up after" in str(e.value) and "127.0.0.1" not in str(e.value)


# --- a backfill through Dagster ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("instance_profile", ["sqlite"])
def test_backfill_completes_on_the_second_endpoint_when_the_first_is_dead(devnet, make_config, dagster_home):
    node, _ = devnet
    path = _with_urls(make_config(), [dead_url(), node.url])
    cfg = cfg_of(path)
    head = node.block_number()
    proc = backfill(path, dagster_home)
    assert "done:" in proc.stdout
    addresses = [a for c in cfg.contracts for a in c.addresses]
    expected = node_logs(node.url, addresses, 0, head)
    got = view(cfg, "select * from logs order by block_number, log_index")
    assert got.height == expected.height > 0
    assert got.select(expected.columns).equals(expected)
    blocks = view(cfg, "select number, hash from blocks order by number")
    assert blocks["number"].to_list() == list(range(head + 1))


@pytest.mark.slow
@pytest.mark.parametrize("instance_profile", ["sqlite"])
def test_a_fallback_on_another_chain_is_refused(devnet, make_config, dagster_home, tmp_path):
    """Failing over to a node of another network would mix chains: `indexer backfill` refuses first."""
    node, _ = devnet
    other = CountingProxy(node.url, answer={"eth_chainId": "0x1"}).start()
    try:
        path = _with_urls(make_config(), [node.url, other.url])
        proc = backfill(path, dagster_home, check=False)
    finally:
        other.stop()
    assert proc.returncode != 0
    assert "chain.rpc_urls[1]" in proc.stderr and "is chain 1" in proc.stderr
    assert not (cfg_of(path).data_dir / "devnet").exists()
