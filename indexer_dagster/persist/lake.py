"""The Parquet lake: one file per (chain, dataset, block range), each written atomically.

Layout: `<lake root>/<chain>/<dataset>/<range_key>.parquet`, where a dataset is `blocks`, `logs`
or `events/<table>`, and the root is `storage.data_dir` or, with `storage.lake_url`, a directory
on object storage (any fsspec URL, e.g. `s3://bucket/prefix`).

On a local disk a file is written to a hidden temporary name in the same directory, fsynced, then
renamed over the final name, so readers see the old file or the new one, never a partial one; a
killed writer leaves only a hidden temp file (`*.tmp`, which no glob of the views matches) that the
next write of the same range removes. Object stores have no rename, but a single PUT is atomic: the
file is written completely to a local staging directory and uploaded in one request, so the object
appears whole or not at all, and a killed writer leaves nothing in the bucket.
"""

import errno
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from indexer_dagster.config import ConfigError
from indexer_dagster.persist.datasets import in_block_order
from indexer_dagster.persist.files import LakePath, data_files, fsync, is_remote, read_parquet
from indexer_dagster.persist.gate import Gate

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 1  # nearly the size of the default level, written faster
ROW_GROUP_SIZE = 64 * 1024
# Polars' own string layout (Arrow string views): handing it to the Parquet writer copies nothing.
_ARROW = pl.CompatLevel.newest()


def check_lake(cfg: Any) -> None:
    """Fail early, with the fix, when a remote lake cannot be listed (missing bucket, no access, no
    endpoint); nothing to check for a local lake (its directory is created on the first write)."""
    root = cfg.lake_root
    if not is_remote(root):
        return
    bucket = root.path.split("/", 1)[0]
    try:
        root.fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise ConfigError(f"storage.lake_url {root}: the bucket {bucket!r} does not exist; create it or fix "
                          "lake_url; nothing was written") from None
    except PermissionError:
        raise ConfigError(f"storage.lake_url {root}: access denied; check the storage credentials in the "
                          "environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the "
                          "bucket's policy; nothing was written") from None
    except Exception as e:  # noqa: BLE001 - no credentials, endpoint unreachable, ...
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"storage.lake_url {root}: cannot list the bucket ({type(e).__name__}: {first}); check "
                          "the endpoint (lake_options.endpoint_url or AWS_ENDPOINT_URL) and the credentials in "
                          "the environment; nothing was written") from None


def open_lake(cfg: Any, chain: str | None = None) -> "Lake":
    """The lake of one chain of a config (`cfg.chain` by default); locks and staging stay local."""
    name = chain or cfg.chain.name
    return Lake(cfg.lake_root, name, local_dir=cfg.data_dir / name)


class Lake:
    def __init__(self, root: LakePath | str, chain: str, local_dir: Path | None = None) -> None:
        root = Path(root) if isinstance(root, (str, os.PathLike)) else root  # a UPath is not PathLike
        self.root = root / chain
        self.chain = chain
        self.remote = is_remote(root)
        # Lock files and (for a remote lake) the staging directory of files being written.
        self.local_dir = Path(local_dir) if local_dir is not None else (
            Path(tempfile.gettempdir()) / "indexer_dagster" / chain if is_remote(self.root) else self.root)
        # What the query API waits on while a publish or a repair is half done (see `persist.gate`).
        self.gate = Gate(self.local_dir / GATE_DIR)

    def dir(self, dataset: str) -> LakePath:
        return self.root / dataset

    def path(self, dataset: str, range_key: str) -> LakePath:
        return self.dir(dataset) / f"{range_key}.parquet"

    def glob(self, dataset: str) -> str:
        return str(self.dir(dataset) / "*.parquet")

    def files(self, dataset: str) -> list[LakePath]:
        """The dataset's data files, sorted (hidden names — temp files, the schema file — excluded)."""
        return data_files(self.dir(dataset))

    def has_schema_file(self, dataset: str) -> bool:
        """Whether `dataset` has had a file (its schema file stays when its data files go)."""
        return (self.dir(dataset) / SCHEMA_FILE).is_file()

    def ensure_schema_file(self, dataset: str, schema: Mapping[str, pl.DataType | type[pl.DataType]]) -> None:
        """An empty, typed, hidden `.schema.parquet`: DuckDB globs match it, so a view over the dataset
        keeps working (with zero rows) when every data file has been compacted or rolled away."""
        if not self.has_schema_file(dataset):
            self.write(dataset, SCHEMA_FILE.removesuffix(".parquet"), pl.DataFrame(schema=schema))

    @property
    def staging(self) -> Path:
        """Where a remote lake's files are written before their upload (on the local disk)."""
        return self.local_dir / ".staging"

    def lock(self, path: LakePath) -> FileLock:
        """A process lock for read-modify-write of one small lake file (heads, ledgers). For a remote
        lake the lock file is local: it serializes the writers of this machine."""
        if not self.remote:
            path.parent.mkdir(parents=True, exist_ok=True)
            return FileLock(str(path) + ".lock")
        rel = str(path)[len(str(self.root)):].strip("/").replace("/", "~")
        (self.local_dir / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.local_dir / "locks" / f"{rel}.lock"))

    def exists(self, dataset: str, range_key: str) -> bool:
        return self.path(dataset, range_key).is_file()

    @contextmanager
    def writer(self, dataset: str, range_key: str, schema: Mapping[str, pl.DataType | type[pl.DataType]]) -> Iterator["StreamWriter"]:
        """Write one file atomically (a transaction of one file)."""
        with self.transaction() as tx:
            yield tx.writer(dataset, range_key, schema)

    @contextmanager
    def transaction(self, guard: Callable[[], AbstractContextManager] | None = None) -> Iterator["Transaction"]:
        """Write several files and delete others, all made visible together at the end.

        `guard` (e.g. the chain's writer lock plus a check that no reorg happened meanwhile) is
        entered around the final renames; if it raises, nothing becomes visible.
        """
        tx = Transaction(self)
        try:
            yield tx
            tx.finish_writing()
            with guard() if guard else nullcontext():
                tx.publish()
        except OSError as e:
            tx.abort()
            if isinstance(e, StorageError) or e.errno not in _STORAGE_ERRNOS:
                raise
            raise StorageError.from_os_error(e, self.root) from e
        except BaseException:
            tx.abort()
            raise

    def write(self, dataset: str, range_key: str, df: pl.DataFrame) -> LakePath:
        with self.writer(dataset, range_key, dict(df.schema)) as w:
            w.write(df)
        return self.path(dataset, range_key)

    def read(self, dataset: str, range_key: str) -> pl.DataFrame:
        return read_parquet(self.path(dataset, range_key))


