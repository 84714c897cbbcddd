"""Classify RPC failures into four kinds the client can act on, with the provider's hints.

Kinds and what a caller does with them:

* ``RANGE_TOO_LARGE`` – an ``eth_getLogs`` request spanned too many blocks or matched too many
  logs. Do not retry it as is: split it (``RangeSizer.on_range_error`` gives the span to use). The
  provider's hints are parsed when present: a suggested range (Alchemy, Infura, reth, dRPC,
  BlastAPI), a block-span maximum (QuickNode, Avalanche, Cloudflare, thirdweb, geth, reth, …) or
  a result-count maximum. Without hints the caller halves.
* ``RATE_LIMITED`` – wait (``retry_after`` when the provider said how long) and retry.
* ``TRANSIENT`` – retry with backoff, a bounded number of times: timeouts, resets, 5xx, truncated
  JSON, a node lagging behind the head ("header not found", "unknown block"). Errors nobody
  recognises also land here with ``recognized=False``, so a new provider message costs a few
  retries, not a crash loop and not an infinite one.
* ``PERMANENT`` – retrying cannot help: wrong URL or API key, method not available, invalid
  params, reverted call, pruned history. The message names the fix where one is known.

The -32005 trap: providers use -32005 both for "query returned more than 10000 results" /
block-range limits (Infura, Besu, Nethermind, Coinbase) and for rate limits (Infura "daily request
count exceeded", Tenderly "rate limit exceeded"). The code alone never decides: the message text
and the HTTP status do. A bare "limit exceeded" with nothing else to go on is reported as
``RATE_LIMITED`` with ``ambiguous=True``: back off once, and if the same request hits it again,
treat it as a range error (``RangeSizer.on_range_error`` accepts it and halves).

Timeouts: a response timeout is ``TRANSIENT`` with ``timeout=True`` (the node may just be busy).
On ``eth_getLogs`` the caller should also report it to ``RangeSizer.on_timeout``, which shrinks
the span after repeated timeouts. Server-side query timeouts that providers document as "reduce
your range" (Infura/Alchemy "query timeout exceeded") are ``RANGE_TOO_LARGE`` with ``timeout=True``.

Messages never contain URLs, hosts or key-like query parameters (an RPC URL often carries an API
key): every text taken from a response or an exception goes through ``redact``.

Nothing here imports aiohttp: exceptions are recognised by class name and by builtin bases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = [
    "RpcError",
    "RpcErrorInfo",
    "RpcErrorKind",
    "classify_exception",
    "classify_http",
    "classify_rpc_error",
    "parse_retry_after",
    "redact",
]


class RpcErrorKind(enum.Enum):
    RANGE_TOO_LARGE = "range_too_large"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class RpcErrorInfo:
    """What went wrong, in a form the client can act on.

    ``max_block_span`` is an inclusive block count (``to - from + 1``) that the provider says it
    accepts; when a provider's wording is off by one either way, the smaller reading is kept.
    """

    kind: RpcErrorKind
    message: str  # short human text, never containing the RPC URL
    suggested_range: tuple[int, int] | None = None
    max_block_span: int | None = None
    max_results: int | None = None
    retry_after: float | None = None  # seconds
    code: int | None = None  # JSON-RPC error code, when there was one
    http_status: int | None = None
    timeout: bool = False  # a client or server timeout (feed RangeSizer.on_timeout for eth_getLogs)
    ambiguous: bool = False  # "limit exceeded" without text telling a rate limit from a range limit
    recognized: bool = True  # False for the catch-all TRANSIENT of an error nobody recognised

    @property
    def retryable(self) -> bool:
        return self.kind is not RpcErrorKind.PERMANENT


class RpcError(Exception):
    """Raised by the RPC client; ``info`` says what to do about it, ``method`` what was called."""

    def __init__(self, info: RpcErrorInfo, method: str | None = None) -> None:
        self.info = info
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{info.kind.value}: {info.message}")

    @property
    def kind(self) -> RpcErrorKind:
        return self.info.kind

    def __reduce__(self):  # keeps the exception picklable (Dagster moves errors across processes)
        return (type(self), (self.info, self.method))


# --------------------------------------------------------------------------------------------
# Redaction

_MAX_MESSAGE = 240

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://anything (http, https, ws, wss, …) including user:password@ and paths with keys
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s\"'<>\\]+"), "<url>"),
    # bare host names with an optional port and path: mainnet.infura.io/v3/KEY, host:8545
    (re.compile(r"\b(?:[A-Za-z0-9-]+\.)+[a-z]{2,24}(?::\d{1,5})?(?:/[^\s\"'<>\\]*)?(?![A-Za-z0-9_])"), "<host>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?:/[^\s\"'<>\\]*)?"), "<host>"),
    (re.compile(r"\blocalhost(?::\d{1,5})?(?:/[^\s\"'<>\\]*)?", re.I), "<host>"),
    # key=value / key: value secrets, and bearer tokens
    (
        re.compile(
            r"(?i)\b(api[-_]?key|apikey|access[-_]?token|token|secret|password|passwd|auth(?:orization)?|key)"
            r"(\s*[=:]\s*)(?!<)[^\s&\"',;)}\]]+"
        ),
        r"\1\2<redacted>",
    ),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]+=*"), "Bearer <redacted>"),
)


def redact(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` without URLs, host names or secrets, on one line, at most ``limit`` characters."""
    out = str(text)[: limit * 4 + 256]  # bound the work; cutting the tail cannot expose a URL's head
    for pattern, repl in _REDACTIONS:
        out = pattern.sub(repl, out)
    out = " ".join(out.split())
    if len(out) > limit:
        out = out[: limit - 1].rstrip() + "…"
    return out


