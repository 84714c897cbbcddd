"""`indexer`: the command line (devnet, check, backfill, catalog, query)."""

import sys
import time
import warnings
from pathlib import Path

import click

from indexer_dagster.config import CHAIN_ENV_VAR, CONFIG_ENV_VAR, ConfigError, load_config


def _load(config: str | None):
    from indexer_dagster.health.logs import register_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    register_config(cfg)  # its URLs never appear in a log line
    return cfg


config_option = click.option(
    "--config", "config_path", envvar=CONFIG_ENV_VAR, type=click.Path(dir_okay=False),
    help=f"Path to the YAML config (default: ${CONFIG_ENV_VAR}).",
)


chain_option = click.option(
    "--chain", "chain", envvar=CHAIN_ENV_VAR,
    help=f"One chain of a multi-chain config (default: every chain; ${CHAIN_ENV_VAR}).",
)


def _selected_chains(cfg, chain: str | None) -> list:
    try:
        return [cfg.for_chain(chain)] if chain else cfg.chains
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _serve_until_interrupted(stop) -> None:
    """Block until Ctrl-C (or SIGTERM's KeyboardInterrupt), then call `stop`."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


@click.group()
def main() -> None:
    """EVM event indexer on Dagster: block ranges into Parquet, views in DuckDB."""
    # Dagster's beta/preview notices are for developers of definitions, not for CLI users.
    warnings.filterwarnings("ignore", message=r".*(is currently in beta|is currently in preview).*")
    from indexer_dagster.health.logs import configure_logging

    configure_logging(default_level="WARNING")  # INDEXER_LOG_LEVEL / INDEXER_LOG_FORMAT=json change it


@main.command()
@config_option
@chain_option
def check(config_path: str | None, chain: str | None) -> None:
    """Validate the config, then check it against the node (reachable, chain id, start block)."""
    from indexer_dagster.chain.node import check_against_node
    from indexer_dagster.persist.lake import check_lake

    for cfg in _selected_chains(_load(config_path), chain):
        try:
            head = check_against_node(cfg)
            check_lake(cfg)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"config ok: chain {cfg.chain.name} (id {cfg.chain.chain_id}), head {head}, "
                   f"{len(cfg.contracts)} contracts, {len(cfg.all_specs())} event tables")


@main.command()
@config_option
@chain_option
@click.option("--from", "from_block", type=click.IntRange(min=0), help="First block (default: the config's start_block).")
@click.option("--to", "to_block", type=click.IntRange(min=0), help="Last block (default: the chain head).")
@click.option("--workers", type=click.IntRange(min=1, max=32), default=1, show_default=True,
              help="Parallel Dagster runs (each batches several ranges).")
@click.option("--instance", "instance_profile", type=click.Choice(["sqlite", "postgres"]),
              envvar="INDEXER_DAGSTER_PROFILE",
              help="Dagster instance profile for a new $DAGSTER_HOME: sqlite (default) or postgres "
                   "(deploy/dagster-postgres.yaml, credentials from DAGSTER_PG_*).")
def backfill(config_path: str | None, chain: str | None, from_block: int | None, to_block: int | None,
             workers: int, instance_profile: str | None) -> None:
    """Index a block range through Dagster (the same assets the UI runs), with a progress bar."""
    import os

    if instance_profile:
        os.environ["INDEXER_DAGSTER_PROFILE"] = instance_profile  # read by ensure_dagster_home (and workers)
    cfg = _load(config_path)
    chains = _selected_chains(cfg, chain)
    # Every chain's checks pass before any chain is written.
    plans = [_plan_chain(one, from_block, to_block) for one in chains]
    for one, (head, first, last) in zip(chains, plans, strict=True):
        if len(cfg.chains) > 1:
            click.echo(f"chain {one.chain.name} (id {one.chain.chain_id}):")
        _backfill_chain(one, config_path, head, first, last, workers)


def _plan_chain(cfg, from_block: int | None, to_block: int | None) -> tuple[int, int, int]:
    """(head, first, last) of a chain's backfill, after every check that needs no write."""
    from indexer_dagster.chain.node import check_against_node
    from indexer_dagster.persist.lake import check_lake

    try:
        head = check_against_node(cfg)
        check_lake(cfg)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    first = cfg.start_block if from_block is None else from_block
    last = head if to_block is None else to_block
    if last > head:
        raise click.ClickException(f"--to {last} is beyond the chain head {head}; lower it or omit --to")
    if first > head:
        raise click.ClickException(f"--from {first} is beyond the chain head {head}; lower it")
    if first > last:
        what = f"--from {first}" if from_block is not None else f"the config's start block {first}"
        raise click.ClickException(f"{what} is above --to {last}; swap them (or raise --to)")
    # Refuse before anything is written (decided: nothing written rather than data behind a catalog that
    # another program holds open read-write, which keeps, and may later write, its old copy).
    from indexer_dagster.persist.duck_lock import catalog_lock_error

    if locked := catalog_lock_error(cfg.duckdb_path):
        raise click.ClickException(f"{locked}; nothing was written")
    return head, first, last