SCHEMA_FILE = ".schema.parquet"
GATE_DIR = ".gate"
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


class StorageError(OSError):
    """The data directory cannot take the write (full, over quota, read-only, not permitted). The
    message names the directory, the cause and the fix; the files written before are untouched."""

    @classmethod
    def from_os_error(cls, e: OSError, where: LakePath) -> "StorageError":
        cause = {
            errno.ENOSPC: "the disk is full (no space left on device)",
            errno.EDQUOT: "the disk quota is exceeded (no space left for this user)",
            errno.EFBIG: "a file would exceed the size limit of this process or filesystem (no space left under the limit)",
            errno.EACCES: "permission denied",
            errno.EPERM: "the operation is not permitted (immutable or protected files?)",
            errno.EROFS: "the filesystem is read-only",
        }.get(e.errno or 0, e.strerror or str(e))
        fix = ("free space there (or point storage.data_dir at a larger disk)"
               if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
               else "give this process write access to it (or point storage.data_dir elsewhere)")
        err = cls(e.errno, f"cannot write to the data directory {where}: {cause} ({e.filename or where}); "
                           f"{fix}, then re-run the same command. Files written before are intact.")
        return err

    def __str__(self) -> str:
        return self.strerror or super().__str__()


MIN_FREE_BYTES = 1 << 20


def storage_problem(data_dir: Path, e: BaseException) -> StorageError | None:
    """The StorageError behind `e` (any failed write under `data_dir`: Parquet, SQLite state, DuckDB
    catalog) when the cause is the disk — full, read-only, not writable — else None."""
    if isinstance(e, StorageError):
        return e
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        return StorageError.from_os_error(e, Path(data_dir))
    if not (isinstance(e, OSError) or type(e).__module__.startswith(("sqlite3", "_duckdb", "duckdb"))):
        return None
    # SQLite says "disk I/O error", DuckDB "IO Error": look at the directory itself.
    try:
        st = os.statvfs(data_dir)
    except OSError:
        return None
    code = None
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        code = errno.ENOSPC
    elif st.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    return StorageError.from_os_error(OSError(code, str(e), str(data_dir)), Path(data_dir)) if code else None