# --------------------------------------------------------------------------------------------
# Hints: suggested range, block-span maximum, result-count maximum, retry-after

_NUM = r"(\d[\d,._]*(?:\s?k\b)?)"


def _parse_num(s: str) -> int | None:
    s = s.strip().lower().replace("_", "").replace(" ", "")
    if s.endswith("k"):
        try:
            return int(float(s[:-1].replace(",", "")) * 1000)
        except ValueError:
            return None
    s = s.rstrip(".,").replace(",", "").replace(".", "")
    return int(s) if s.isdigit() else None


def _parse_block(s: str) -> int | None:
    s = s.strip().lower()
    try:
        return int(s, 16) if s.startswith("0x") else int(s)
    except ValueError:
        return None


_BLOCK = r"(0x[0-9a-fA-F]+|\d+)"

_SUGGESTED_RANGE = tuple(
    re.compile(p, re.I)
    for p in (
        # Alchemy: "... this block range should work: [0x0, 0x87fe9]"
        rf"block range should work:\s*\[\s*{_BLOCK}\s*,\s*{_BLOCK}\s*\]",
        # Infura, zkSync, thirdweb, Tenderly: "... Try with this block range [0xBDE5F8, 0x102DBCC]."
        rf"try with this block range\s*\[\s*{_BLOCK}\s*,\s*{_BLOCK}\s*\]",
        # reth, dRPC, BlastAPI, Ankr: "query exceeds max results 20000, retry with the range 22382105-22382515"
        r"retry with the range\s+(\d+)\s*-\s*(\d+)",
    )
)

# Provider-declared block-span limits. Each pattern's first group is the number.
_SPAN_LIMIT = tuple(
    re.compile(p, re.I)
    for p in (
        rf"maximum is set to {_NUM}",  # Avalanche: "requested too many blocks from 0 to 5000, maximum is set to 2048"
        rf"max range:\s*{_NUM}",  # Cloudflare "Max range: 800", cdk-erigon "block range too large, max range: 1000"
        rf"maximum allowed number of requested blocks is {_NUM}",  # thirdweb
        rf"limited to an? {_NUM}",  # QuickNode, 1RPC, BlastAPI: "eth_getLogs is limited to a 10,000 range"
        rf"limited to {_NUM}\s*blocks?",  # BlockPI: "eth_getLogs is limited to 1024 block range"
        rf"up to an? {_NUM}\s*block range",  # Alchemy, Aurora: "... requests with up to a 500 block range"
        rf"limit the query to at most {_NUM}\s*blocks",  # Coinbase (Base node): "please limit the query to at most 1000 blocks"
        rf"max(?:imum)? block range\s*:?\s*{_NUM}",  # geth/publicnode "exceed maximum block range: 5000", reth "query exceeds max block range 100000"
        rf"block range greater than {_NUM}\s*max",  # Swell
        rf"block range exceeds {_NUM}",  # Somnia
        rf"max is {_NUM}\s*blocks",  # Merkle: "eth_getLogs range is too large, max is 1k blocks"
        rf"query must be smaller than size {_NUM}",  # Harmony
        rf"block range is too wide \(maximum {_NUM}\)",  # Moonbeam / Frontier
        rf"blocks distance:\s*{_NUM}",  # Ankr (TAC): "maximum [from, to] blocks distance: 10000"
        rf"ranges over {_NUM}\s*blocks",  # dRPC: "ranges over 10000 blocks are not supported on freetier"
        rf"\brange\s+\d+\s+exceeds limit of {_NUM}",  # Infura: "range 1000000 exceeds limit of 10000"
        rf"exceeds server limit, narrow your filter:\s*{_NUM}",  # Erigon 3 (--rpc.blockrange.limit)
        rf"allowed for your plan \(\s*\d+\s*>\s*{_NUM}\s*\)",  # BlastAPI paid plans
    )
)

