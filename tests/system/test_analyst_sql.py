"""What an analyst sees in SQL, on a catalog the indexer built from a backfilled anvil devnet: through
`indexer query`, the Python API and a plain `duckdb` connection to the catalog file."""

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from eth_utils import to_checksum_address

from indexer_dagster.api import connect
from indexer_dagster.cli import main as cli
from indexer_dagster.config import load_config
from indexer_dagster.devnet import write_config
from indexer_dagster.devnet.uniswap import TOKEN_SUPPLY
from indexer_dagster.dex.build import build_dex
from indexer_dagster.persist.catalog import _with_numbers
from tests.sync.test_reorg import backfill_plain

pytestmark = pytest.mark.slow

POOL_VIEWS = ("pools", "pool_state", "pool_volume", "pool_candles")


@pytest.fixture(scope="module")
def indexed(devnet, tmp_path_factory):
    """The devnet backfilled and its DEX tables built: (config, config path)."""
    node, deployment = devnet
    path = write_config(tmp_path_factory.mktemp("analyst") / "indexer.yaml", node.url, 31337, deployment, "data",
                        blocks_per_partition=25, confirmations=5)
    cfg = load_config(path)
    backfill_plain(cfg)
    build_dex(cfg)
    return cfg, path


def run_cli(path, *args, columns: int = 120) -> str:
    """`indexer ARGS` in this process with a terminal `columns` wide; its output (exit status 0)."""
    result = CliRunner().invoke(cli, list(args), env={"INDEXER_CONFIG": str(path), "COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def plain(cfg) -> duckdb.DuckDBPyConnection:
    """The catalog opened as any DuckDB client would."""
    return duckdb.connect(str(cfg.duckdb_path), read_only=True)


def test_every_pool_view_names_its_pair(indexed):
    cfg, _ = indexed
    with connect(cfg.duckdb_path) as ix:
        for view in POOL_VIEWS:
            labels = ix.sql(f"select distinct symbol0, symbol1, pair from {view} order by pair")
            # The devnet's tokens are named ERC-20s (WETH, USDC, DAI, LINK); every pair says which market.
            assert labels.height > 0 and all(p == f"{a}/{b}" for a, b, p in labels.rows()), view
            assert set(labels["symbol0"]) | set(labels["symbol1"]) <= {"WETH", "USDC", "DAI", "LINK"}, view
        pools = ix.sql("select pair from pools order by pair")["pair"].to_list()
        assert len(pools) == 6 and len(set(pools)) == 6  # six distinct markets, one per pair of tokens
        assert ix.sql("select count(*) n from pools where pair is null")["n"][0] == 0


def test_a_checksummed_address_finds_its_rows_through_addr(indexed):
    """Addresses in the views are lower-case; `addr('0xAbC…')` (a macro of the catalog) makes a checksummed
    one, as copied from an explorer or the config, match in the CLI and in any DuckDB client."""
    cfg, path = indexed
    with plain(cfg) as con:
        [(pool, swaps)] = con.sql("select pool, count(*) from swaps group by 1 order by 2 desc limit 1").fetchall()
        checksummed = to_checksum_address(pool)
        assert checksummed != pool and swaps > 0
        count = "select count(*) n from swaps where pool = {}"
        assert con.sql(count.format(f"'{checksummed}'")).fetchall() == [(0,)]  # why the macro exists
        assert con.sql(count.format(f"addr('{checksummed}')")).fetchall() == [(swaps,)]
        assert con.sql(f"select count(*) from pools where pool = addr(' {checksummed} ')").fetchall() == [(1,)]
        assert con.sql("select addr(null)").fetchall() == [(None,)]
        with pytest.raises(duckdb.InvalidInputException, match="not a 0x-prefixed 20-byte hex address"):
            con.sql(count.format(f"addr('{checksummed[:-1]}')")).fetchall()
    out = run_cli(path, "query", "--format", "csv", count.format(f"addr('{checksummed}')"))
    assert out.split() == ["n", str(swaps)]
    with connect(cfg.duckdb_path) as ix:
        assert ix.sql(count.format("addr(?)"), [checksummed])["n"][0] == swaps


def test_block_time_has_one_name_in_every_view(indexed):
    cfg, path = indexed
    with plain(cfg) as con:
        columns = con.sql("select table_name, column_name from information_schema.columns "
                          "where table_schema = 'main'").fetchall()
        assert ("blocks", "block_timestamp") in columns and ("orphaned_blocks", "block_timestamp") in columns
        assert [(t, c) for t, c in columns if c == "timestamp"] == []
        mismatched = con.sql("select count(*) from swaps s join blocks b "
                             "on b.number = s.block_number and b.block_timestamp <> s.block_timestamp").fetchall()
        assert mismatched == [(0,)]
    out = run_cli(path, "query", "--format", "csv", "select max(block_timestamp) is not null ok from blocks")
    assert out.split() == ["ok", "true"]


def test_show_tables_lists_the_analysts_views_only(indexed):
    """The views the others are built from, and the catalog's bookkeeping, are in the `internal` schema."""
    cfg, path = indexed
    with plain(cfg) as con:
        shown = {name for (name,) in con.sql("show tables").fetchall()}
        internal = {name for (name,) in con.sql("select view_name from duckdb_views() "
                                                "where schema_name = 'internal'").fetchall()}
        assert {"_catalog_version", "_range_blocks", "_live_blocks", "_contract_addresses"} <= internal
        assert con.sql("select count(*) from internal._range_blocks").fetchall()[0][0] > 0
    assert {"blocks", "logs", "chain_heads", "swaps", *POOL_VIEWS} <= shown
    assert [name for name in shown if name.startswith("_")] == []
    out = run_cli(path, "query", "--format", "csv", "show tables")
    assert set(out.split()[1:]) == shown
    with connect(cfg.duckdb_path) as ix:
        assert set(ix.views()) == shown


def records(out: str) -> list[dict[str, str]]:
    """`--format line` output back to records (blank lines part them; `name = value`, names right-aligned)."""
    return [dict(line.strip().split(" = ", 1) for line in block.splitlines()) for block in out.strip().split("\n\n")]


def test_a_wide_result_is_shown_one_column_per_line(indexed):
    cfg, path = indexed
    wide = "select * from swaps order by block_number, log_index limit 3"
    with plain(cfg) as con:
        rel = con.sql(wide)
        expected, columns = rel.fetchall(), rel.columns
    assert len(columns) > 30
    for out in (run_cli(path, "query", wide, columns=100), run_cli(path, "query", "--format", "line", wide)):
        got = records(out)
        assert [list(r) for r in got] == [columns] * 3  # every column, in order, once per record
        for record, row in zip(got, expected, strict=True):
            assert record["pool"] == row[columns.index("pool")]  # whole values, never cut
            assert record["transaction_hash"] == row[columns.index("transaction_hash")]
            assert int(record["amount_in"]) == row[columns.index("amount_in")]
        assert max(len(line) for line in out.splitlines()) <= 100
    # A narrow result stays a table; --format table keeps one even when it does not fit.
    narrow = run_cli(path, "query", "select pair, count(*) n from swaps group by 1", columns=100)
    assert " = " not in narrow and "┆" in narrow and any(f"/{t}" in narrow for t in ("WETH", "USDC", "DAI", "LINK"))
    forced = run_cli(path, "query", "--format", "table", wide, columns=100)
    assert " = " not in forced and "shape: (3, " in forced
    # A long wide result is cut to 100 records in the terminal, and says so.
    many = run_cli(path, "query", "select * from swaps", columns=100)
    assert len(records(many.rsplit("\n\n", 1)[0])) == 100 and "rows shown; --format line shows them all" in many


def test_big_integers_have_a_column_duckdb_sums_exactly(indexed):
    """uint/int wider than 64 bits stay exact text (`value`) and are also `value_num DECIMAL(38,0)`."""
    cfg, path = indexed
    with plain(cfg) as con:
        types = dict(con.sql("select column_name, data_type from information_schema.columns "
                             "where table_name = 'erc20_transfer'").fetchall())
        assert (types["value"], types["value_f64"], types["value_num"]) == ("VARCHAR", "DOUBLE", "DECIMAL(38,0)")
        columns = [c for (c,) in con.sql("select column_name from information_schema.columns where table_name = "
                                         "'uniswap_v2_pair_swap' order by ordinal_position").fetchall()]
        at = columns.index("amount0_in")
        assert columns[at: at + 3] == ["amount0_in", "amount0_in_f64", "amount0_in_num"]
        values = [int(v) for (v,) in con.sql("select value from erc20_transfer").fetchall()]
        assert len(values) > 10 and any(v >= 2**64 for v in values)
        [(total, kind)] = con.sql("select sum(value_num), typeof(sum(value_num)) from erc20_transfer").fetchall()
        assert (int(total), kind) == (sum(values), "DECIMAL(38,0)")  # exact: no float on the way
        # The view's own SQL on values the devnet has none of: beyond 10^38 NULL, never rounded; signed exact.
        edge = ("select * from (values ('1' || repeat('0', 38), 1e38), (repeat('9', 38), 1e38), ('-7', -7.0)) "
                "t(value, value_f64)")
        got = con.sql(_with_numbers(edge, {"value": pl.String, "value_f64": pl.Float64}, ["value"])).fetchall()
        assert [(v, n) for v, _, n in got] == [("1" + "0" * 38, None), ("9" * 38, int("9" * 38)), ("-7", -7)]
        assert con.sql("select count(*) from orphaned_erc20_transfer where value_num is not null").fetchall() == [(0,)]
    out = run_cli(path, "query", "--format", "csv", "select sum(value_num) total from erc20_transfer")
    assert out.split() == ["total", str(sum(values))]


def test_erc20_amounts_have_a_human_column_where_the_token_decimals_are_known(indexed):
    """ERC-20 Transfer and Approval views carry `value_h` = value / 10^decimals, the decimals of the token (the
    emitting contract) as the `tokens` table read them from the chain: 6 for USDC, 18 for WETH; NULL for a
    token the table does not know (the pairs' LP tokens)."""
    cfg, path = indexed
    with plain(cfg) as con:
        for view in ("erc20_transfer", "erc20_approval", "orphaned_erc20_transfer"):
            columns = con.sql("select column_name, data_type from information_schema.columns where table_name = "
                              f"'{view}' order by ordinal_position").fetchall()
            at = columns.index(("value", "VARCHAR"))
            assert columns[at: at + 4] == [("value", "VARCHAR"), ("value_f64", "DOUBLE"),
                                          ("value_num", "DECIMAL(38,0)"), ("value_h", "DOUBLE")], view
        rows = con.sql("select k.symbol, k.decimals, t.value, t.value_h from erc20_transfer t "
                       "join tokens k on k.address = t.address").fetchall()
        assert {s for s, *_ in rows} == {"WETH", "USDC", "DAI", "LINK"}
        for symbol, decimals, value, human in rows:
            assert human == pytest.approx(int(value) / 10 ** {"USDC": 6}.get(symbol, 18), rel=1e-15), symbol
            assert decimals == {"USDC": 6}.get(symbol, 18)
        assert con.sql("select count(*) from erc20_transfer where value_h is null").fetchall() == [(0,)]
        [(n, known)] = con.sql("select count(*), count(value_h) from uniswap_v2_pair_transfer").fetchall()
        assert n > 0 and known == 0  # LP tokens: not in `tokens`
        usdc = con.sql("select address from tokens where symbol = 'USDC'").fetchall()[0][0]
        [(total_h, total)] = con.sql("select sum(value_h), sum(value_num) from erc20_approval "
                                     f"where address = '{usdc}'").fetchall()
        assert total_h == pytest.approx(int(total) / 10**6, rel=1e-12)
    out = run_cli(path, "query", "--format", "csv", "select value_h from erc20_transfer where address = "
                  f"'{usdc}' order by value_num desc limit 1")
    assert float(out.split()[1]) == pytest.approx(con_max := max(int(v) for s, _, v, _ in rows if s == "USDC") / 10**6)
    assert con_max == TOKEN_SUPPLY  # whole USDC: the largest transfer is the constructor's mint of the supply


def readme_queries() -> list[str]:
    """The statements of the README's analyst-queries block, in order."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("<!-- analyst-queries -->", 1)[1].split("<!-- /analyst-queries -->", 1)[0]
    sql = block.split("```sql", 1)[1].rsplit("```", 1)[0]
    return [q.strip() for q in sql.split(";") if q.strip()]


def test_the_readme_answers_analyst_questions_in_one_query_each(indexed):
    cfg, path = indexed
    price, transfers, markets = readme_queries()
    with connect(cfg.duckdb_path) as ix:
        candles = ix.sql(price)
        assert candles.height > 0 and (candles["low"] <= candles["high"]).all()
        both = ix.sql("select pool from pools where 'WETH' in (symbol0, symbol1) and 'DAI' in (symbol0, symbol1)")
        assert both.height == 1
        largest = ix.sql(transfers)
        usdc = ix.sql("select address from tokens where symbol = 'USDC'")["address"][0]
        exact = ix.sql(f"select value from erc20_transfer where address = '{usdc}'")["value"]
        top = sorted((int(v) for v in exact), reverse=True)[:10]
        assert largest.height == 10
        assert largest["amount"].to_list() == pytest.approx([v / 10**6 for v in top], rel=1e-15)
        top = ix.sql(markets)
        assert top.height == 6 and top["volume_weth"].null_count() == 0
        assert top["volume_weth"].to_list() == sorted(top["volume_weth"], reverse=True)
        assert top["swaps"].sum() == ix.sql("select count(*) n from swaps")["n"][0]
        # A pool holding WETH: its WETH volume is the WETH it moved, as pool_volume's own columns say.
        direct = ix.sql("select sum(volume_ref) ref, sum(case when symbol0 = 'WETH' then volume_token0_h "
                        "else volume_token1_h end) weth from pool_volume where interval = '1d' "
                        "and 'WETH' in (symbol0, symbol1)")
        assert direct["ref"][0] == pytest.approx(direct["weth"][0], rel=1e-9)
    # The same queries through the CLI.
    for q in (price, transfers, markets):
        assert run_cli(path, "query", "--format", "csv", "--", q).count("\n") > 1  # (-- ends the options)
