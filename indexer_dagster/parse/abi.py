"""Contract ABIs -> event specifications: canonical signatures, topic0, column names, table names.

`load_abi` reads a bare ABI list or a build artifact (Hardhat, Truffle, Foundry, Waffle: any JSON
object with an "abi" key). `event_specs` turns the ABI's events into `EventSpec`s, which carry
everything the decoder (`indexer_dagster.parse.decode`) and the writers need: the topic0 hash, one
`Param` per argument with its output column, the table name and the decoded table's schema.

Naming rules
------------
* `snake_case` splits camel case ("UniswapV2Pair" -> "uniswap_v2_pair", "amount0In" ->
  "amount0_in", "HTTPServer" -> "http_server"), keeps digits glued to the letters before them
  ("ERC20" -> "erc20"), turns any other character into "_" and strips leading/trailing
  underscores ("_from" -> "from").
* Table: ``snake_case(contract) + "_" + snake_case(event)``. When the ABI holds several events
  with the same name (overloads), every one of them gets ``"_" + topic0[2:10]`` appended
  (for an anonymous overload: the first 8 hex chars of keccak(signature)).
* Column: ``snake_case(param name)``; "arg<i>" (i = position in the event) when the name is empty;
  "arg_<column>" when it collides with a key column of the logs/decoded tables (`KEY_COLUMNS`);
  "_2", "_3", ... appended to repeats. A uint/int wider than 64 bits also occupies
  ``<column>_f64``, which later parameters never reuse.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from eth_abi.grammar import parse as _parse_type
from eth_utils import keccak

__all__ = [
    "KEY_COLUMNS",
    "KEY_SCHEMA",
    "AbiError",
    "EventSpec",
    "Param",
    "event_specs",
    "load_abi",
    "snake_case",
]

#: The leading columns of every decoded table, with their types (those of the raw logs table).
KEY_SCHEMA: dict[str, pl.DataType] = {
    "chain_id": pl.Int64(),
    "block_number": pl.Int64(),
    "block_hash": pl.Utf8(),
    "block_timestamp": pl.Datetime("us", "UTC"),
    "transaction_hash": pl.Utf8(),
    "transaction_index": pl.Int64(),
    "log_index": pl.Int64(),
    "address": pl.Utf8(),
}

#: Names a parameter column may not take (it gets an "arg_" prefix instead).
KEY_COLUMNS: frozenset[str] = frozenset(
    [*KEY_SCHEMA, "status", "topic0", "topic1", "topic2", "topic3", "data"]
)

_ARTIFACT_HINT = 'give a bare ABI list or an artifact with an "abi" key'


class AbiError(ValueError):
    """A problem with an ABI file or an event selection; the message names the file/event and the fix."""


# --------------------------------------------------------------------------------------------
# Loading


def load_abi(path: str | Path) -> list[dict]:
    """Read an ABI from `path`: a bare JSON list, or a JSON object with an "abi" key.

    The "abi" value may itself be a JSON-encoded string (as some explorers/tools emit it).
    Raises `AbiError` for a missing/unreadable file, invalid JSON, a wrong shape, or an ABI
    without any event.
    """
    p = Path(path)
    if not p.exists():
        raise AbiError(f"{p}: file not found — check the path (relative paths are resolved from the working directory)")
    if not p.is_file():
        raise AbiError(f"{p}: not a file — point to a JSON file; {_ARTIFACT_HINT}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise AbiError(f"{p}: cannot be read ({e}) — {_ARTIFACT_HINT}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AbiError(f"{p}: not valid JSON (line {e.lineno} col {e.colno}: {e.msg}) — {_ARTIFACT_HINT}") from None

    abi: Any = doc
    if isinstance(doc, dict):
        if "abi" not in doc:
            keys = ", ".join(sorted(map(str, doc))[:8]) or "none"
            raise AbiError(f'{p}: JSON object without an "abi" key (keys: {keys}) — {_ARTIFACT_HINT}')
        abi = doc["abi"]
        if isinstance(abi, str):
            try:
                abi = json.loads(abi)
            except json.JSONDecodeError as e:
                raise AbiError(f'{p}: the "abi" string is not valid JSON ({e.msg}) — {_ARTIFACT_HINT}') from None
    if not isinstance(abi, list):
        raise AbiError(f"{p}: expected a JSON list of ABI entries, got {type(abi).__name__} — {_ARTIFACT_HINT}")
    bad = [i for i, e in enumerate(abi) if not isinstance(e, dict)]
    if bad:
        raise AbiError(f"{p}: ABI entry #{bad[0]} is not a JSON object — {_ARTIFACT_HINT}")
    if not any(e.get("type") == "event" for e in abi):
        raise AbiError(
            f"{p}: the ABI has no events (only {_describe_entries(abi)}) — "
            "use the artifact of the contract that emits the events"
        )
    return abi


def _describe_entries(abi: list[dict]) -> str:
    kinds = Counter(str(e.get("type", "function")) for e in abi)
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "an empty list"


# --------------------------------------------------------------------------------------------
# Names


_ACRONYM_BOUNDARY = re.compile(r"([A-Z]+)([A-Z][a-z])")  # HTTPServer -> HTTP_Server
_CAMEL_BOUNDARY = re.compile(r"([a-z0-9])([A-Z])")  # amount0In -> amount0_In
_NON_WORD = re.compile(r"[^a-z0-9]+")


def snake_case(name: str) -> str:
    """"UniswapV2Pair" -> "uniswap_v2_pair", "ERC20" -> "erc20", "amount0In" -> "amount0_in",
    "HTTPServer" -> "http_server", "already_snake" -> "already_snake", "_underscore" -> "underscore"."""
    s = _ACRONYM_BOUNDARY.sub(r"\1_\2", name)
    s = _CAMEL_BOUNDARY.sub(r"\1_\2", s)
    return _NON_WORD.sub("_", s.lower()).strip("_")


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class Param:
    name: str  # as in the ABI ("" when unnamed)
    column: str  # output column
    type: str  # canonical ABI type: "uint256", "address[]", "(uint256,address)[2]"
    indexed: bool

    @property
    def is_value_type(self) -> bool:
        """A single-word value (address, bool, intN/uintN, bytesN, fixed, function): an indexed
        one is stored in its topic as the value itself, not as a hash."""
        return _is_value_type(self.type)

    @property
    def is_big_int(self) -> bool:
        """uintN/intN with N > 64 (decoded to an exact decimal Utf8 plus a ``<column>_f64``).
        Indexed ones too: an indexed integer's topic is its value."""
        m = _INT_TYPE.fullmatch(self.type)
        return m is not None and int(m.group(2)) > 64

    @property
    def f64_column(self) -> str | None:
        return f"{self.column}_f64" if self.is_big_int else None

    @property
    def dtype(self) -> pl.DataType:
        """The decoded column's type (without the extra ``_f64`` column of a big integer)."""
        if self.indexed and not self.is_value_type:
            return pl.Utf8()  # the topic holds keccak(value)
        if self.type == "bool":
            return pl.Boolean()
        m = _INT_TYPE.fullmatch(self.type)
        if m and int(m.group(2)) <= 64:
            return pl.UInt64() if m.group(1) == "uint" else pl.Int64()
        return pl.Utf8()


