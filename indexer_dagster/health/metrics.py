"""Prometheus exposition of the health numbers (`health.status`), through `prometheus_client`.

A custom collector gathers the status of every chain at scrape time, so the numbers are as fresh as
the scrape and nothing is kept between scrapes. Expose it with `write_textfile` (for node_exporter's
textfile collector; the file is replaced atomically) or `serve` (an HTTP server answering /metrics).
"""

from collections.abc import Callable, Collection, Iterable

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.logs import get_logger
from indexer_dagster.health.status import STATES, ChainStatus, gather_status

log = get_logger(__name__)
PREFIX = "indexer"

# chain name -> failed partition keys (from the orchestrator); may be absent.
FailedFn = Callable[[IndexerConfig], Collection[str]]


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def status_metrics(statuses: Iterable[ChainStatus]) -> list[Metric]:
    """The metric families of some chains' statuses."""
    ch = ["chain"]
    up = _gauge("node_up", "1 when the chain's node answered the last probe.", ch)
    node_head = _gauge("node_head_block", "The node's head block number.", ch)
    indexed = _gauge("indexed_head_block", "The highest block in the lake (range files or live segments).", ch)
    confirmed = _gauge("confirmed_head_block", "Rows at or below this block are `confirmed` in the views.", ch)
    behind = _gauge("blocks_behind_head", "Node head minus indexed head, in blocks.", ch)
    behind_s = _gauge("seconds_behind_head", "Node head block time minus indexed head block time.", ch)
    parts = _gauge("partitions", "Block-range partitions from the start block to the head, by state.", ["chain", "state"])
    expected = _gauge("partitions_expected", "Block-range partitions from the start block to the head.", ch)
    reorgs = CounterMetricFamily(f"{PREFIX}_reorgs", "Reorgs recorded in the ledger.", labels=ch)
    reorg_max = _gauge("reorg_max_depth", "The deepest reorg in the ledger, in blocks.", ch)
    reorg_last = _gauge("reorg_last_depth", "The depth of the most recent reorg.", ch)
    reorg_active = _gauge("reorg_active", "1 while a reorg is being repaired.", ch)
    halted = _gauge("halted", "1 while the chain is halted for an operator (`indexer reorgs` says why).", ch)
    requests = CounterMetricFamily(f"{PREFIX}_rpc_requests", "JSON-RPC requests sent (every attempt).",
                                   labels=["chain", "method"])
    errors = CounterMetricFamily(f"{PREFIX}_rpc_errors", "JSON-RPC requests that failed, by error kind.",
                                 labels=["chain", "method", "kind"])
    retries = CounterMetricFamily(f"{PREFIX}_rpc_retries", "JSON-RPC requests retried.", labels=["chain", "method"])
    rows = _gauge("rows", "Rows in the lake's files, per table.", ["chain", "table"])
    for st in statuses:
        c = [st.chain]
        up.add_metric(c, 1.0 if st.node_reachable else 0.0)
        for fam, value in ((node_head, st.node_head), (indexed, st.indexed_head), (confirmed, st.confirmed_head),
                           (behind, st.lag_blocks), (behind_s, st.lag_seconds)):
            if value is not None:
                fam.add_metric(c, float(value))
        for state in STATES:
            parts.add_metric([st.chain, state], float(st.partitions.get(state, 0)))
        expected.add_metric(c, float(st.partitions_expected))
        reorgs.add_metric(c, float(st.reorgs_total))
        reorg_max.add_metric(c, float(st.reorg_max_depth))
        reorg_last.add_metric(c, float(st.last_reorg.depth if st.last_reorg else 0))
        reorg_active.add_metric(c, 1.0 if st.active_reorg_id is not None else 0.0)
        halted.add_metric(c, 1.0 if st.halted else 0.0)
        for method, n in sorted(st.rpc_requests.items()):
            requests.add_metric([st.chain, method], float(n))
        for key, n in sorted(st.rpc_errors.items()):
            method, _, kind = key.partition(":")
            errors.add_metric([st.chain, method, kind or "unknown"], float(n))
        for method, n in sorted(st.rpc_retries.items()):
            retries.add_metric([st.chain, method], float(n))
        for table, n in sorted(st.rows.items()):
            rows.add_metric([st.chain, table], float(n))
    return [up, node_head, indexed, confirmed, behind, behind_s, parts, expected, reorgs, reorg_max, reorg_last,
            reorg_active, halted, requests, errors, retries, rows]


class StatusCollector(Collector):
    """Collects every chain's status at scrape time."""

    def __init__(self, cfg: IndexerConfig, failed: FailedFn | None = None, timeout_s: float = 5.0) -> None:
        self.cfg, self.failed, self.timeout_s = cfg, failed, timeout_s

    def collect(self) -> Iterable[Metric]:
        statuses = []
        for c in self.cfg.chains:
            failed: Collection[str] = ()
            if self.failed is not None:
                try:
                    failed = self.failed(c)
                except Exception as e:  # noqa: BLE001 - a scrape without failed partitions beats none
                    log.warning("failed partitions of %s unavailable: %s", c.chain.name, e)
            statuses.append(gather_status(c, failed, timeout_s=self.timeout_s))
        return status_metrics(statuses)


def registry(cfg: IndexerConfig, failed: FailedFn | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(cfg, failed))
    return reg


def render(cfg: IndexerConfig, failed: FailedFn | None = None) -> str:
    """The Prometheus text exposition, now."""
    return generate_latest(registry(cfg, failed)).decode()


def write_textfile(cfg: IndexerConfig, path: str, failed: FailedFn | None = None) -> None:
    """Write the exposition to `path` atomically (node_exporter's textfile collector reads `*.prom`)."""
    write_to_textfile(path, registry(cfg, failed))


def serve(cfg: IndexerConfig, port: int, addr: str = "0.0.0.0", failed: FailedFn | None = None):
    """Answer /metrics on `addr:port` from a background thread; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=registry(cfg, failed))
