"""The Parquet lake: one file per (chain, dataset, block range), each written atomically.

Layout: `<data_dir>/<chain>/<dataset>/<range_key>.parquet`, where a dataset is `blocks`, `logs`
or `events/<table>`. A file is written to a hidden temporary name in the same directory, fsynced,
then renamed over the final name, so readers (and DuckDB globs, which skip hidden names) see the
old file or the new one, never a partial one; a killed writer leaves only a hidden temp file that
the next write of the same range removes.
"""

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 1  # nearly the size of the default level, written faster
ROW_GROUP_SIZE = 64 * 1024
# Polars' own string layout (Arrow string views): handing it to the Parquet writer copies nothing.
_ARROW = pl.CompatLevel.newest()


class Lake:
    def __init__(self, data_dir: Path, chain: str) -> None:
        self.root = Path(data_dir) / chain
        self.chain = chain

    def dir(self, dataset: str) -> Path:
        return self.root / dataset

    def path(self, dataset: str, range_key: str) -> Path:
        return self.dir(dataset) / f"{range_key}.parquet"

    def glob(self, dataset: str) -> str:
        return str(self.dir(dataset) / "*.parquet")

    def files(self, dataset: str) -> list[Path]:
        """The dataset's data files, sorted (hidden names — temp files, the schema file — excluded)."""
        return data_files(self.dir(dataset))

    def ensure_schema_file(self, dataset: str, schema: dict[str, pl.DataType]) -> None:
        """An empty, typed, hidden `.schema.parquet`: DuckDB globs match it, so a view over the dataset
        keeps working (with zero rows) when every data file has been compacted or rolled away."""
        path = self.dir(dataset) / SCHEMA_FILE
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".schema.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            pl.DataFrame(schema=schema).write_parquet(tmp)
            os.replace(tmp, path)

    def exists(self, dataset: str, range_key: str) -> bool:
        return self.path(dataset, range_key).is_file()

    @contextmanager
    def writer(self, dataset: str, range_key: str, schema: dict[str, pl.DataType]) -> Iterator["StreamWriter"]:
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
        except BaseException:
            tx.abort()
            raise

    def write(self, dataset: str, range_key: str, df: pl.DataFrame) -> Path:
        with self.writer(dataset, range_key, dict(df.schema)) as w:
            w.write(df)
        return self.path(dataset, range_key)

    def read(self, dataset: str, range_key: str) -> pl.DataFrame:
        return pl.read_parquet(self.path(dataset, range_key))


SCHEMA_FILE = ".schema.parquet"


def data_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))


class Transaction:
    """Files written to hidden temporary names, then renamed into place (and old files deleted) at once."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self._files: list[tuple[StreamWriter, Path]] = []
        self._deletes: list[Path] = []

    def writer(self, dataset: str, key: str, schema: dict[str, pl.DataType]) -> "StreamWriter":
        final = self.lake.path(dataset, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        w = StreamWriter(tmp, pl.DataFrame(schema=schema).to_arrow(compat_level=_ARROW).schema)
        self._files.append((w, final))
        return w

    def delete(self, path: Path) -> None:
        self._deletes.append(path)

    def finish_writing(self) -> None:
        for w, _ in self._files:
            w.close()
            _fsync(w.path)

    def publish(self) -> None:
        dirs = set()
        for w, final in self._files:
            os.replace(w.path, final)
            dirs.add(final.parent)
        for p in self._deletes:
            p.unlink(missing_ok=True)
            dirs.add(p.parent)
        for d in dirs:
            _fsync(d)  # make the renames themselves durable

    def abort(self) -> None:
        for w, _ in self._files:
            w.close(flush=False)
            w.path.unlink(missing_ok=True)


class StreamWriter:
    """Appends frames of one schema to a Parquet file, buffering them into large row groups."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self._writer = pq.ParquetWriter(path, schema, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL)
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


def _remove_stale_temps(final: Path) -> None:
    for p in final.parent.glob(f".{final.name}.*.tmp"):
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


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