_INT_TYPE = re.compile(r"(u?int)(\d+)")
_VALUE_TYPE = re.compile(r"address|bool|function|u?int\d+|bytes\d+|u?fixed\d+x\d+")


def _is_value_type(t: str) -> bool:
    return _VALUE_TYPE.fullmatch(t) is not None


@dataclass(frozen=True)
class EventSpec:
    contract: str
    name: str
    signature: str  # canonical, e.g. "Swap(address,uint256,uint256,uint256,uint256,address)"
    topic0: str | None  # "0x" + keccak(signature); None for an anonymous event
    anonymous: bool
    inputs: tuple[Param, ...]
    table: str

    @property
    def selector_hash(self) -> str:
        """ "0x" + keccak(signature), also for anonymous events."""
        return _keccak_hex(self.signature)

    @property
    def indexed(self) -> tuple[Param, ...]:
        return tuple(p for p in self.inputs if p.indexed)

    @property
    def non_indexed(self) -> tuple[Param, ...]:
        return tuple(p for p in self.inputs if not p.indexed)

    @property
    def topic_count(self) -> int:
        """How many topics a log of this event has (topic0 included)."""
        return len(self.indexed) + (0 if self.anonymous else 1)

    def schema(self) -> dict[str, pl.DataType]:
        """The decoded table's columns in order: the key columns, then one per argument (a big
        integer is followed by its ``<column>_f64``)."""
        out: dict[str, pl.DataType] = dict(KEY_SCHEMA)
        for p in self.inputs:
            out[p.column] = p.dtype
            if p.is_big_int:
                out[f"{p.column}_f64"] = pl.Float64()
        return out


def _keccak_hex(text: str) -> str:
    return "0x" + keccak(text=text).hex()


_SCALAR_TYPE = re.compile(r"([a-z]+)([0-9]*(?:x[0-9]+)?)((?:\[[0-9]*\])*)")


def _canonical_type(inp: dict, where: str) -> str:
    t = inp.get("type")
    if not isinstance(t, str) or not t.strip():
        raise AbiError(f"{where}: missing or empty 'type'")
    t = t.replace(" ", "")
    if t.startswith("tuple"):
        comps = inp.get("components")
        if not isinstance(comps, list) or not all(isinstance(c, dict) for c in comps):
            raise AbiError(f"{where}: tuple type without 'components' (a list of JSON objects) — fix the ABI")
        inner = ",".join(_canonical_type(c, f"{where}.{c.get('name') or '?'}") for c in comps)
        out = f"({inner}){t[len('tuple'):]}"
    else:
        m = _SCALAR_TYPE.fullmatch(t)
        if not m:
            raise AbiError(f"{where}: unsupported type {t!r}")
        base, sub, arr = m.groups()
        if base in ("uint", "int") and not sub:
            sub = "256"
        elif base in ("ufixed", "fixed") and not sub:
            sub = "128x18"
        out = base + sub + arr
    try:
        _parse_type(out).validate()
    except Exception as e:  # noqa: BLE001 - eth_abi's ParseError / ABITypeError
        raise AbiError(f"{where}: unsupported type {t!r} ({e})") from None
    return out


