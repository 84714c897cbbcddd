"""`indexer status` for people: the chains' health as a rich table, plus what needs attention."""

import time

from rich.console import Console
from rich.table import Table

from indexer_dagster.health.status import ChainStatus

MAX_KEYS = 8


def _n(v) -> str:
    return "—" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS])
    return shown + (f" … (+{len(keys) - MAX_KEYS})" if len(keys) > MAX_KEYS else "")


def _rows(st: ChainStatus) -> list[tuple[str, str]]:
    node = f"{st.node_head:,}" if st.node_reachable else f"[red]unreachable[/red]: {st.node_error}"
    lag = "—" if st.lag_blocks is None else f"{st.lag_blocks:,} blocks" + (
        f", {st.lag_seconds:,.0f} s" if st.lag_seconds is not None else "")
    p = st.partitions
    parts = ", ".join(
        [f"{p['done']:,} of {st.partitions_expected:,} done"]
        + [f"{color}{p[k]:,} {k}{end}" for k, color, end in (
            ("live", "", ""), ("partial", "[yellow]", "[/yellow]"), ("missing", "[yellow]", "[/yellow]"),
            ("failed", "[red]", "[/red]")) if p[k]])
    r = st.last_reorg
    reorg = "none" if r is None else (
        f"#{r.id}: fork at block {r.fork_block:,}, depth {r.depth}, {r.phase}, detected "
        f"{r.detected_at[:19].replace('T', ' ')} UTC ({st.reorgs_total} in the ledger, deepest {st.reorg_max_depth})")
    requests, errors = sum(st.rpc_requests.values()), sum(st.rpc_errors.values())
    rpc = f"{requests:,} requests, {errors:,} errors" + (
        f" (failure rate {st.rpc_error_rate:.2%})" if st.rpc_error_rate is not None else "")
    return [
        ("node head", node),
        ("indexed head", f"{_n(st.indexed_head)} (head recorded {_ago(st.head_observed_at)})"),
        ("confirmed head", _n(st.confirmed_head)),
        ("lag", lag),
        ("partitions", parts),
        ("last reorg", reorg),
        ("RPC", rpc),
    ]


def print_status(statuses: list[ChainStatus], console: Console | None = None) -> None:
    console = console or Console()
    for st in statuses:
        table = Table(title=f"{st.chain} (chain id {st.chain_id})", show_header=False, title_justify="left")
        table.add_column("what", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for what, value in _rows(st):
            table.add_row(what, value)
        console.print(table)
        if st.missing_partitions:
            console.print(f"{st.chain}: missing ranges {_keys(st.missing_partitions)}")
        if st.partial_partitions:
            console.print(f"{st.chain}: partial ranges {_keys(st.partial_partitions)}")
        if st.failed_partitions:
            console.print(f"{st.chain}: [red]failed ranges[/red] {_keys(st.failed_partitions)} "
                          "(see their runs in the Dagster UI; re-run the backfill)")
        if st.active_reorg_id is not None:
            console.print(f"{st.chain}: reorg {st.active_reorg_id} is being repaired")
        if st.halted:
            console.print(f"{st.chain}: [red]HALTED[/red]: {st.halted} (then `indexer resume --chain {st.chain}`)")
        if st.state_error:
            console.print(f"{st.chain}: [red]state store unavailable[/red]: {st.state_error}")