def _backfill_chain(cfg, config_path: str | None, head: int, first: int, last: int, workers: int) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from indexer_dagster.block_range import ranges_between
    from indexer_dagster.launch import ensure_dagster_home, register_ranges, run_backfill
    from indexer_dagster.persist.catalog import build_catalog

    ranges = ranges_between(first, last, cfg.chain.blocks_per_partition)

    from indexer_dagster.launch import ProfileError

    try:
        home = ensure_dagster_home(cfg.data_dir.parent / ".dagster_home")
    except ProfileError as e:
        raise click.ClickException(str(e)) from None
    from indexer_dagster.launch import open_instance

    instance = open_instance()
    register_ranges(instance, cfg, last)
    total_blocks = sum(len(c) for r in ranges if (c := r.clip(cfg.start_block, head)))
    click.echo(f"backfilling {len(ranges)} ranges ({ranges[0].key} .. {ranges[-1].key}), "
               f"{total_blocks} blocks, {workers} worker(s); Dagster instance: {home}")
    logs_seen = [0]
    started = time.perf_counter()
    failures = []
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} blocks"),
        TextColumn("{task.fields[logs]:,} logs"), TextColumn("{task.fields[rate]:,.0f} logs/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    ) as progress:
        task = progress.add_task("backfill", total=total_blocks, logs=0, rate=0.0)

        def on_progress(blocks: int, logs: int) -> None:
            logs_seen[0] += logs
            rate = logs_seen[0] / max(time.perf_counter() - started, 1e-6)
            progress.update(task, advance=blocks, logs=logs_seen[0], rate=rate)

        def on_batch(outcome) -> None:
            if not outcome.success:
                failures.append(outcome)
                progress.console.print(f"[red]run {outcome.run_id} ({outcome.first}..{outcome.last}) failed: {outcome.error}")

        assert config_path is not None  # the config loaded: --config or $INDEXER_CONFIG (click's envvar) gave it
        def on_backfill(backfill_id: str) -> None:
            progress.console.print(f"Dagster backfill {backfill_id} (the UI's Overview > Backfills; its runs are "
                                   f"tagged dagster/backfill={backfill_id})")

        run_backfill(instance, cfg, Path(config_path), ranges, workers, on_progress, on_batch, on_backfill)
    instance.dispose()
    from indexer_dagster.persist.lake import StorageError

    try:
        build_catalog(cfg)
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    if not failures:
        from indexer_dagster.dex import build as dex

        if dex.enabled(cfg):
            res = dex.build_dex(cfg)
            click.echo(f"DEX tables: {res.rows.get('swaps', 0):,} swaps, {res.rows.get('pool_state', 0)} pools "
                       f"({res.seconds:.1f}s)")
    elapsed = time.perf_counter() - started
    click.echo(f"done: {logs_seen[0]:,} logs in {elapsed:.1f}s ({logs_seen[0] / max(elapsed, 1e-6):,.0f} logs/s); "
               f"catalog: {cfg.duckdb_path}")
    if failures:
        raise click.ClickException(f"{len(failures)} run(s) failed (first: {failures[0].error}); "
                                   f"fix the cause and re-run the same command")
    import polars as pl

    from indexer_dagster.persist.lake import open_lake
    from indexer_dagster.persist.meta import read_failed

    bad = read_failed(open_lake(cfg)).filter(
        pl.col("range_key").is_in([r.key for r in ranges]))
    if bad.height:
        lines = [f"  {k} {n}: {d}" for k, n, d in bad.select("range_key", "check_name", "description").iter_rows()]
        raise click.ClickException("range checks failed (their rows stay unconfirmed):\n" + "\n".join(lines)
                                   + "\nre-run the same command to sync these ranges again")


@main.command()
@config_option
def catalog(config_path: str | None) -> None:
    """Rebuild the DuckDB catalog of views over the Parquet lake."""
    from indexer_dagster.persist.catalog import build_catalog
    from indexer_dagster.persist.duck_lock import catalog_lock_error

    cfg = _load(config_path)
    if locked := catalog_lock_error(cfg.duckdb_path):
        raise click.ClickException(locked)
    click.echo(f"catalog written: {build_catalog(cfg)}")


@main.command()
@config_option
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "line", "csv", "json", "parquet"]), default=None,
              help="table, or line (one `column = value` per line and record); default: a table when it fits "
                   "the terminal, else lines.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to a file (required for parquet).")