def _columns(inputs: list[tuple[str, str, bool]]) -> list[str]:
    """Unique column names for (name, canonical type, indexed) triples; see the module doc."""
    used: set[str] = set(KEY_COLUMNS)
    out: list[str] = []
    for i, (name, typ, _indexed) in enumerate(inputs):
        base = snake_case(name) if name else ""
        if not base:
            base = f"arg{i}"
        elif base in KEY_COLUMNS:
            base = f"arg_{base}"
        big = bool((m := _INT_TYPE.fullmatch(typ)) and int(m.group(2)) > 64)
        col, n = base, 1
        while col in used or (big and f"{col}_f64" in used):
            n += 1
            col = f"{base}_{n}"
        used.add(col)
        if big:
            used.add(f"{col}_f64")
        out.append(col)
    return out


def _normalize_signature(sig: str) -> str:
    sig = re.sub(r"\s+", "", sig)
    sig = re.sub(r"\b(u?int)(?=[,)\[])", r"\g<1>256", sig)
    sig = re.sub(r"\b(u?fixed)(?=[,)\[])", r"\g<1>128x18", sig)
    return sig


def event_specs(contract: str, abi: list[dict], selected: Iterable[str] | None = None) -> list[EventSpec]:
    """The specs of `abi`'s events, in ABI order (exact duplicates dropped).

    `selected`: None for every event; otherwise event names ("Swap": every overload of that name)
    and/or full signatures ("Transfer(address,address,uint256)"; whitespace and uint/int aliases
    are normalised). An item matching nothing raises `AbiError` listing the ABI's events.
    """
    events: list[EventSpec] = []
    seen: set[tuple] = set()
    raw: list[tuple[str, str, bool, list[tuple[str, str, bool]]]] = []
    for entry in abi:
        if not isinstance(entry, dict) or entry.get("type") != "event":
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise AbiError(f"{contract}: an event entry has no name")
        inputs = entry.get("inputs") or []
        if not isinstance(inputs, list):
            raise AbiError(f"{contract}.{name}: 'inputs' is not a list")
        triples = []
        for i, inp in enumerate(inputs):
            if not isinstance(inp, dict):
                raise AbiError(f"{contract}.{name}: input #{i} is not a JSON object")
            pname = inp.get("name") or ""
            where = f"{contract}.{name}({pname or f'#{i}'})"
            triples.append((str(pname), _canonical_type(inp, where), bool(inp.get("indexed", False))))
        anonymous = bool(entry.get("anonymous", False))
        signature = f"{name}({','.join(t for _, t, _ in triples)})"
        key = (signature, anonymous, tuple(triples))
        if key in seen:
            continue
        seen.add(key)
        n_indexed = sum(ix for _, _, ix in triples)
        if n_indexed > (4 if anonymous else 3):
            raise AbiError(
                f"{contract}.{signature}: {n_indexed} indexed arguments; a log holds at most "
                f"{4 if anonymous else 3} ({'anonymous' if anonymous else 'plus topic0'}) — fix the ABI"
            )
        raw.append((name, signature, anonymous, triples))

    name_counts = Counter(name for name, *_ in raw)
    for name, signature, anonymous, triples in raw:
        h = _keccak_hex(signature)
        table = f"{snake_case(contract)}_{snake_case(name)}"
        if name_counts[name] > 1:
            table += "_" + h[2:10]
        params = tuple(
            Param(name=n, column=c, type=t, indexed=ix)
            for (n, t, ix), c in zip(triples, _columns(triples))
        )
        events.append(
            EventSpec(
                contract=contract,
                name=name,
                signature=signature,
                topic0=None if anonymous else h,
                anonymous=anonymous,
                inputs=params,
                table=table,
            )
        )

    if selected is None:
        chosen = events
    else:
        if isinstance(selected, str):
            selected = [selected]
        wanted: set[int] = set()
        for item in selected:
            item_n = _normalize_signature(str(item))
            hits = [
                i
                for i, s in enumerate(events)
                if (s.signature == item_n if "(" in item_n else s.name == item_n)
            ]
            if not hits:
                have = ", ".join(s.signature + (" [anonymous]" if s.anonymous else "") for s in events)
                raise AbiError(
                    f"{contract}: no event {item!r} in the ABI — it has: {have or 'no events'}; "
                    "give an event name or its full signature"
                )
            wanted.update(hits)
        chosen = [s for i, s in enumerate(events) if i in wanted]

    tables = Counter(s.table for s in chosen)
    clash = sorted(t for t, n in tables.items() if n > 1)
    if clash:
        which = ", ".join(s.signature for s in chosen if s.table in clash)
        raise AbiError(
            f"{contract}: events {which} map to the same table {clash[0]!r} — select only one of them"
        )
    return chosen