_RESULT_LIMIT = tuple(
    re.compile(p, re.I)
    for p in (
        rf"more than {_NUM}\s*results",  # geth family, Infura, zkEVM, Aurora
        rf"max results\s*:?\s*{_NUM}",  # reth, Ankr, LlamaRPC, dRPC
        rf"too many logs, narrow your filter:\s*{_NUM}",  # Erigon 3 (--rpc.logs.maxresults)
        rf"max logs per response is\s*{_NUM}",  # Nethermind
        rf"logs matched by query exceeds limit of {_NUM}",  # Arbitrum (Nitro)
        rf"cap of {_NUM}\s*logs",  # Alchemy: "... any block range with a cap of 10K logs in the response"
        rf"returns? (?:at most|up to) {_NUM}\s*logs",
    )
)

_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip
_UNIT_RE = r"(?:milliseconds?|ms|minutes?|mins?|m|hours?|hrs?|h|seconds?|secs?|s)(?![a-z])"
_RETRY_IN = re.compile(
    rf"(?:retry|try again|wait|back\s*off)\s*(?:in|after|for)?\s*:?\s*((?:\d+(?:\.\d+)?\s*{_UNIT_RE}\s*)+)", re.I
)
_DURATION_PART = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT_RE})", re.I)
_RETRY_KEYS = ("backoff_seconds", "retry_after", "retryafter", "retry_after_seconds", "retry_in_seconds")


def _retry_after_from(text: str, data: Any) -> float | None:
    found = _find_key(data, _RETRY_KEYS, depth=3)
    if found is not None:
        return found
    m = _RETRY_IN.search(text)
    if m:
        total = sum(float(n) * _UNITS[u.lower()] for n, u in _DURATION_PART.findall(m.group(1)))
        return total
    return None


def _find_key(obj: Any, keys: tuple[str, ...], depth: int) -> float | None:
    if depth < 0 or not isinstance(obj, Mapping):
        return None
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() in keys and not isinstance(v, bool):
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f) and f >= 0:
                return f
    for v in obj.values():
        if isinstance(v, Mapping):
            found = _find_key(v, keys, depth - 1)
            if found is not None:
                return found
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110)."""
    if value is None:
        return None
    v = str(value).strip()
    if not v:
        return None
    try:
        secs = float(v)
    except ValueError:
        pass
    else:
        return max(0.0, secs) if math.isfinite(secs) else None
    try:
        dt = parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, dt.timestamp() - now)


@dataclass(frozen=True)
class _Hints:
    suggested_range: tuple[int, int] | None = None
    max_block_span: int | None = None
    max_results: int | None = None

    def any(self) -> bool:
        return self.suggested_range is not None or self.max_block_span is not None or self.max_results is not None


def _hints(text: str, data: Any, code: int | None) -> _Hints:
    suggested = None
    for p in _SUGGESTED_RANGE:
        m = p.search(text)
        if m:
            a, b = _parse_block(m.group(1)), _parse_block(m.group(2))
            if a is not None and b is not None and a <= b:
                suggested = (a, b)
                break
    max_results = None
    for p in _RESULT_LIMIT:
        m = p.search(text)
        if m and (n := _parse_num(m.group(1))):
            max_results = n
            break
    if isinstance(data, Mapping):  # Infura puts the range in data: {"from": "0x..", "to": "0x..", "limit": 10000}
        a, b = data.get("from"), data.get("to")
        if suggested is None and isinstance(a, str) and isinstance(b, str):
            pa, pb = _parse_block(a), _parse_block(b)
            if pa is not None and pb is not None and pa <= pb:
                suggested = (pa, pb)
        lim = data.get("limit")
        if max_results is None and isinstance(lim, int) and not isinstance(lim, bool) and lim > 0:
            max_results = lim
    span = None
    # Alchemy's response-size message offers "up to a 2K block range ... or any block range with a
    # cap of 10K logs": there the 2K is one of two options, not a cap on the span.
    if not re.search(r"any block range", text, re.I):
        for p in _SPAN_LIMIT:
            m = p.search(text)
            if m and (n := _parse_num(m.group(1))):
                span = n
                break
    if span is None and code == -32600 and re.search(r"block range is too wide", text, re.I):
        span = 3000  # Ankr says only "block range is too wide"; 3000 is its observed limit (ponder, rindexer)
    return _Hints(suggested, span, max_results)


# --------------------------------------------------------------------------------------------
# Text patterns. Order of use (see _classify): JSON-RPC code 429, permanent overrides, head lag,
# range hints, rate-limit text, range text, rate-limit codes, ambiguous "limit exceeded",
# permanent text, transient text, bare -32005 (ambiguous), permanent codes, unrecognized.

def _rx(p: str) -> re.Pattern[str]:
    return re.compile(p, re.I | re.X)


# Permanent even though the words look like a range or limit error.
_PERMANENT_OVERRIDE = _rx(r"""
    invalid\ block\ range\ params            # geth/reth: fromBlock > toBlock, or blockHash with a range
  | exceed\ max\ (?:topics|addresses)        # geth: filter too wide in topics/addresses, not in blocks
  | addresses\ or\ topics
  | pending\ logs\ are\ not\ supported
  | request\ body\ too\ large                # proxyd 413: the request, not the range
  | exceeds\ max\ batch\ size | too\ many\ .{0,40}\ in\ (?:the\ )?batch | batch\ (?:size|limit)\ (?:exceeded|too)
  | too\ many\ rpc\ calls\ in\ batch
  | eth_getlogs\ is\ disabled | method\ (?:is\ )?disabled