def query(config_path: str | None, sql: str, fmt: str | None, output: str | None) -> None:
    """Run read-only SQL against the catalog's views."""
    import shutil

    from indexer_dagster.query import QueryError
    from indexer_dagster.query import query as run_query
    from indexer_dagster.query.render import as_lines, as_table, for_terminal

    cfg = _load(config_path)
    if fmt == "parquet" and not output:
        raise click.ClickException("--format parquet needs --output FILE")
    if output and not Path(output).absolute().parent.is_dir():
        raise click.ClickException(f"--output {output}: the folder {Path(output).absolute().parent} does not exist; "
                                   "create it or write elsewhere")
    try:
        df = run_query(cfg.duckdb_path, sql)
    except QueryError as e:
        raise click.ClickException(str(e)) from None
    if fmt == "parquet":
        assert output is not None  # refused above without --output
        try:
            df.write_parquet(output)
        except OSError as e:
            raise click.ClickException(f"--output {output}: cannot write it ({e.strerror or e}); check permissions") from None
        return
    if fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json()
    elif fmt == "line":
        text = as_lines(df)
    else:
        width = shutil.get_terminal_size().columns  # $COLUMNS, else the terminal's, else 80
        text = as_table(df, width) if fmt == "table" else for_terminal(df, width)
    if output:
        try:
            Path(output).write_text(text)
        except OSError as e:
            raise click.ClickException(f"--output {output}: cannot write it ({e.strerror or e}); check permissions") from None
    else:
        click.echo(text)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".devnet", show_default=True)
@click.option("--port", type=int, default=8545, show_default=True)
@click.option("--chain-id", type=int, default=31337, show_default=True)
@click.option("--blocks", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--txs-per-block", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--block-time", type=float, default=None, help="Keep mining a block every N seconds afterwards.")
@click.option("--state-cache", type=click.Path(), default=None,
              help="A directory (or file) where an anvil state dump for these parameters is reused or created.")
def devnet(out_dir, port, chain_id, blocks, txs_per_block, seed, block_time, state_cache) -> None:
    """Start anvil, deploy real Uniswap V2 contracts, generate traffic, write a config; runs until Ctrl-C."""
    import signal

    from indexer_dagster.devnet import run_devnet

    # Stop cleanly (and stop anvil) on SIGTERM too: scripts that start the devnet in the background
    # cannot send it SIGINT (background jobs ignore it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    anvil, _deployment, config_path = run_devnet(
        out_dir=out_dir, port=port, chain_id=chain_id, blocks=blocks, txs_per_block=txs_per_block, seed=seed,
        block_time=block_time, state_cache=state_cache,
    )
    click.echo(f"devnet ready at {anvil.url}; config: {config_path}. Ctrl-C stops it.")
    _serve_until_interrupted(anvil.stop)


def _failed_partitions_fn(cfg):
    """Failed ranges from the Dagster instance ($DAGSTER_HOME, else `.dagster_home` beside the data), if any."""
    import os

    home = Path(os.environ.get("DAGSTER_HOME") or cfg.data_dir.parent / ".dagster_home")
    if not (home / "dagster.yaml").is_file():
        return None
    from indexer_dagster.launch import failed_partitions_of

    try:
        return failed_partitions_of(home)
    except Exception as e:  # noqa: BLE001 - the rest of the status is still worth printing
        click.echo(f"warning: the Dagster instance in {home} is unavailable ({type(e).__name__}); "
                   "failed ranges are not shown", err=True)
        return None


