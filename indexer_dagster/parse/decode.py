"""Raw logs -> one decoded table per event, vectorised with polars.

Input: the raw logs table (one row per log: key columns, ``topic0``..``topic3`` (null when
absent) and ``data``; all hex lower-case with a 0x prefix). Output: for every `EventSpec`, a
`DecodeResult` whose frame has the key columns, then one column per argument in ABI order (see
`EventSpec.schema`). Rows keep the input order.

How a log is matched to a spec
------------------------------
* Non-anonymous spec: ``topic0 == spec.topic0`` (and, when `addresses` lists allowed emitters
  for ``spec.table``, ``address`` in that list). Such a row is decoded when its shape fits:
  exactly ``1 + #indexed`` topics, ``data`` exactly as long as the static encoding (or, for
  events with dynamic arguments, at least the head and a whole number of 32-byte words, and
  accepted by eth_abi), and canonical padding in every value word (an address's upper 12 bytes
  zero, a uintN's high bits zero, an intN's sign extension consistent, a bool 0/1, a bytesN's
  tail zero; eth_abi's strict mode rejects the same). Otherwise it is *skipped* and counted in
  `DecodeResult.skipped` - e.g. an ERC-721 ``Transfer`` (3 indexed) against the ERC-20 spec.
* Anonymous spec (no topic0 of its own): a row is a *candidate* when it comes from an allowed
  address (any address when `addresses` gives none for the table), its topic0 is not the
  topic0 of any non-anonymous spec passed in the same call (or is null), and its topic count
  equals the number of indexed arguments (topic0 then holds the first indexed argument).
  Candidates whose data/padding fit are decoded, the others counted as skipped. Any other log
  of such a contract with the same topic count and data shape is indistinguishable from the
  event - give anonymous specs an address filter and pass all the contract's specs together.

Value mapping (exact; integers never pass through floats)
---------------------------------------------------------
address -> Utf8 "0x" + 40 hex; bool -> Boolean; uintN (N <= 64) -> UInt64; intN (N <= 64) ->
Int64; uintN/intN (N > 64) -> Utf8 exact base-10 plus ``<column>_f64`` Float64 (converted from
the exact integer, correctly rounded); bytesN / function -> Utf8 0x hex; fixedMxN -> Utf8
decimal; indexed string/bytes/array/tuple -> Utf8 topic hex (keccak of the value); non-indexed
string -> Utf8 (invalid UTF-8 replaced by U+FFFD), bytes -> Utf8 0x hex, arrays/tuples -> Utf8
compact JSON (tuples as JSON arrays, integers as decimal strings, addresses lower-case, bytes as
0x hex).

Speed: value words are cut out of the hex strings with ``str.slice`` and parsed with
``str.to_integer(base=16)`` as UInt64/UInt128 (Int128 via reinterpretation for negatives);
only 256-bit values that do not fit 128 bits go through Python ``int(x, 16)``, one per such
value. Top-level string/bytes arguments are vectorised too (offset and length words parsed, the
content sliced with per-row offsets). Events with array/tuple/fixed arguments decode their
non-value arguments per row with eth_abi (value-type arguments stay vectorised).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import polars as pl
from eth_abi import decode as _abi_decode
from eth_abi.grammar import TupleType
from eth_abi.grammar import parse as _parse_type

from indexer_dagster.parse.abi import KEY_SCHEMA, EventSpec, Param

__all__ = ["DecodeResult", "decode_logs"]

_TOPICS = ("topic0", "topic1", "topic2", "topic3")
_REQUIRED = (*KEY_SCHEMA, *_TOPICS, "data")
_Z = "0" * 64
_F = "f" * 64
_INT = re.compile(r"(u?int)(\d+)")
_BYTES_N = re.compile(r"bytes(\d+)")


@dataclass
class DecodeResult:
    frame: pl.DataFrame
    skipped: int  # rows matched by topic0 (or anonymous candidates) whose shape does not fit


# --------------------------------------------------------------------------------------------
# Public entry point


def decode_logs(
    logs: pl.DataFrame,
    specs: Sequence[EventSpec],
    addresses: Mapping[str, Collection[str]] | None = None,
) -> dict[str, DecodeResult]:
    """Decode `logs` for every spec; returns ``{spec.table: DecodeResult}`` (a frame with the
    spec's schema, possibly empty, for every spec).

    `addresses` maps a table to the lower-case addresses allowed to emit its event; a table
    missing from it (or ``addresses=None``) accepts any address. See the module docstring for
    the matching rules (anonymous events included) and the value mapping.
    """
    specs = list(specs)
    tables = [s.table for s in specs]
    dup = sorted({t for t in tables if tables.count(t) > 1})
    if dup:
        raise ValueError(f"decode_logs: several specs share the table name {dup[0]!r}; pass each event once")
    missing = [c for c in _REQUIRED if c not in logs.columns]
    if missing:
        raise ValueError(f"decode_logs: the logs table lacks column(s) {', '.join(missing)}")

    known_topic0 = sorted({s.topic0 for s in specs if not s.anonymous and s.topic0})
    by_topic0: dict[str, pl.DataFrame] = {}
    anon_pool: pl.DataFrame | None = None
    out: dict[str, DecodeResult] = {}
    for spec in specs:
        if spec.anonymous:
            if anon_pool is None:
                t0 = pl.col("topic0")
                anon_pool = logs.filter(t0.is_null() | ~t0.is_in(known_topic0)) if known_topic0 else logs
            cand = anon_pool
        else:
            assert spec.topic0 is not None  # set for every non-anonymous event
            if spec.topic0 not in by_topic0:
                by_topic0[spec.topic0] = _filter(logs, pl.col("topic0") == spec.topic0)
            cand = by_topic0[spec.topic0]
        allowed = None if addresses is None else addresses.get(spec.table)
        if isinstance(allowed, str):
            allowed = [allowed]
        if allowed is not None:
            allowed_list = sorted({str(a).lower() for a in allowed})
            cand = _filter(cand, pl.col("address").is_in(allowed_list))
        out[spec.table] = _decode_spec(cand, spec)
    return out


def _filter(df: pl.DataFrame, predicate: pl.Expr) -> pl.DataFrame:
    """`df.filter`, skipping the copy when every row passes (the common single-event case)."""
    if df.height == 0:
        return df
    mask = df.select(predicate.fill_null(False)).to_series()
    n = mask.sum()
    if n == df.height:
        return df
    return df.filter(mask)


def _empty(spec: EventSpec) -> pl.DataFrame:
    return pl.DataFrame(schema=spec.schema())


# --------------------------------------------------------------------------------------------
# Layout: where each argument lives and how it is read


@dataclass(frozen=True)
class _Slot:
    param: Param
    source: str  # "topicK" or "data"
    offset: int  # char offset of the 64-hex word in the source string
    kind: str  # "address" "bool" "uint" "int" "bytes" "hash" "string" "dynbytes" "rowwise" "fixed_topic"
    bits: int = 0  # uint/int width, bytesN byte count; string/dynbytes: the head size in bytes

    def sub(self, start: int, length: int) -> pl.Expr:
        return pl.col(self.source).str.slice(self.offset + start, length)


@dataclass(frozen=True)
class _Layout:
    slots: tuple[_Slot, ...]
    head_words: int
    dynamic: bool  # data length is variable (some non-indexed argument is dynamic)
    rowwise: bool  # some non-indexed argument needs eth_abi per row
    decode_types: tuple[str, ...]  # eth_abi types of all non-indexed args (string -> bytes)


def _head_words(t) -> int:
    if t.is_dynamic:
        return 1
    if t.arrlist:
        return t.arrlist[-1][0] * _head_words(t.item_type)  # a static array: k items inline
    if isinstance(t, TupleType):
        return sum(_head_words(c) for c in t.components)
    return 1


def _value_kind(typ: str) -> tuple[str, int]:
    if typ == "address":
        return "address", 160
    if typ == "bool":
        return "bool", 8
    if typ == "function":
        return "bytes", 24
    if m := _INT.fullmatch(typ):
        return m.group(1), int(m.group(2))
    if m := _BYTES_N.fullmatch(typ):
        return "bytes", int(m.group(1))
    return "", 0  # fixed/ufixed or not a value type


def _decode_type(typ: str) -> str:
    # string and bytes share one encoding; decoding strings as bytes lets invalid UTF-8 through.
    return re.sub(r"\bstring\b", "bytes", typ)


@lru_cache(maxsize=1024)
def _layout(spec: EventSpec) -> _Layout:
    slots: list[_Slot] = []
    topic = 0 if spec.anonymous else 1
    head = 0
    dynamic = rowwise = False
    for p in spec.inputs:
        kind, bits = _value_kind(p.type)
        if p.indexed:
            src = f"topic{topic}"
            topic += 1
            if not p.is_value_type:
                slots.append(_Slot(p, src, 0, "hash"))
            elif kind:
                slots.append(_Slot(p, src, 2, kind, bits))
            else:  # indexed fixedMxN: rare, eth_abi per row
                slots.append(_Slot(p, src, 2, "fixed_topic"))
                rowwise = True
            continue
        t = _parse_type(p.type)
        if kind:
            slots.append(_Slot(p, "data", 2 + 64 * head, kind, bits))
        else:
            slots.append(_Slot(p, "data", 2 + 64 * head, "rowwise"))
        dynamic = dynamic or t.is_dynamic
        head += _head_words(t)
    rowwise = rowwise or any(s.kind == "rowwise" for s in slots)
    if rowwise and all(s.param.type in ("string", "bytes") for s in slots if s.kind in ("rowwise", "fixed_topic")):
        # Only top-level string/bytes: read them with vectorised offset/length arithmetic.
        slots = [
            _Slot(s.param, s.source, s.offset, "string" if s.param.type == "string" else "dynbytes", 32 * head)
            if s.kind == "rowwise"
            else s
            for s in slots
        ]
        rowwise = False
    types = tuple(_decode_type(p.type) for p in spec.inputs if not p.indexed)
    return _Layout(tuple(slots), head, dynamic, rowwise, types)


# --------------------------------------------------------------------------------------------
# Vectorised expressions


def _dyn(s: _Slot) -> tuple[pl.Expr, pl.Expr, pl.Expr, pl.Expr]:
    """For a top-level string/bytes: (valid, content hex, char position of the content, length in
    bytes). Valid: offset past the head, offset and length below 2**48, the padded content inside
    ``data`` and its padding zero - what eth_abi's strict decoder checks."""
    data = pl.col("data")
    n_bytes = (data.str.len_bytes().cast(pl.Int64) - 2) // 2
    offset = s.sub(52, 12).str.to_integer(base=16, dtype=pl.Int64, strict=False)
    len_at = 2 + 2 * offset  # char index of the length word
    length = data.str.slice(len_at + 52, 12).str.to_integer(base=16, dtype=pl.Int64, strict=False)
    start = len_at + 64
    padded = (length + 31) // 32 * 32
    pad = data.str.slice(start + 2 * length, 2 * (padded - length))
    valid = (
        (s.sub(0, 52) == _Z[:52])
        & (offset >= s.bits)
        & (data.str.slice(len_at, 52) == _Z[:52])
        & (offset + 32 + padded <= n_bytes)
        & (pad.str.strip_chars("0") == "")
    )
    return valid, data.str.slice(start, 2 * length), start, length


def _check(s: _Slot) -> pl.Expr | None:
    """True where the word's padding is canonical for its type (None: nothing to check)."""
    if s.kind in ("string", "dynbytes"):
        return _dyn(s)[0]
    if s.kind == "address":
        return s.sub(0, 24) == _Z[:24]
    if s.kind == "bool":
        return s.sub(0, 64).is_in([_Z, _Z[:63] + "1"])
    if s.kind == "uint":
        pad = 64 - s.bits // 4
        return s.sub(0, pad) == _Z[:pad] if pad else None
    if s.kind == "int":
        pad = 64 - s.bits // 4
        if not pad:
            return None
        head = s.sub(0, pad + 1)  # the padding plus the value's top nibble
        return (head <= _Z[:pad] + "7") | (head >= _F[:pad] + "8")
    if s.kind == "bytes":
        n = 2 * s.bits
        return s.sub(n, 64 - n) == _Z[: 64 - n] if n < 64 else None
    return None


def _value(s: _Slot) -> pl.Expr | None:
    """The decoded value (big integers: null where the Python fallback must fill in)."""
    k, b = s.kind, s.bits
    if k == "hash":
        return pl.col(s.source)
    if k == "string":  # content hex; `_strings` turns it into text
        return _dyn(s)[1]
    if k == "dynbytes":
        return pl.concat_str([pl.lit("0x"), _dyn(s)[1]])
    if k == "address":
        return pl.concat_str([pl.lit("0x"), s.sub(24, 40)])
    if k == "bool":
        return s.sub(63, 1) == "1"
    if k == "bytes":
        return pl.concat_str([pl.lit("0x"), s.sub(0, 2 * b)])
    if k == "uint" and b <= 64:
        n = b // 4
        return s.sub(64 - n, n).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    if k == "int" and b <= 64:
        return s.sub(48, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False).reinterpret(signed=True)
    # Big integers come out as UInt128/Int128 here (null where the value needs more than 128
    # bits); `_decode_spec` turns them into exact decimal strings and floats.
    if k == "uint":
        low = s.sub(32, 32).str.to_integer(base=16, dtype=pl.UInt128, strict=False)
        return low if b <= 128 else pl.when(s.sub(0, 32) == _Z[:32]).then(low)
    if k == "int":
        low = s.sub(32, 32).str.to_integer(base=16, dtype=pl.UInt128, strict=False).reinterpret(signed=True)
        if b <= 128:  # the sign-extension check guarantees the value fits in Int128
            return low
        head = s.sub(0, 33)  # fits in Int128 iff the top 129 bits are all 0 or all 1
        return pl.when((head <= _Z[:32] + "7") | (head >= _F[:32] + "8")).then(low)
    return None  # rowwise / fixed_topic


def _shape(spec: EventSpec, layout: _Layout) -> tuple[pl.Expr, pl.Expr]:
    """(topic-count predicate, data-length-and-padding predicate)."""
    n = spec.topic_count
    topics = [pl.col(t).is_not_null() if i < n else pl.col(t).is_null() for i, t in enumerate(_TOPICS)]
    tc = pl.all_horizontal(topics)
    size = 2 + 64 * layout.head_words
    length = pl.col("data").str.len_bytes()
    if layout.dynamic:
        fits = (length >= size) & ((length - 2) % 64 == 0)
    else:
        fits = length == size
    checks = [c for s in layout.slots if (c := _check(s)) is not None]
    if checks:
        fits = fits & pl.all_horizontal(checks)
    return tc, fits


# --------------------------------------------------------------------------------------------
# Per-spec decoding


def _decode_spec(cand: pl.DataFrame, spec: EventSpec) -> DecodeResult:
    if cand.height == 0:
        return DecodeResult(_empty(spec), 0)
    layout = _layout(spec)
    tc, fits = _shape(spec, layout)
    if spec.anonymous:
        cand = _filter(cand, tc)
        ok = _filter(cand, fits)
    else:
        ok = _filter(cand, tc & fits)
    skipped = cand.height - ok.height
    if ok.height == 0:
        return DecodeResult(_empty(spec), skipped)

    schema = spec.schema()
    exprs = [pl.col(c).cast(t) for c, t in KEY_SCHEMA.items()]
    for s in layout.slots:
        v = _value(s)
        if v is not None:
            exprs.append(v.alias(s.param.column))
    frame = ok.select(exprs)

    big = [s for s in layout.slots if s.param.is_big_int]
    if big:  # Int128/UInt128 -> exact decimal + float (both exact/correctly rounded)
        frame = frame.with_columns(
            [pl.col(s.param.column).cast(pl.Utf8) for s in big]
            + [pl.col(s.param.column).cast(pl.Float64).alias(s.param.f64_column) for s in big
               if s.param.f64_column is not None]  # (always: a big int has its float column)
        )

    new_cols: list[pl.Series] = [_strings(frame[s.param.column]) for s in layout.slots if s.kind == "string"]
    bad: set[int] = set()
    if layout.rowwise:
        new_cols.extend(_rowwise(ok, spec, layout, bad))
    for s in big:
        if s.bits > 128:
            new_cols.extend(_fill_big(frame, ok[s.source], s, bad))
    if new_cols:
        frame = frame.with_columns(new_cols)
    # Safety net: a null argument means a word that was not hex (the input contract was broken).
    not_null = [pl.col(p.column).is_not_null() for p in spec.inputs]
    keep = frame.select(pl.all_horizontal(not_null) if not_null else pl.repeat(True, frame.height)).to_series()
    if bad:
        keep = keep.scatter(sorted(bad), False)
    if not keep.all():
        skipped += frame.height - int(keep.sum())
        frame = frame.filter(keep)
    return DecodeResult(frame.select([pl.col(c).cast(t) for c, t in schema.items()]), skipped)


def _strings(hex_col: pl.Series) -> pl.Series:
    """Content hex -> text; invalid UTF-8 is replaced by U+FFFD (never a reason to skip a row)."""
    binary = hex_col.str.decode("hex", strict=False)
    try:
        return binary.cast(pl.Utf8)
    except pl.exceptions.ComputeError:  # some value is not UTF-8: decode all of them in Python
        return pl.Series(
            hex_col.name,
            [None if b is None else b.decode("utf-8", errors="replace") for b in binary.to_list()],
            dtype=pl.Utf8,
        )


def _fill_big(frame: pl.DataFrame, source: pl.Series, s: _Slot, bad: set[int]) -> list[pl.Series]:
    """Fill the nulls of a 256-bit integer column (values beyond 128 bits) and of its float
    column exactly, one Python ``int(word, 16)`` per such value."""
    col, fcol = s.param.column, s.param.f64_column
    assert fcol is not None  # called for big-int slots only
    values = frame[col]
    idx = values.is_null().arg_true()
    if idx.len() == 0:
        return []
    signed = s.kind == "int"
    exact: list[str | None] = []
    approx: list[float | None] = []
    for i, raw in zip(idx.to_list(), source.gather(idx).to_list()):
        try:
            x = int(raw[s.offset : s.offset + 64], 16)
        except (TypeError, ValueError):  # not hex: the row is dropped
            bad.add(i)
            exact.append(None)
            approx.append(None)
            continue
        if signed and x >= 1 << 255:
            x -= 1 << 256
        exact.append(str(x))
        approx.append(float(x))
    return [
        values.scatter(idx, pl.Series(exact, dtype=pl.Utf8)),
        frame[fcol].scatter(idx, pl.Series(approx, dtype=pl.Float64)),
    ]


def _rowwise(ok: pl.DataFrame, spec: EventSpec, layout: _Layout, bad: set[int]) -> list[pl.Series]:
    """Per-row eth_abi decoding of the non-indexed string/bytes/array/tuple/fixed arguments
    (and of indexed fixedMxN topics). Rows eth_abi rejects are added to `bad`."""
    cols: dict[str, list] = {}
    non_indexed = [p for p in spec.inputs if not p.indexed]
    want = [
        (j, p, _parse_type(p.type))
        for j, p in enumerate(non_indexed)
        if _value_kind(p.type)[0] == ""
    ]
    if want:
        for _, p, _ in want:
            cols[p.column] = []
        for i, data in enumerate(ok["data"].to_list()):
            try:
                decoded = _abi_decode(layout.decode_types, bytes.fromhex(data[2:]))
            except Exception:  # noqa: BLE001 - any malformed encoding: skip the row
                bad.add(i)
                for _, p, _ in want:
                    cols[p.column].append(None)
                continue
            for j, p, t in want:
                cols[p.column].append(_top_level(t, decoded[j]))
    for s in layout.slots:
        if s.kind != "fixed_topic":
            continue
        vals: list[str | None] = []
        for i, topic in enumerate(ok[s.source].to_list()):
            try:
                vals.append(str(_abi_decode([s.param.type], bytes.fromhex(topic[2:]))[0]))
            except Exception:  # noqa: BLE001 - a malformed indexed value: skip the row
                bad.add(i)
                vals.append(None)
        cols[s.param.column] = vals
    return [pl.Series(c, v, dtype=pl.Utf8) for c, v in cols.items()]


def _top_level(t, v) -> str:
    if not t.arrlist and not isinstance(t, TupleType):
        if t.base == "string":
            return v.decode("utf-8", errors="replace")
        if t.base == "bytes":
            return "0x" + v.hex()
        return str(v)  # fixed/ufixed: Decimal
    return json.dumps(_jsonable(t, v), separators=(",", ":"), ensure_ascii=False)


def _jsonable(t, v):
    if t.arrlist:
        item = t.item_type
        return [_jsonable(item, x) for x in v]
    if isinstance(t, TupleType):
        return [_jsonable(c, x) for c, x in zip(t.components, v)]
    base = t.base
    if base == "address":
        return v.lower()
    if base == "bool":
        return bool(v)
    if base == "string":
        return v.decode("utf-8", errors="replace")
    if base in ("bytes", "function"):
        return "0x" + v.hex()
    return str(v)  # uint/int/fixed/ufixed
