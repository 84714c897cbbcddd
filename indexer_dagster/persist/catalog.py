"""The DuckDB catalog: stable views over the Parquet lake, rebuilt as a whole and swapped in atomically.

The analyst's views are in the `main` schema; the views they are built from, and the catalog's own
bookkeeping, are in `internal` (out of `show tables`). The database holds only views and macros (no
data), so it is built in a temporary file and renamed over the old one: there is never a second writer to fight over DuckDB's lock, and readers (which open it
read-only) keep working through a rebuild. Views read Parquet globs, so new range files show up in
queries without rebuilding; a rebuild is needed only when the set of tables changes.

A lake on object storage is read through its fsspec filesystem, registered on each connection
(DuckDB's own httpfs extension would be downloaded at run time). The catalog names that lake in an
`internal._lake` view, so a reader needs nothing but the catalog's path (and the storage credentials in
its environment) — see `attach_lake`.
"""

import errno
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import duckdb
import polars as pl
from filelock import FileLock

from indexer_dagster.config import IndexerConfig
from indexer_dagster.parse.abi import EventSpec
from indexer_dagster.persist import datasets as ds
from indexer_dagster.persist.duck_lock import lock_message
from indexer_dagster.persist.files import is_remote
from indexer_dagster.persist.gate import Gate
from indexer_dagster.persist.lake import StorageError, open_lake
from indexer_dagster.persist.meta import ensure_failed_checks, ensure_reorgs

_DUCK_TYPES = {
    pl.Int64: "BIGINT",
    pl.UInt64: "UBIGINT",
    pl.Int32: "INTEGER",
    pl.Float64: "DOUBLE",
    pl.String: "VARCHAR",
    pl.Boolean: "BOOLEAN",
}


def duck_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    for k, v in _DUCK_TYPES.items():
        if dtype == k:
            return v
    raise TypeError(f"no DuckDB type for {dtype}")


def quote_name(name: str) -> str:
    """A DuckDB identifier (view, column) quoted."""
    return '"' + name.replace('"', '""') + '"'


def _qualified(name: str) -> str:
    """A view name, `schema.name` or `name`, quoted part by part (no view name of the lake has a dot)."""
    return ".".join(quote_name(part) for part in name.split("."))


def _source(globs: list[str], schema: dict[str, pl.DataType]) -> str:
    """A SELECT of the Parquet files matching `globs` (each must match a file), or an empty typed SELECT
    when there are none."""
    if globs:
        cols = ", ".join(quote_name(c) for c in schema)
        return f"SELECT {cols} FROM {_read(globs)}"
    cols = ", ".join(f"CAST(NULL AS {duck_type(t)}) AS {quote_name(c)}" for c, t in schema.items())
    return f"SELECT {cols} WHERE false"


INTERNAL_SCHEMA = "internal"


def internal(name: str) -> str:
    """The qualified name of a view kept out of the analyst's namespace (`show tables` lists `main` only)."""
    return f"{INTERNAL_SCHEMA}.{name}"


RANGE_BLOCKS = internal("_range_blocks")
LIVE_BLOCKS = internal("_live_blocks")
RANGE_BLOCK_NUMBERS = internal("_range_block_numbers")
CONTRACT_ADDRESSES = internal("_contract_addresses")
TOKEN_DECIMALS = internal("_token_decimals")