class Transaction:
    """Files written to hidden temporary names, then renamed into place (and old files deleted) at once."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self._files: list[tuple[StreamWriter, LakePath]] = []
        self._markers: list[tuple[StreamWriter, LakePath]] = []  # published last
        self._deletes: list[LakePath] = []

    def writer(
        self, dataset: str, key: str, schema: Mapping[str, pl.DataType | type[pl.DataType]],
        metadata: dict[str, str] | None = None, *, marker: bool = False,
    ) -> "StreamWriter":
        """`metadata`: Parquet key-value metadata stored with the file (e.g. which addresses it covers).
        `marker`: the file the rest is judged by (a range's blocks: coverage is measured from them). It is
        published after every other file and delete, so a publish cut short by a crash leaves the old
        marker, or none, and the range is synced again instead of looking whole without its logs."""
        final = self.lake.path(dataset, key)
        if self.lake.remote:  # staged on the local disk, uploaded whole at publish
            where = self.lake.staging
            where.mkdir(parents=True, exist_ok=True)
            name = f"{dataset.replace('/', '~')}~{final.name}"
        else:
            assert not is_remote(final)  # a local lake's paths are local
            where, name = final.parent, final.name
            where.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(where, name)
        tmp = where / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        arrow_schema = pl.DataFrame(schema=schema).to_arrow(compat_level=_ARROW).schema
        if metadata:
            arrow_schema = arrow_schema.with_metadata({**(arrow_schema.metadata or {}), **metadata})
        w = StreamWriter(tmp, arrow_schema, string_statistics=not in_block_order(dataset))
        (self._markers if marker else self._files).append((w, final))
        return w

    def delete(self, path: LakePath) -> None:
        """Remove `path` at publish; a file this transaction also writes is replaced instead (the write wins)."""
        self._deletes.append(path)

    def _deleted(self) -> list[LakePath]:
        written = {str(final) for _, final in [*self._files, *self._markers]}
        return [p for p in self._deletes if str(p) not in written]

    def finish_writing(self) -> None:
        for w, _ in [*self._files, *self._markers]:
            w.close()
            if not self.lake.remote:
                fsync(w.path)

    def publish(self) -> None:
        """Files in the order written, then deletes, then the markers (see `writer`); queries through the
        API see all of it or none of it (`persist.gate`)."""
        with self.lake.gate.publishing():
            self._publish()

    def _publish(self) -> None:
        if self.lake.remote:
            # One PUT per file: the object store makes each appear whole, replacing the old one.
            for w, final in self._files:
                self._put(w, final)
            for p in self._deleted():
                p.unlink(missing_ok=True)
            for w, final in self._markers:
                self._put(w, final)
            return
        dirs = set()
        for w, final in self._files:
            dirs.add(self._rename(w, final))
        for p in self._deleted():
            assert not is_remote(p)
            p.unlink(missing_ok=True)
            dirs.add(p.parent)
        if self._markers:
            for d in dirs:
                fsync(d)  # the rest is durable before a marker says it is there
            for w, final in self._markers:
                dirs.add(self._rename(w, final))
        for d in dirs:
            fsync(d)  # make the renames themselves durable

    @staticmethod
    def _put(w: "StreamWriter", final: LakePath) -> None:
        assert is_remote(final)
        final.fs.put_file(str(w.path), final.path)
        w.path.unlink(missing_ok=True)

    @staticmethod
    def _rename(w: "StreamWriter", final: LakePath):
        assert not is_remote(final)
        os.replace(w.path, final)
        return final.parent

    def abort(self) -> None:
        for w, _ in [*self._files, *self._markers]:
            try:
                w.close(flush=False)
            except OSError:
                pass  # e.g. the disk is full: the footer cannot be written; the temp file goes anyway
            w.path.unlink(missing_ok=True)


def owned(df: pl.DataFrame) -> pl.DataFrame:
    """`df` copied into buffers of its own rows. Polars filters and slices share the buffers of the frame
    they come from, so a few rows kept for long (buffered until their row group fills, often a whole range)
    would keep the whole frame they were cut from alive."""
    copy = pl.from_arrow(df.to_arrow(compat_level=pl.CompatLevel.oldest()))
    assert isinstance(copy, pl.DataFrame)  # from a Table
    return copy.cast(df.schema)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


class StreamWriter:
    """Appends frames of one schema to a Parquet file, buffering them into large row groups."""

    def __init__(self, path: Path, schema: pa.Schema, *, string_statistics: bool = True) -> None:
        """`string_statistics`: footer min/max of string columns too (measured: 12% of writing a range's
        logs as fetched, a third when they are read back from a file); without, only of the other columns
        (numbers, times), for files no reader skips by a string."""
        self.path = path
        self.schema = schema
        self.rows = 0
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        stats = True if string_statistics else [f.name for f in schema if not _is_string(f.type)]
        self._writer = pq.ParquetWriter(path, schema, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                                        write_statistics=stats)
        self._closed = False

    def write(self, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        self._buffer.append(df)
        self._buffered += df.height
        self.rows += df.height
        if self._buffered >= ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pl.concat(self._buffer, how="vertical").to_arrow(compat_level=_ARROW)
        self._buffer, self._buffered = [], 0
        if table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)

    def close(self, flush: bool = True) -> None:
        if not self._closed:
            self._closed = True
            try:
                if flush:
                    self._flush()
            finally:
                self._writer.close()


def _remove_stale_temps(directory: Path, name: str) -> None:
    """Temp files of `name` left by writers that died (their pid is gone)."""
    for p in directory.glob(f".{name}.*.tmp"):
        pid = p.name.split(".")[-3]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