""")

# The node is behind the block we asked about (or briefly went backwards during a reorg).
_HEAD_LAG = _rx(r"""
    extends\ beyond\ (?:the\ )?current\ head | beyond\ (?:the\ )?(?:current\ )?head
  | block\ is\ out\ of\ range | out\ of\ range | out\ of\ bounds | blockoutofrange
  | block\ height\ is\ \d+\ but\ requested
  | after\ last\ accepted\ block                # Avalanche
  | not\ yet\ (?:imported|available|synced|indexed|processed)
  | header\ not\ found | unknown\ block | block\ not\ found | resource\ not\ found
  | cannot\ query\ unfinalized | future\ block | ahead\ of\ (?:the\ )?(?:current\ )?(?:head|chain)
""")

_RATE = _rx(r"""
    rate[\s_-]?limit | too\ many\ requests | request\ rate | daily\ request | compute\ units?
  | exceeded\ (?:its|your|the)\ .{0,40}capacity | over\ capacity | throughput
  | credits?\s+(?:limit|exceed|exhaust|used|per) | \bquota\b
  | \d+\s*/\s*(?:sec|second|s|min|minute)\b | per\ second | \brps\b | requests?\ per\ (?:second|minute|day)
  | request\ limit\ reached | throttl | too\ many\ (?:concurrent\ |parallel\ )?(?:calls|connections)
  | slow\ down
""")

_RANGE = _rx(r"""
    block\s*range | blocks?\ range | range\ of\ blocks | requested\ range | range\ (?:is\ )?too\ (?:large|wide|big|high|long)
  | range\ limit | range\ exceeds | exceeds?\ (?:the\ )?(?:max(?:imum)?\ )?(?:rpc\ )?(?:block\ )?range
  | too\ many\ blocks | requested\ too\ many | query\ returned\ more\ than | more\ than\ [\d,.]+k?\ (?:results|logs)
  | max(?:imum)?\ results | too\ many\ (?:results|logs) | result\ set\ too\ large | logs\ matched\ by\ query
  | response\ size | response\ (?:is\ )?too\ (?:large|big) | response\ exceed | exceeds?\ (?:the\ )?size\ limit
  | size\ exceeded | log\ response | query\ timeout\ (?:exceeded|occurred) | narrow\ (?:your|the)\ (?:filter|query|range)
  | blocks\ distance | limit\ the\ query | smaller\ (?:block\ )?range | reduce\ (?:the\ |your\ )?(?:query\ |block\ )*range
  | maxblockrange | max(?:imum)?\ (?:allowed\ )?(?:number\ of\ )?(?:requested\ )?blocks