def view_statements(cfg: IndexerConfig) -> dict[str, str]:
    """CREATE VIEW statements, by view name, for every table of the lake.

    A dataset's rows come from its range files plus its live segments, where a block present in a
    range file is taken from the range file only (the two meet without a duplicate). Orphaned rows
    (moved out by a reorg) are in `orphaned_<dataset>`.
    """
    d = cfg.lake_root
    chains = [c.chain.name for c in cfg.chains]
    lakes = [open_lake(cfg, chain) for chain in chains]
    views: dict[str, str] = {}
    if is_remote(d):
        options = json.dumps(cfg.storage.lake_options, sort_keys=True)
        views[LAKE_VIEW] = f"SELECT {_literal(str(d))} AS url, {_literal(options)} AS options"
    views[GATES_VIEW] = gates_view([lake.gate.dir for lake in lakes])

    # One glob per chain, not one `*` over the chains: on object storage a wildcard directory means
    # listing every directory of the lake on each query.
    def src(dataset: str, schema: dict) -> str:
        # Every dataset directory holds an empty typed schema file, so its glob never matches nothing.
        for lake in lakes:
            lake.ensure_schema_file(dataset, schema)
        return _source([lake.glob(dataset) for lake in lakes], schema)

    def meta(key: str, schema: dict) -> str:
        # The chains that have the file (a chain's first range run writes its head, then this catalog).
        return _source([str(p) for lake in lakes if (p := lake.path(ds.META, key)).is_file()], schema)

    # Ranges whose last checks failed (sync.range_checks): their rows stay unconfirmed.
    for lake in lakes:
        ensure_failed_checks(lake)
        ensure_reorgs(lake)  # the first reorg comes later: its view reads the file from the start
    views["chain_heads"] = meta(ds.HEAD, ds.HEAD_SCHEMA)
    views["failed_checks"] = meta(ds.FAILED_CHECKS, ds.FAILED_CHECKS_SCHEMA)
    views[RANGE_BLOCKS] = src(ds.BLOCKS, ds.BLOCK_SCHEMA)
    views[LIVE_BLOCKS] = src(ds.live(ds.BLOCKS), ds.BLOCK_SCHEMA)
    # Block numbers that range files hold, above the lowest live block (DuckDB prunes by file statistics).
    views[RANGE_BLOCK_NUMBERS] = (
        f"SELECT chain_id, number FROM {RANGE_BLOCKS} "
        f"WHERE number >= (SELECT coalesce(min(number), 0) FROM {LIVE_BLOCKS})"
    )

    def merged(dataset: str, schema: dict, number_col: str) -> str:
        live = src(ds.live(dataset), schema)
        return (
            f"SELECT * FROM ({src(dataset, schema)}) UNION ALL "
            f"SELECT * FROM ({live}) l WHERE NOT EXISTS (SELECT 1 FROM {RANGE_BLOCK_NUMBERS} r "
            f"WHERE r.chain_id = l.chain_id AND r.number = l.{number_col})"
        )

    def with_status(sql: str, number_col: str) -> str:
        return (
            f"SELECT x.*, CASE WHEN x.{number_col} <= h.confirmed_through AND NOT EXISTS (SELECT 1 FROM "
            f"failed_checks f WHERE f.chain_id = x.chain_id AND x.{number_col} BETWEEN f.first_block AND "
            f"f.last_block) THEN 'confirmed' ELSE 'unconfirmed' END AS status FROM ({sql}) x "
            f"LEFT JOIN chain_heads h ON h.chain_id = x.chain_id"
        )

    tables: list[tuple[str, ds.Schema, str]] = [
        (ds.BLOCKS, ds.BLOCK_SCHEMA, "number"), (ds.LOGS, ds.LOG_SCHEMA, "block_number")]
    # One view per table across all chains of the config (their files sit under data_dir/<chain>/).
    specs = {spec.table: spec for c in cfg.chains for _, spec in c.all_specs()}
    tables += [(ds.events(table), ds.Schema(spec.schema()), "block_number") for table, spec in specs.items()]
    numbers = {ds.events(table): number_columns(spec) for table, spec in specs.items()}
    amounts = {ds.events(table): token_amount(spec) for table, spec in specs.items()}
    views[CONTRACT_ADDRESSES] = _contract_addresses(cfg, src)
    views[TOKEN_DECIMALS] = _token_decimals(cfg, lakes)
    contracts_of: dict[str, set[str]] = {}
    for c in cfg.chains:
        for contract, spec in c.all_specs():
            contracts_of.setdefault(ds.events(spec.table), set()).add(contract.name)
    for dataset, schema, number_col in tables:
        name = dataset.split("/")[-1]
        sql = merged(dataset, schema, number_col)
        if dataset != ds.BLOCKS:
            # Only the configured contracts: one removed from the config is hidden, its files kept.
            only = contracts_of.get(dataset)
            which = f" AND c.contract IN ({', '.join(repr(n) for n in sorted(only))})" if only else ""
            sql = (f"SELECT m.* FROM ({sql}) m WHERE EXISTS (SELECT 1 FROM {CONTRACT_ADDRESSES} c "
                   f"WHERE c.chain_id = m.chain_id AND c.address = m.address{which})")
        big, amount = numbers.get(dataset, []), amounts.get(dataset)
        views[name] = _renamed(with_status(_with_numbers(sql, schema, big, amount), number_col), dataset)
        orphans = {**schema, **ds.ORPHAN_COLUMNS}
        views[f"orphaned_{name}"] = _renamed(
            _with_numbers(src(ds.orphaned(dataset), orphans), orphans, big, amount), dataset)
    views["reorgs"] = meta(ds.REORGS, ds.REORGS_SCHEMA)
    # Derived DEX tables (dex.incremental): a view once the first step wrote them.
    for table, col in ds.DEX_TABLES.items():
        if table in (*ds.DEX_ROW_TABLES, *ds.DEX_DAY_TABLES):
            # A directory of step or day files, each with its schema file once written (see `Lake.glob`).
            files = [lake.glob(ds.dex(table)) for lake in lakes if lake.has_schema_file(ds.dex(table))]
        else:
            files = [str(p) for lake in lakes if (p := lake.path(ds.DEX, table)).is_file()]
        if not files:
            continue
        sql = f"SELECT * FROM {_read(files)}"
        views[table] = with_status(sql, col) if col else sql
        if table in ds.DEX_ROW_TABLES:
            archives = [lake.glob(ds.orphaned(ds.dex(table))) for lake in lakes
                        if lake.has_schema_file(ds.orphaned(ds.dex(table)))]
            if archives:
                views[f"orphaned_{table}"] = f"SELECT * FROM {_read(archives)}"
    return views


