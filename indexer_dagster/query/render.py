"""Query results as text for a terminal: a table when it fits, one `column = value` line per column and
record (like sqlite's `.mode line`) when it does not — a 33-column table squeezed into 120 characters
shows nothing readable."""

import datetime as dt
from typing import Any

import polars as pl

#: Records a terminal rendering shows (a table, or lines picked for a wide result); the rest is counted.
MAX_ROWS = 100


def as_table(df: pl.DataFrame, width: int | None = None) -> str:
    """Polars' table of up to `MAX_ROWS` rows; `width`: squeeze it into that many characters (None: all
    columns at their full width)."""
    chars = width if width is not None else 65_535  # polars takes a u16
    with pl.Config(tbl_rows=MAX_ROWS, tbl_cols=-1, fmt_str_lengths=70, tbl_width_chars=chars):
        return str(df)


def as_lines(df: pl.DataFrame, max_rows: int | None = None) -> str:
    """Each record as `column = value` lines (names right-aligned), records apart by a blank line; at most
    `max_rows` records (None: all), then how many were left out."""
    name_width = max((len(c) for c in df.columns), default=0)
    shown = df if max_rows is None else df.head(max_rows)
    records = [
        "\n".join(f"{name.rjust(name_width)} = {_text(value)}" for name, value in row.items())
        for row in shown.iter_rows(named=True)
    ]
    text = "\n\n".join(records)
    if shown.height < df.height:
        text += f"\n\n… {shown.height} of {df.height} rows shown; --format line shows them all, --format csv for a file"
    return text


def for_terminal(df: pl.DataFrame, width: int) -> str:
    """The table when every line fits `width` characters, else the records as lines."""
    table = as_table(df)
    if max((len(line) for line in table.splitlines()), default=0) <= width:
        return table
    return as_lines(df, MAX_ROWS)


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return str(value)
