"""Lake files, on the local disk or on object storage: listing them and reading them.

Local files are read in place. A remote object is fetched in one GET (one version, whatever a writer
does meanwhile), and a directory listing keeps each file's ETag and size for a moment, so code that
lists a dataset and then looks at each file makes one request, not one per file.
"""

import io
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

import polars as pl
import pyarrow.parquet as pq

if TYPE_CHECKING:  # imported where a remote lake is configured (config.lake_root), not by every process
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+
    from upath import UPath

# A lake file or directory: a local Path, or a UPath on an fsspec filesystem (object storage).
LakePath = Union[Path, "UPath"]


def is_remote(path: LakePath) -> "TypeIs[UPath]":
    return not isinstance(path, Path)


def read_parquet(path: LakePath, columns: list[str] | None = None) -> pl.DataFrame:
    """Read one lake file, local or remote. A remote object is fetched in one GET: reading it in
    ranges would fail when a writer replaces it meanwhile (the next range is of another version)."""
    if not is_remote(path):
        return pl.read_parquet(path, columns=columns)
    return pl.read_parquet(io.BytesIO(_fetch(path)), columns=columns)


DOWNLOAD_ATTEMPTS = 3


@contextmanager
def local_copy(path: LakePath) -> Iterator[Path]:
    """A lake file on the local disk for the duration of the block: a local file in place; a remote object
    downloaded to a temporary file, streamed (memory holds a buffer, not the object). A large download may
    be several ranged requests, so it must be of one version: the object's ETag and size after it must be
    those before it, else it is downloaded again (a writer replaced it meanwhile)."""
    if not is_remote(path):
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=".lake-", suffix=".parquet")
    os.close(fd)
    tmp = Path(name)
    try:
        for _attempt in range(DOWNLOAD_ATTEMPTS):
            before = _fresh_state(path)
            path.fs.get_file(path.path, str(tmp))
            if _fresh_state(path) == before and tmp.stat().st_size == before[2]:
                break
        else:
            raise OSError(f"{path} was replaced during each of {DOWNLOAD_ATTEMPTS} downloads; try again")
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _fresh_state(path: "UPath") -> tuple:
    path.fs.invalidate_cache(path.path)
    return _state_of(path.fs.info(path.path))


def read_small_file(path: LakePath) -> pl.DataFrame:
    """A small lake file read again only when it changes (its `file_state`): for registries every range
    reads whole, such as the factory children, read once per file state and process."""
    return _read_state(path, file_state(path))


@lru_cache(maxsize=16384)
def _read_state(path: LakePath, _state: tuple) -> pl.DataFrame:
    return read_parquet(path)


def scan_parquet(path: LakePath) -> pl.LazyFrame:
    """A lazy frame over one lake file (a remote file is read whole: lake files are one range each)."""
    return pl.scan_parquet(path) if not is_remote(path) else read_parquet(path).lazy()


def _fetch(path: "UPath") -> bytes:
    """A whole remote object in a single GET: one version, whatever a writer does meanwhile."""
    return path.fs.cat_file(path.path)


def parquet_metadata(path: LakePath, attempts: int = 3) -> pq.FileMetaData:
    """A lake file's Parquet footer (row groups, statistics, key-value metadata)."""
    if not is_remote(path):
        return pq.read_metadata(path)
    for attempt in range(attempts):
        try:  # the footer is read in ranges: again if the object was replaced in between
            with path.open("rb") as f:
                return pq.read_metadata(f)
        except OSError as e:
            if "no longer exists" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextmanager
def open_parquet(path: LakePath) -> Iterator[pq.ParquetFile]:
    """A lake file opened for reading in batches (a remote object: from a local copy, `local_copy`, so a
    batch at a time is in memory, not the object)."""
    with local_copy(path) as local, pq.ParquetFile(local) as pf:
        yield pf


def row_group_spans(meta: pq.FileMetaData, column: str) -> list[tuple[int | None, int | None, int]] | None:
    """(min, max of `column`, rows) of each row group, from the footer statistics (None where a group has
    none); None when `column` is not in the file."""
    idx = meta.schema.to_arrow_schema().get_field_index(column)
    if idx < 0:
        return None
    out: list[tuple[int | None, int | None, int]] = []
    for i in range(meta.num_row_groups):
        g = meta.row_group(i)
        s = g.column(idx).statistics
        has = s is not None and s.has_min_max
        out.append((s.min if has else None, s.max if has else None, g.num_rows))
    return out


def row_groups(path: LakePath, which: Iterable[int] | None = None) -> Iterator[pl.DataFrame]:
    """A lake file's row groups (all, or those numbered `which`), one frame at a time: what a copy or a
    pass over a file of any size holds."""
    with open_parquet(path) as pf:
        for i in range(pf.num_row_groups) if which is None else which:
            yield pl.DataFrame(pf.read_row_group(i))


# (rows, min, max) of a file's column, by path and column; recomputed when the file's state changes.
_spans: dict[str, tuple[tuple, int, int | None, int | None]] = {}


def column_span(path: LakePath, column: str) -> tuple[int, int | None, int | None]:
    """(rows, min, max of `column`) of a lake file, from its footer statistics (read once per file
    state: the sensor and `indexer status` ask about every file, again and again)."""
    state = file_state(path)
    key = f"{path}\0{column}"
    hit = _spans.get(key)
    if hit and hit[0] == state:
        return hit[1], hit[2], hit[3]
    meta = parquet_metadata(path)
    groups = row_group_spans(meta, column) or []
    lows = [lo for lo, _, _ in groups if lo is not None]
    highs = [hi for _, hi, _ in groups if hi is not None]
    out = (meta.num_rows, min(lows, default=None), max(highs, default=None))
    _spans[key] = (state, *out)
    return out


def file_state(path: LakePath) -> tuple:
    """What changes when a lake file is replaced (a cache key): inode or ETag, mtime, size. For a remote
    file listed by `data_files` within the last second, from that listing (not one request per file)."""
    if not is_remote(path):
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _listed.get(str(path))
    if hit is not None and time.monotonic() - hit[1] < LISTED_TTL_S:
        return hit[0]
    return _state_of(path.fs.info(path.path))


def _state_of(info: dict) -> tuple:
    return (info.get("ETag") or info.get("etag") or info.get("md5Hash"), str(info.get("LastModified")), info["size"])


# Remote file states from the latest listings: callers list a directory, then look at each file.
LISTED_TTL_S = 1.0
_listed: dict[str, tuple[tuple, float]] = {}


def data_files(directory: LakePath) -> list[LakePath]:
    """A dataset's data files, sorted (hidden names — temp files, the schema file — excluded)."""
    if is_remote(directory):
        return _remote_data_files(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("*.parquet") if not p.name.startswith(".")), key=str)


def _remote_data_files(directory: "UPath") -> list[LakePath]:
    """One listing request; the files' states are kept briefly for `file_state`."""
    try:
        entries = directory.fs.ls(directory.path, detail=True)
    except FileNotFoundError:
        return []
    now, out = time.monotonic(), []
    if len(_listed) > 200_000:
        for k in [k for k, (_, t) in _listed.items() if now - t >= LISTED_TTL_S]:
            del _listed[k]
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and name.endswith(".parquet") and not name.startswith("."):
            p = directory / name
            _listed[str(p)] = (_state_of(e), now)
            out.append(p)
    return sorted(out, key=str)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
