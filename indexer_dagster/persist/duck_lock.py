"""Who holds the DuckDB catalog's write lock, told to the user in one sentence with the fix.

DuckDB lets one process open a database file for writing, or any number of processes read-only.
The indexer only ever opens the catalog read-only (it rebuilds it in a temporary file and renames
it into place), so a lock conflict always means another program - a DuckDB shell, a notebook -
opened the catalog read-write.
"""

import re
from pathlib import Path

import duckdb

_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")


def is_lock_error(err: BaseException | str) -> bool:
    return "could not set lock" in str(err).lower() or "conflicting lock" in str(err).lower()


def lock_message(path: str | Path, err: BaseException | str) -> str:
    """The message for a lock conflict on the catalog `path` (`err`: DuckDB's own error)."""
    m = _HOLDER.search(str(err))
    who = f"another program ({Path(m.group(1)).name}, PID {m.group(2)})" if m else "another program"
    return (
        f"the DuckDB catalog {path} is locked: {who} has it open for writing. Close that connection, or open "
        f"the catalog read-only (duckdb -readonly, or duckdb.connect(path, read_only=True)), then run the "
        f"command again"
    )


def catalog_lock_error(path: str | Path) -> str | None:
    """`lock_message` when another process holds `path` open read-write, else None (also when the
    file is missing or not a DuckDB file: a rebuild replaces it anyway)."""
    if not Path(path).is_file():
        return None
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.Error as e:
        return lock_message(path, e) if is_lock_error(e) else None
    return None