""")

# EIP-1474 -32005 "Request exceeds defined limit"; BSC dataseed "limit exceeded".
_AMBIGUOUS_LIMIT = _rx(r"limit\ exceeded | exceeds?\ (?:the\ )?defined\ limit | limit\ reached")

_PERMANENT = _rx(r"""
    method\ not\ found | does\ not\ exist | is\ not\ available | not\ supported | unsupported
  | not\ whitelisted | not\ allowed | \bdisabled\b | \bdenied\b
  | invalid\ api[\s_-]?key | api[\s_-]?key | unauthori[sz]ed | authenticat | forbidden
  | project\ id | invalid\ project | invalid\ token | must\ be\ authenticated
  | chain\s?id\ mismatch | invalid\ chain | wrong\ chain | unsupported\ chain | network\ not\ supported
  | execution\ reverted | revert | out\ of\ gas | insufficient\ funds | nonce\ too
  | gas\ limit | intrinsic\ gas | gas\ required\ exceeds
  | missing\ trie\ node | pruned | required\ data\ unavailable | state\ (?:is\ )?not\ available
  | historical\ state | archive
  | invalid\ argument | invalid\ param | invalid\ input | cannot\ unmarshal | invalid\ topic
  | invalid\ address | hex\ string | invalid\ request | parse\ error
  | payment\ required | upgrade\ (?:your\ )?plan | subscription | suspended | \bblocked\b | sanctioned
""")

_AUTH = _rx(r"api[\s_-]?key | unauthori[sz]ed | authenticat | forbidden | project\ id | invalid\ project | invalid\ token | \bdenied\b")
_PRUNED = _rx(r"missing\ trie\ node | pruned | required\ data\ unavailable | state\ (?:is\ )?not\ available | historical\ state | archive")

_TRANSIENT = _rx(r"""
    time[d\s_-]*out | deadline\ exceeded | took\ too\ long | context\ cancel
  | internal\ (?:server\ )?error | server\ error | busy | overload | unavailable | temporar
  | try\ again | retry | no\ backend | not\ healthy | unhealthy | backend | gateway | upstream
  | connection | \beof\b | reset | refused | syncing | not\ synced | database | leveldb
  | bad\ response | invalid\ response | service | lagging | behind