# Columns a view names differently from its files: one name for one thing across the views (`blocks`
# says `block_timestamp` like every other view), without rewriting every range file ever written.
VIEW_RENAMES: dict[str, dict[str, str]] = {ds.BLOCKS: {"timestamp": "block_timestamp"}}


def _renamed(sql: str, dataset: str) -> str:
    """`sql` with the dataset's file columns renamed as its view shows them (`VIEW_RENAMES`)."""
    renames = VIEW_RENAMES.get(dataset)
    if not renames:
        return sql
    pairs = ", ".join(f"{quote_name(old)} AS {quote_name(new)}" for old, new in renames.items())
    return f"SELECT * RENAME ({pairs}) FROM ({sql})"


def view_columns(dataset: str, schema: ds.Schema, big: list[str] | None = None,
                 amount: str | None = None) -> list[tuple[str, str]]:
    """(name, DuckDB type) of the columns the view over `dataset` shows, in order, before `status`: the
    files' `schema` renamed as `VIEW_RENAMES` says, with `<column>_num` after each big integer's `_f64`
    (`big`: see `number_columns`) and `<amount>_h` after an ERC-20 amount's `_num` (see `token_amount`).
    What the view's SQL selects, for those who describe it (Dagster)."""
    renames = VIEW_RENAMES.get(dataset, {})
    out = []
    for c, dtype in schema.items():
        try:
            typ = duck_type(dtype)  # type: ignore[arg-type]  # a dtype class equals its instance
        except TypeError:  # a type the empty-view mapping lacks: Polars' name still says what it is
            typ = str(dtype)
        out.append((renames.get(c, c), typ))
        if (base := _numbered(c, big or [])) is not None:
            out.append((f"{base}_num", "DECIMAL(38,0)"))
            if base == amount:
                out.append((f"{base}_h", "DOUBLE"))
    return out


