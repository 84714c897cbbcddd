"""Event decoding: ABIs -> `EventSpec`s (`abi`), raw logs -> decoded tables (`decode`)."""

from indexer_dagster.parse.abi import (
    KEY_COLUMNS,
    KEY_SCHEMA,
    AbiError,
    EventSpec,
    Param,
    event_specs,
    load_abi,
    snake_case,
)
from indexer_dagster.parse.decode import DecodeResult, decode_logs

__all__ = [
    "KEY_COLUMNS",
    "KEY_SCHEMA",
    "AbiError",
    "DecodeResult",
    "EventSpec",
    "Param",
    "decode_logs",
    "event_specs",
    "load_abi",
    "snake_case",
]