@main.command()
@config_option
@chain_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per chain, in a list.")
def status(config_path: str | None, chain: str | None, as_json: bool) -> None:
    """Health per chain: node and indexed heads, lag, partitions, last reorg, RPC errors."""
    import json

    from indexer_dagster.health.status import gather_status

    cfg = _load(config_path)
    failed = _failed_partitions_fn(cfg)
    statuses = [gather_status(c, failed(c) if failed else ()) for c in _selected_chains(cfg, chain)]
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in statuses], indent=2, default=str))
    else:
        from indexer_dagster.health.report import print_status

        print_status(statuses)


@main.command()
@config_option
@click.option("--textfile", type=click.Path(dir_okay=False),
              help="Write the metrics to this file (for node_exporter's textfile collector) and exit.")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve /metrics on this port until interrupted.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to serve on (with --port).")
def metrics(config_path: str | None, textfile: str | None, port: int | None, host: str) -> None:
    """Prometheus metrics of every chain: to stdout, a textfile, or an HTTP /metrics endpoint."""
    from indexer_dagster.health import metrics as m

    if textfile and port:
        raise click.ClickException("use either --textfile or --port, not both")
    cfg = _load(config_path)
    failed = _failed_partitions_fn(cfg)
    if textfile:
        m.write_textfile(cfg, textfile, failed)
        click.echo(f"metrics written: {textfile}")
    elif port:
        server, _thread = m.serve(cfg, port, host, failed)
        click.echo(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C stops)", err=True)
        _serve_until_interrupted(server.shutdown)
    else:
        click.echo(m.render(cfg, failed), nl=False)


@main.command()
@config_option
@chain_option
@click.option("--json", "as_json", is_flag=True, help="The ledger and halt of each chain as JSON.")
def reorgs(config_path: str | None, chain: str | None, as_json: bool) -> None:
    """The reorg ledger of each chain (newest first) and whether the chain is halted, with why."""
    import json

    from indexer_dagster.state import open_state, reorgs_frame

    cfg = _load(config_path)
    out = []
    with open_state(cfg.state_url) as store:
        for c in _selected_chains(cfg, chain):
            name = c.chain.name
            halt = store.halted(name)
            ledger = sorted(reorgs_frame(store, name), key=lambda r: r["id"], reverse=True)
            out.append({"chain": name, "halted": None if halt is None else {
                "reason": halt.reason, "reorg_id": halt.reorg_id, "since": halt.halted_at.isoformat()},
                "reorgs": ledger})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for c in out:
        halted = c["halted"]
        click.echo(f"{c['chain']}: " + (f"HALTED since {halted['since']}: {halted['reason']} "
                                         f"(then `indexer resume --chain {c['chain']}`)" if halted else "running"))
        for r in c["reorgs"][:20]:
            click.echo(f"  reorg {r['id']}: {r['phase']}, fork at {r['common_ancestor']}, depth {r['depth']}, "
                       f"{r['rows_archived_total']} rows archived, detected {r['detected_at']:%Y-%m-%d %H:%M:%S}"
                       + (f" — {r['note']}" if r["note"] else ""))


@main.command()
@config_option
@click.option("--chain", "chain", required=True, help="The halted chain to resume.")
def resume(config_path: str | None, chain: str) -> None:
    """Lift a chain's halt (after raising chain.reorg_window or re-running the backfill of the affected
    ranges): the sensor starts its follower and range runs again."""
    from indexer_dagster.state import open_state

    cfg = _load(config_path)
    if chain not in {c.chain.name for c in cfg.chains}:
        raise click.ClickException(f"chain {chain!r} is not in the config")
    with open_state(cfg.state_url) as store:
        halt = store.resume(chain)
    click.echo(f"{chain}: resumed (it was halted since {halt.halted_at:%Y-%m-%d %H:%M:%S} UTC: {halt.reason})"
               if halt else f"{chain} was not halted")


if __name__ == "__main__":
    sys.exit(main())