def _numbered(column: str, big: list[str]) -> str | None:
    """The big integer whose `<base>_num` the view shows right after `column`, its `<base>_f64`; else None."""
    base = column.removesuffix("_f64")
    return base if column.endswith("_f64") and base in big else None


def number_columns(spec: EventSpec) -> list[str]:
    """The big-integer columns (uint/int wider than 64 bits, stored as exact text) that the view also shows
    as `<column>_num DECIMAL(38,0)`, a number DuckDB sums exactly (NULL when |value| >= 10^38); not when an
    argument of the event already has that name."""
    schema = spec.schema()
    return [p.column for p in spec.inputs if p.is_big_int and f"{p.column}_num" not in schema]


def token_amount(spec: EventSpec) -> str | None:
    """The amount column of an ERC-20 `Transfer` / `Approval` (address indexed, address indexed, uint256),
    which the view also shows as `<amount>_h`, scaled by the emitting token's decimals; else None (an
    ERC-721 Transfer indexes its third argument: a token id, not an amount)."""
    shape = [(p.type, p.indexed) for p in spec.inputs]
    if (spec.name not in ("Transfer", "Approval") or spec.anonymous
            or shape != [("address", True), ("address", True), ("uint256", False)]):
        return None
    column = spec.inputs[2].column
    return column if f"{column}_h" not in spec.schema() and f"{column}_num" not in spec.schema() else None


def _token_decimals(cfg: IndexerConfig, lakes: list) -> str:
    """(chain_id, address, decimals), one row per token: the DEX `tokens` table of each chain (decimals read
    once per token with eth_call), where it has been built."""
    parts = ["SELECT CAST(NULL AS BIGINT) AS chain_id, CAST(NULL AS VARCHAR) AS address, "
             "CAST(NULL AS BIGINT) AS decimals WHERE false"]
    for c, lake in zip(cfg.chains, lakes):
        if (p := lake.path(ds.DEX, "tokens")).is_file():
            parts.append(f"SELECT CAST({int(c.chain.chain_id)} AS BIGINT), address, CAST(decimals AS BIGINT) "
                         f"FROM {_read([str(p)])}")
    return ("SELECT chain_id, address, min(decimals) AS decimals FROM (" + " UNION ALL ".join(parts) + ") t "
            "WHERE decimals IS NOT NULL GROUP BY chain_id, address")


def _with_numbers(sql: str, schema: ds.Schema, big: list[str], amount: str | None = None) -> str:
    """`sql` with `<column>_num` after each big integer's `<column>_f64` (see `number_columns`), and `<amount>_h`
    (DOUBLE: `<amount>_f64` / 10^decimals, NULL where the token's decimals are unknown) after the `_num` of an
    ERC-20 amount (see `token_amount`)."""
    if not big:
        return sql
    cols = []
    for c in schema:
        cols.append(f"n.{quote_name(c)}")
        if (base := _numbered(c, big)) is not None:
            cols.append(f"TRY_CAST(n.{quote_name(base)} AS DECIMAL(38,0)) AS {quote_name(base + '_num')}")
            if base == amount:  # '1e6' read as a double: 10^decimals correctly rounded, like the DEX's _h columns
                cols.append(f"n.{quote_name(c)} / CAST('1e' || d.decimals AS DOUBLE) AS {quote_name(base + '_h')}")
    if amount not in big:
        return f"SELECT {', '.join(cols)} FROM ({sql}) n"
    return (f"SELECT {', '.join(cols)} FROM ({sql}) n LEFT JOIN {TOKEN_DECIMALS} d "
            "ON d.chain_id = n.chain_id AND d.address = n.address")


