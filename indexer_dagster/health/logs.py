"""Structured log lines for the indexer's own `logging` calls: run id, chain and range on every record,
plain text or JSON (`INDEXER_LOG_FORMAT=json`), and no secret ever written.

- `log_context(chain=..., range=..., run_id=...)` (a context manager) or `bind(...)` (for a process that
  is one run) puts fields on every record logged below it; they live in a `ContextVar`, so they follow
  `asyncio` tasks and `asyncio.to_thread`.
- `get_logger(name)` returns a logger whose records carry those fields and whose message, arguments and
  traceback are scrubbed of registered secrets (RPC URLs and their key-like parts, webhook URLs) before
  any handler sees them — pytest's caplog and Dagster's captured loggers included.
- `configure_logging()` installs one stderr handler on the `indexer_dagster` logger (idempotent);
  `INDEXER_LOG_LEVEL` sets its level.
"""

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import parse_qsl, urlsplit

ROOT = "indexer_dagster"
FORMAT_ENV = "INDEXER_LOG_FORMAT"
LEVEL_ENV = "INDEXER_LOG_LEVEL"
CONTEXT_FIELDS = ("run_id", "chain", "range")
MIN_SECRET_LEN = 8  # shorter URL parts ("v2", "rpc", "mainnet") are not keys

_context: ContextVar[dict] = ContextVar("indexer_log_context", default={})  # noqa: B039 - never mutated: bind() sets a new dict
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_configured = False


# --- secrets --------------------------------------------------------------------------------------------

def url_secrets(url: str | None) -> set[str]:
    """The parts of a URL that may be a credential: the URL itself, user-info, long path segments and
    query values (e.g. `/v2/<key>`, `?apikey=<key>`)."""
    if not url:
        return set()
    out = {url}
    try:
        parts = urlsplit(url)
    except ValueError:
        return out
    if parts.username:
        out.add(parts.username)
    if parts.password:
        out.add(parts.password)
    out |= {seg for seg in parts.path.split("/") if len(seg) >= MIN_SECRET_LEN}
    if parts.query:
        out.add(parts.query)
        out |= {v for _k, v in parse_qsl(parts.query, keep_blank_values=True) if len(v) >= MIN_SECRET_LEN}
    if parts.path:
        out.add(parts.path + (f"?{parts.query}" if parts.query else ""))
    return {s for s in out if len(s) >= MIN_SECRET_LEN}


def register_secrets(values: Iterable[str]) -> None:
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= MIN_SECRET_LEN)


def register_url(url: str | None) -> None:
    register_secrets(url_secrets(url))


def register_config(cfg) -> None:
    """Register the secrets of a config (every chain's RPC URL, the alert webhook)."""
    for c in getattr(cfg, "chains", [cfg]):
        for url in getattr(c.chain, "endpoints", [c.chain.rpc_url]):  # every failover endpoint too
            register_url(url)
    alerts = getattr(cfg, "alerts", None)
    if alerts is not None:
        register_url(alerts.webhook_url)


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every registered (and `extra`) secret replaced by `***`, longest first."""
    if not isinstance(text, str):
        text = str(text)
    with _secrets_lock:
        secrets = sorted(_secrets | {s for s in extra if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


# --- context --------------------------------------------------------------------------------------------

@contextmanager
def log_context(**fields) -> Iterator[None]:
    """Add fields (None values ignored) to every record logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields) -> None:
    """Add fields for the rest of the current context (a run's process: its run id)."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


class ContextFilter(logging.Filter):
    """Puts the context fields on the record and scrubs secrets from its message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        for k, v in ctx.items():
            if not hasattr(record, k):
                setattr(record, k, v)
        record.context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None))
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not kill the caller
            message = str(record.msg)
        clean = scrub(message)
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


_FILTER = ContextFilter()


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


# --- output ---------------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for k in CONTEXT_FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_text:
            out["exception"] = scrub(record.exc_text)
        elif record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "context", "")
        record.context = f"[{ctx}] " if ctx and not ctx.startswith("[") else ctx
        return scrub(super().format(record))


class _Handler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (pytest swaps it), but past rich's progress-bar proxy, which
    would re-wrap long (JSON) lines at the terminal width."""

    @property
    def stream(self):
        return getattr(sys.stderr, "rich_proxied_file", sys.stderr)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(default_level: str = "INFO") -> None:
    """Send the indexer's log records to stderr, as text or JSON (`INDEXER_LOG_FORMAT`); idempotent."""
    global _configured
    if _configured:
        return
    _configured = True
    logger = logging.getLogger(ROOT)
    handler = _Handler()
    handler.addFilter(_FILTER)
    handler.setFormatter(JsonFormatter() if os.environ.get(FORMAT_ENV, "").lower() == "json" else TextFormatter())
    logger.addHandler(handler)
    level = os.environ.get(LEVEL_ENV, default_level).upper()
    logger.setLevel(getattr(logging, level, logging.INFO))