""")

_TIMEOUT = _rx(r"time[d\s_-]*out | deadline\ exceeded | took\ too\ long")

_PERMANENT_CODES = frozenset({-32700, -32600, -32601, -32602, -32003, -32004, -32006, 3})
_RATE_CODES = frozenset({-32029, -32016, -32017, -32090, -32007})  # proxyd, Ankr, QuickNode
_RANGE_CODES = frozenset({-32020})  # proxyd "backend response too large"


def _stringify(data: Any, limit: int = 4000) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data[:limit]
    try:
        return json.dumps(data, default=str)[:limit]
    except (TypeError, ValueError):
        return str(data)[:limit]


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _describe_hints(h: _Hints) -> str:
    parts = []
    if h.suggested_range is not None:
        parts.append(f"suggested blocks {h.suggested_range[0]}-{h.suggested_range[1]}")
    if h.max_block_span is not None:
        parts.append(f"max {h.max_block_span} blocks")
    if h.max_results is not None:
        parts.append(f"max {h.max_results} results")
    return f" ({', '.join(parts)})" if parts else ""


def _classify(code: int | None, message: str, data: Any, http_status: int | None) -> RpcErrorInfo:
    text = (message if data is None else f"{message} {_stringify(data)}")[:8000]
    shown = redact(message or _stringify(data)) or "(no message)"
    where = f"[{code}] " if code is not None else ""

    def mk(kind: RpcErrorKind, what: str, **kw: Any) -> RpcErrorInfo:
        return RpcErrorInfo(kind=kind, message=f"{what}: {where}{shown}", code=code, http_status=http_status, **kw)

    timeout = bool(_TIMEOUT.search(text))
    retry_after = _retry_after_from(text, data)

    if code == 429:  # Alchemy puts the HTTP status in the JSON-RPC code, also inside batch items
        return mk(RpcErrorKind.RATE_LIMITED, "rate limited", retry_after=retry_after)
    if _PERMANENT_OVERRIDE.search(text):
        return mk(RpcErrorKind.PERMANENT, "request rejected (fix the request or its batching; retrying cannot help)")
    if _HEAD_LAG.search(text):
        return mk(RpcErrorKind.TRANSIENT, "node is behind the requested block (retry later)", retry_after=retry_after)

    hints = _hints(text, data, code)
    if hints.any():
        return mk(
            RpcErrorKind.RANGE_TOO_LARGE,
            "range too large" + _describe_hints(hints),
            suggested_range=hints.suggested_range,
            max_block_span=hints.max_block_span,
            max_results=hints.max_results,
            timeout=timeout,
        )
    if _RATE.search(text):
        return mk(RpcErrorKind.RATE_LIMITED, "rate limited", retry_after=retry_after)
    if _RANGE.search(text) or code in _RANGE_CODES:
        return mk(RpcErrorKind.RANGE_TOO_LARGE, "range too large (no hint: halve it)", timeout=timeout)
    if code in _RATE_CODES:
        return mk(RpcErrorKind.RATE_LIMITED, "rate limited", retry_after=retry_after)
    ambiguous = mk(
        RpcErrorKind.RATE_LIMITED,
        "limit exceeded, rate or range unknown (back off once, then split the range)",
        retry_after=retry_after,
        ambiguous=True,
    )
    if _AMBIGUOUS_LIMIT.search(text):
        return ambiguous
    if _PERMANENT.search(text):
        if _AUTH.search(text):
            return mk(RpcErrorKind.PERMANENT, "the provider refused the request: check the RPC URL / API key")
        if _PRUNED.search(text):
            return mk(RpcErrorKind.PERMANENT, "the node no longer has this data: use an archive node")
        return mk(RpcErrorKind.PERMANENT, "permanent RPC error")
    if _TRANSIENT.search(text):
        return mk(RpcErrorKind.TRANSIENT, "transient RPC error", retry_after=retry_after, timeout=timeout)
    if code == -32005:  # EIP-1474 "limit exceeded" with a message that tells nothing more
        return ambiguous
    if code in _PERMANENT_CODES:
        what = "method not available on this node" if code in (-32601, -32004) else "permanent RPC error"
        return mk(RpcErrorKind.PERMANENT, what)
    return mk(
        RpcErrorKind.TRANSIENT,
        "unrecognized RPC error (treated as transient; retry a bounded number of times)",
        retry_after=retry_after,
        recognized=False,
    )


def classify_rpc_error(error: Mapping | str | None, *, http_status: int | None = None) -> RpcErrorInfo:
    """Classify a JSON-RPC error object ``{"code", "message", "data"?}`` (a bare string is accepted)."""
    if isinstance(error, Mapping):
        code = _as_int(error.get("code"))
        message = error.get("message")
        data = error.get("data")
    else:
        code, message, data = None, error, None
    if not isinstance(message, str):
        message = "" if message is None else _stringify(message)
    return _classify(code, message, data, http_status)


# --------------------------------------------------------------------------------------------
# HTTP

_CODE_IN_TEXT = re.compile(r'"code"\s*:\s*(-?\d+)')
_MESSAGE_IN_TEXT = re.compile(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)')


def _extract_rpc_error(body_text: str) -> Mapping | None:
    """The JSON-RPC error object in a response body, also from a body cut short."""
    s = body_text.strip()
    if not s or s[0] not in "[{":
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        # Truncated body (the client may pass only its first bytes): pick the fields by pattern.
        m = _MESSAGE_IN_TEXT.search(s)
        if not m:
            return None
        c = _CODE_IN_TEXT.search(s)
        try:
            msg = json.loads(f'"{m.group(1)}"')
        except ValueError:
            msg = m.group(1)
        return {"code": int(c.group(1)) if c else None, "message": msg}
    if isinstance(obj, list):
        for item in obj:
            if isinstance(item, Mapping) and item.get("error") is not None:
                obj = item
                break
        else:
            return None
    if not isinstance(obj, Mapping):
        return None
    err = obj.get("error")
    if isinstance(err, Mapping):
        return err
    if isinstance(err, str):
        return {"message": err, "code": obj.get("code")}
    if "code" in obj and "message" in obj:  # QuickNode/Alchemy answer some errors with a bare error object
        return obj
    if isinstance(obj.get("message"), str):
        return {"message": obj["message"]}
    return None


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    try:
        v = headers.get(name)
    except Exception:  # noqa: BLE001 - odd mapping types
        v = None
    if v is not None:
        return str(v)
    lname = name.lower()
    for k, v in headers.items():
        if isinstance(k, str) and k.lower() == lname:
            return str(v)
    return None


def classify_http(
    status: int, headers: Mapping[str, str] | None, body_text: str, *, now: float | None = None
) -> RpcErrorInfo:
    """Classify a non-200 HTTP response (a 200 whose body is a JSON-RPC error works too).

    429 is a rate limit (Retry-After honoured, seconds or HTTP-date); 408/425/5xx are transient
    unless the JSON-RPC error inside says more (proxyd answers "backend response too large" with
    500); 413 is a range error; a 400 carrying a JSON-RPC error is classified by that error;
    401/403/404 are permanent with a message naming the fix.
    """
    status = int(status)
    body_text = body_text or ""
    header_wait = parse_retry_after(_header(headers, "Retry-After"), now=now)
    err = _extract_rpc_error(body_text)
    if err is not None:
        info = classify_rpc_error(err, http_status=status)
    else:
        info = _classify(None, body_text, None, status)
    if err is not None:
        inner = err.get("message")
        inner = inner if isinstance(inner, str) and inner else _stringify(err)
        shown = redact(inner, 160)
    else:
        shown = redact(body_text, 160) if body_text.strip() else "(empty body)"

    def done(i: RpcErrorInfo, **changes: Any) -> RpcErrorInfo:
        if header_wait is not None and i.kind is RpcErrorKind.RATE_LIMITED:
            changes.setdefault("retry_after", header_wait)
        return dataclasses.replace(i, http_status=status, **changes)

    def new(kind: RpcErrorKind, what: str, **kw: Any) -> RpcErrorInfo:
        return done(RpcErrorInfo(kind=kind, message=f"HTTP {status} {what}: {shown}", code=info.code, **kw))

    known = info.recognized
    if status == 429:
        wait = header_wait if header_wait is not None else info.retry_after
        return new(RpcErrorKind.RATE_LIMITED, "rate limited", retry_after=wait)
    if 200 <= status < 300:
        if err is not None or known:
            return done(info)
        return new(RpcErrorKind.TRANSIENT, "response without a JSON-RPC result", recognized=False)
    if status in (401, 403, 407):
        if info.kind is RpcErrorKind.RATE_LIMITED and not info.ambiguous:
            return done(info)
        return new(RpcErrorKind.PERMANENT, "unauthorized: check the RPC URL / API key")
    if status == 404:
        return new(RpcErrorKind.PERMANENT, "not found: check the RPC URL (path and API key)")
    if status == 413:
        if info.kind is RpcErrorKind.PERMANENT and err is not None:
            return done(info)  # proxyd "request body too large": the batch, not the range
        return done(
            dataclasses.replace(info, kind=RpcErrorKind.RANGE_TOO_LARGE, recognized=True, ambiguous=False),
            message=f"HTTP 413 range too large{_describe_hints(_Hints(info.suggested_range, info.max_block_span, info.max_results))}: {shown}",
        )
    if status in (408, 425):
        return new(RpcErrorKind.TRANSIENT, "request timeout" if status == 408 else "too early", timeout=status == 408)
    if 500 <= status < 600:
        if info.kind in (RpcErrorKind.RANGE_TOO_LARGE, RpcErrorKind.RATE_LIMITED) and known:
            return done(info)
        if info.kind is RpcErrorKind.PERMANENT and info.code in _PERMANENT_CODES:
            return done(info)  # a JSON-RPC error (method not found, invalid params) sent with a 5xx
        timeout = info.timeout or status in (504, 522, 524)
        return new(RpcErrorKind.TRANSIENT, "server error", timeout=timeout)
    if status == 400:
        if err is not None or (known and info.kind is not RpcErrorKind.PERMANENT):
            return done(info)
        return new(RpcErrorKind.PERMANENT, "bad request")
    if 300 <= status < 400:
        return new(RpcErrorKind.PERMANENT, "redirect: check the RPC URL")
    if status == 402:
        return new(RpcErrorKind.PERMANENT, "payment required: the plan's credits are exhausted")
    if 400 <= status < 500:
        if info.kind is RpcErrorKind.RATE_LIMITED and not info.ambiguous:
            return done(info)
        return new(RpcErrorKind.PERMANENT, "client error: check the RPC URL and request")
    return new(RpcErrorKind.TRANSIENT, "unexpected status", recognized=False)


# --------------------------------------------------------------------------------------------
# Exceptions

_INVALID_URL_NAMES = frozenset(
    {"InvalidURL", "InvalidUrlClientError", "NonHttpUrlClientError", "InvalidUrlRedirectClientError",
     "NonHttpUrlRedirectClientError", "MissingSchema", "InvalidSchema"}
)  # fmt: skip
_CERT_NAMES = frozenset({"ClientConnectorCertificateError", "SSLCertVerificationError", "CertificateError"})
_SSL_NAMES = frozenset({"ClientSSLError", "ClientConnectorSSLError", "SSLError"})
_TIMEOUT_NAMES = frozenset(
    {"TimeoutError", "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError", "ReadTimeout",
     "ConnectTimeout", "ReadTimeoutError", "TimeoutException"}
)  # fmt: skip
_DISCONNECT_NAMES = frozenset(
    {"ServerDisconnectedError", "ClientConnectionResetError", "ClientPayloadError", "ContentLengthError",
     "TransferEncodingError", "ClientConnectionError", "ClientOSError", "ClientConnectorError",
     "ServerConnectionError", "ClientConnectorDNSError", "IncompleteRead", "RemoteProtocolError",
     "ConnectError", "WSServerHandshakeError"}
)  # fmt: skip


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _detail(exc: BaseException) -> str:
    text = redact(str(exc), 160)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exc_info(kind: RpcErrorKind, what: str, exc: BaseException, **kw: Any) -> RpcErrorInfo:
    return RpcErrorInfo(kind=kind, message=f"{what} ({_detail(exc)})", **kw)


def classify_exception(exc: BaseException) -> RpcErrorInfo:
    """Classify a transport-level exception (aiohttp/asyncio/OS/JSON decoding)."""
    if isinstance(exc, RpcError):
        return exc.info
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return RpcErrorInfo(RpcErrorKind.PERMANENT, f"cancelled ({type(exc).__name__}): re-raise, do not retry")
    names = _names(exc)

    # aiohttp.ClientResponseError (raise_for_status, ContentTypeError) carries the HTTP status.
    status = getattr(exc, "status", None)
    if "ClientResponseError" in names and isinstance(status, int) and not isinstance(status, bool):
        headers = getattr(exc, "headers", None)
        body = getattr(exc, "message", "") or ""
        return classify_http(status, headers if isinstance(headers, Mapping) else None, str(body))

    if names & _INVALID_URL_NAMES:
        return RpcErrorInfo(RpcErrorKind.PERMANENT, f"invalid RPC URL ({type(exc).__name__}): check the URL")
    if "TooManyRedirects" in names:
        return _exc_info(RpcErrorKind.PERMANENT, "too many redirects: check the RPC URL", exc)

    cert = getattr(exc, "certificate_error", None)
    underlying = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError) or names & _CERT_NAMES or isinstance(
        cert, ssl.SSLCertVerificationError
    ) or isinstance(underlying, ssl.SSLCertVerificationError):
        return _exc_info(RpcErrorKind.PERMANENT, "TLS certificate rejected: check the RPC URL's host and scheme", exc)
    if isinstance(exc, ssl.SSLError) or names & _SSL_NAMES:
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or isinstance(
            underlying, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
        ):
            return _exc_info(RpcErrorKind.TRANSIENT, "TLS connection dropped", exc)
        return _exc_info(RpcErrorKind.PERMANENT, "TLS handshake failed: check the RPC URL's scheme and port", exc)

    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, socket.timeout)) or names & _TIMEOUT_NAMES:
        return _exc_info(RpcErrorKind.TRANSIENT, "request timed out", exc, timeout=True)
    if isinstance(exc, socket.gaierror) or "ClientConnectorDNSError" in names or isinstance(underlying, socket.gaierror):
        return _exc_info(RpcErrorKind.TRANSIENT, "DNS lookup failed (check the RPC host if this persists)", exc)
    if isinstance(exc, ConnectionError) or names & _DISCONNECT_NAMES:
        return _exc_info(RpcErrorKind.TRANSIENT, "connection failed or dropped", exc)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)) or "JSONDecodeError" in names:
        return _exc_info(RpcErrorKind.TRANSIENT, "invalid or truncated JSON response", exc)
    if isinstance(exc, ValueError):
        return _exc_info(RpcErrorKind.TRANSIENT, "malformed response", exc)
    if isinstance(exc, OSError):
        return _exc_info(RpcErrorKind.TRANSIENT, "network error", exc)
    if "ClientError" in names:
        return _exc_info(RpcErrorKind.TRANSIENT, "HTTP client error", exc)
    return _exc_info(
        RpcErrorKind.TRANSIENT,
        "unrecognized error (treated as transient; retry a bounded number of times)",
        exc,
        recognized=False,
    )