def _contract_addresses(cfg: IndexerConfig, src) -> str:
    """(chain_id, contract, address) of every configured contract: the static addresses, and the
    factory children in the lake's child registry (range files and live segments)."""
    static = [f"({c.chain.chain_id}, '{k.name}', '{a}')" for c in cfg.chains for k in c.contracts for a in k.addresses]
    factory = [f"({c.chain.chain_id}, '{k.name}')" for c in cfg.chains for k in c.contracts if k.factory is not None]
    parts = ["SELECT CAST(NULL AS BIGINT) AS chain_id, CAST(NULL AS VARCHAR) AS contract, "
             "CAST(NULL AS VARCHAR) AS address WHERE false"]
    if static:
        parts.append(f"SELECT * FROM (VALUES {', '.join(static)}) t(chain_id, contract, address)")
    if factory:
        children = (f"SELECT chain_id, contract, address FROM ({src(ds.CHILDREN, ds.CHILD_SCHEMA)}) UNION ALL "
                    f"SELECT chain_id, contract, address FROM ({src(ds.live(ds.CHILDREN), ds.CHILD_SCHEMA)})")
        parts.append(f"SELECT DISTINCT ch.chain_id, ch.contract, ch.address FROM ({children}) ch "
                     f"JOIN (VALUES {', '.join(factory)}) f(chain_id, contract) "
                     "ON f.chain_id = ch.chain_id AND f.contract = ch.contract")
    return " UNION ALL ".join(parts)


_FILE_SET_ATTEMPTS = 5  # rebuilds when files vanish under the glob while views bind


LAKE_VIEW = internal("_lake")
GATES_VIEW = internal("_gates")  # where a reader waits out publishes and repairs (`persist.gate`)


def gates_view(dirs: list[Path]) -> str:
    return "SELECT * FROM (VALUES " + ", ".join(f"({_literal(str(d))})" for d in dirs) + ") AS gates(dir)"


def gates_of(con: duckdb.DuckDBPyConnection) -> list[Gate]:
    """The gates of the lakes the catalog reads (none for a catalog built before gates existed)."""
    try:
        rows = con.execute(f"SELECT dir FROM {GATES_VIEW}").fetchall()
    except duckdb.CatalogException:
        return []
    return [Gate(Path(d)) for (d,) in rows]


LISTING_TTL_S = 2.0


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read(paths: list[str]) -> str:
    return f"read_parquet([{', '.join(_literal(p) for p in paths)}], union_by_name = true)"


def attach_lake(con: duckdb.DuckDBPyConnection) -> None:
    """Register the filesystem of a remote lake (named in the catalog's `internal._lake` view) on `con`, so its
    views can read their files; nothing to do for a lake on the local disk."""
    try:
        url, options = _lake_of(con)
    except duckdb.CatalogException:
        return  # a local lake
    register_lake_filesystem(con, url, options)


def _reader_filesystem(url: str, options: dict):
    """The fsspec filesystem DuckDB reads a remote lake with (one instance per lake and process).

    DuckDB asks for a file's size and date many times per query: they come from the glob's listing,
    cached for the query (`retry_on_changed_files` drops it before each). A file replaced or removed
    meanwhile fails the read (its ETag changed) rather than mixing versions, and the query runs again."""
    import fsspec

    protocol = url.split("://", 1)[0]
    return fsspec.filesystem(protocol, **{"use_listings_cache": True, "listings_expiry_time": LISTING_TTL_S,
                                          **options})


def files_changed(e: BaseException) -> bool:
    """`e` says a file the query's globs matched was replaced or removed before it was read."""
    low = str(e).lower()
    # Local: "No such file"; a glob that lost its last match; object stores: a changed ETag, a removed key.
    return any(m in low for m in ("no such file", "no files found", "no longer exists", "filenotfounderror"))


def retry_on_changed_files(con: duckdb.DuckDBPyConnection, run, attempts: int = 4):
    """`run()` on a fresh listing of the lake, again while the files it read changed under it: a live
    segment compacted, a range republished. The listing is cached within one query only: kept across
    queries, it would hide a file written a moment before (rows missing, no error)."""
    for attempt in range(attempts):
        _drop_listing(con)
        try:
            return run()
        except duckdb.Error as e:
            _abort(con)  # a query that failed while fetching leaves its result open on the connection
            if not files_changed(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _drop_listing(con: duckdb.DuckDBPyConnection) -> None:
    if not con.list_filesystems():
        return  # a local lake (no fsspec filesystem registered): DuckDB lists it afresh for every query
    try:
        _reader_filesystem(*_lake_of(con)).invalidate_cache()
    except duckdb.CatalogException:
        pass  # no lake named in the catalog


def _lake_of(con: duckdb.DuckDBPyConnection) -> tuple[str, dict]:
    """(url, fsspec options) of the remote lake the catalog names; CatalogException for a local lake."""
    [(url, options)] = con.execute(f"SELECT url, options FROM {LAKE_VIEW}").fetchall()  # all: no open result
    return url, json.loads(options)


def _abort(con: duckdb.DuckDBPyConnection) -> None:
    abort = getattr(con, "abort", None)  # DuckDB 2: the rest of a failed execute() must be cancelled
    if abort is not None:
        try:
            abort()
        except duckdb.Error:
            pass


def register_lake_filesystem(con: duckdb.DuckDBPyConnection, url: str, options: dict) -> None:
    fs = _reader_filesystem(url, options)
    names = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not names & set(con.list_filesystems()):
        con.register_filesystem(fs)
    # Objects are replaced under the same name: never serve a cached copy of an older one.
    _set_if_known(con, "enable_external_file_cache", "false")


def _set_if_known(con: duckdb.DuckDBPyConnection, name: str, value: str) -> None:
    """`SET name = value` where this DuckDB has the setting (the catalog runs on DuckDB 1.4 and 2)."""
    if con.execute("SELECT count(*) FROM duckdb_settings() WHERE name = ?", [name]).fetchall()[0][0]:
        con.execute(f"SET {name} = {value}")


VERSION_VIEW = internal("_catalog_version")

# Macros every catalog holds, for SQL users (name -> parameters and body). Hex in the views is lower-case,
# so an address copied checksummed from an explorer or a config would match nothing: `addr('0xAbC…')`
# lower-cases it, and stops the query on a malformed address instead of returning no rows.
MACROS = {
    "addr": "(address) AS CASE WHEN address IS NULL THEN NULL "
            "WHEN regexp_full_match(trim(address), '0x[0-9a-fA-F]{40}') THEN lower(trim(address)) "
            "ELSE error('addr(): ' || address || ' is not a 0x-prefixed 20-byte hex address') END",
}


def _fingerprint(statements: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([statements, MACROS], sort_keys=True).encode()).hexdigest()


def _current_fingerprint(target: Path) -> str | None:
    """The fingerprint of the view statements the catalog at `target` was built from (None: unknown)."""
    if not target.is_file():
        return None
    try:
        con = duckdb.connect(str(target), read_only=True)
    except duckdb.Error:
        return None
    try:
        return con.execute(f"SELECT fingerprint FROM {VERSION_VIEW}").fetchall()[0][0]
    except duckdb.Error:
        return None
    finally:
        con.close()


def build_catalog(cfg: IndexerConfig) -> Path:
    """(Re)build the DuckDB file of views and swap it in atomically; nothing to do when the views it
    would create are those the catalog has (they read their globs at query time)."""
    target = cfg.duckdb_path
    target.parent.mkdir(parents=True, exist_ok=True)
    remote = is_remote(cfg.lake_root)

    def register(con: duckdb.DuckDBPyConnection) -> None:
        if remote:
            register_lake_filesystem(con, str(cfg.lake_root), cfg.storage.lake_options)

    with FileLock(str(target) + ".lock"):
        statements = view_statements(cfg)
        if _current_fingerprint(target) == _fingerprint(statements):
            return target
        for attempt in range(_FILE_SET_ATTEMPTS):
            if attempt:
                statements = view_statements(cfg)
            statements[VERSION_VIEW] = f"SELECT {_literal(_fingerprint(statements))} AS fingerprint"
            try:
                return write_views(target, statements, register)
            except duckdb.Error as e:
                # Binding a view reads the files its glob matched; a live segment compacted or a range
                # republished meanwhile is gone by then. The file set changed, not the lake: build again.
                if not files_changed(e) or attempt == _FILE_SET_ATTEMPTS - 1:
                    raise
                if remote:
                    _reader_filesystem(str(cfg.lake_root), cfg.storage.lake_options).invalidate_cache()
                time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def write_views(target: Path, views: dict[str, str], register=None) -> Path:
    """A DuckDB file holding `views` (name or schema.name -> SELECT) and the `MACROS`, built under a temporary name and
    renamed over `target`: readers see the old catalog or the new one. `register(con)` runs first (a filesystem)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        con = duckdb.connect(str(tmp))
        try:
            if register is not None:
                register(con)
            for schema in sorted({name.split(".")[0] for name in views if "." in name}):
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_name(schema)}")
            for name, sql in views.items():
                con.execute(f"CREATE OR REPLACE VIEW {_qualified(name)} AS {sql}")
            for name, body in MACROS.items():
                con.execute(f"CREATE OR REPLACE MACRO {quote_name(name)}{body}")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
    except duckdb.IOException as e:
        # e.g. a full disk: the old catalog stays in place; say where and why, not a DuckDB traceback.
        low = str(e).lower()
        code = errno.ENOSPC if "no space" in low else errno.EACCES if "permission" in low else None
        if code is None:
            raise
        raise StorageError.from_os_error(OSError(code, str(e), str(tmp)), target.parent) from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return target


# -- reading ------------------------------------------------------------------------------------

CATALOG_ALIAS = "indexer_catalog"
_LOCK_RETRIES = 20


class CatalogUnavailable(Exception):
    """The catalog cannot be opened; the message says why and what to do."""


def open_catalog(path: Path) -> duckdb.DuckDBPyConnection:
    """A private in-memory database with the catalog at `path` attached read-only as `CATALOG_ALIAS`
    (retrying briefly while another program holds a write lock on it). The one way the indexer opens
    its catalog for reading: `duckdb.connect(path)` would hand back a process-wide cached instance of an
    older, renamed-over catalog."""
    for attempt in range(_LOCK_RETRIES):
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH {_literal(str(path))} AS {CATALOG_ALIAS} (READ_ONLY)")
            con.execute(f"USE {CATALOG_ALIAS}")
            # Timestamps come back in UTC whatever the machine's zone, and local Parquet files are
            # never served from a cache (a file replaced by rename must be read afresh).
            con.execute("SET TimeZone = 'UTC'")
            _set_if_known(con, "cache_local_files", "false")  # DuckDB 2 caches local files; 1.4 never did
            con.execute("SET parquet_metadata_cache = false")
            attach_lake(con)  # a lake on object storage: its filesystem
            return con
        except duckdb.Error as e:
            con.close()
            msg = str(e)
            if isinstance(e, duckdb.IOException) and "lock" in msg.lower() and attempt < _LOCK_RETRIES - 1:
                time.sleep(0.1)
                continue
            if not path.is_file():
                raise CatalogUnavailable(
                    f"{path} does not exist yet; run `indexer backfill` (or `indexer catalog`) first"
                ) from None
            if "lock" in msg.lower():
                raise CatalogUnavailable(lock_message(path, msg)) from None
            first = msg.splitlines()[0] if msg else type(e).__name__
            raise CatalogUnavailable(
                f"cannot open the catalog {path} ({first}); rebuild it with `indexer catalog`") from None
    raise AssertionError("unreachable")


def read_views(path: Path, sql: str) -> pl.DataFrame:
    """The result of `sql` over the catalog's views, for the indexer's own derivations (the DEX tables
    read the canonical rows the views merge from range files and live segments)."""
    con = open_catalog(path)
    try:
        return retry_on_changed_files(con, lambda: con.sql(sql).pl())
    finally:
        con.close()
