"""Durable RPC counters per chain: `<data_dir>/<chain>/_meta/rpc_stats.json`.

Every run adds what its `RpcStats` counted since its last flush (a delta, so a stats object shared by
several ranges is never counted twice) under a file lock, and writes the file atomically (temp file,
fsync, rename): a crash leaves the previous totals, never a torn file. Recording never raises into
the indexer — monitoring must not stop indexing.
"""

import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path

from filelock import FileLock, Timeout

from indexer_dagster.chain.errors import RpcErrorKind
from indexer_dagster.chain.rpc import RpcStats
from indexer_dagster.health.logs import get_logger
from indexer_dagster.persist.datasets import META, RPC_STATS_FILE

log = get_logger(__name__)
KINDS = ("requests", "retries", "errors")
ERROR_KINDS = {k.value for k in RpcErrorKind}


def stats_path(data_dir: Path, chain: str) -> Path:
    return Path(data_dir) / chain / META / RPC_STATS_FILE


def empty() -> dict:
    return {"requests": {}, "retries": {}, "errors": {}, "updated_at": None, "last_error_at": None, "last_error": None}


def read_rpc_stats(data_dir: Path, chain: str) -> dict:
    """The chain's cumulative counters: requests and retries by method, errors by `method:kind`."""
    p = stats_path(data_dir, chain)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return empty()
    except (OSError, ValueError) as e:
        log.warning("RPC stats file %s is unreadable (%s); counting from zero", p, type(e).__name__)
        return empty()
    out = empty()
    out.update({k: v for k, v in data.items() if k in out})
    return out


def record_rpc_stats(data_dir: Path, chain: str, delta: dict) -> bool:
    """Add `delta` ({requests, retries, errors}: counters) to the chain's totals; False if it failed."""
    if not any(delta.get(k) for k in KINDS):
        return True
    p = stats_path(data_dir, chain)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(p) + ".lock", timeout=10):
            data = read_rpc_stats(data_dir, chain)
            for kind in KINDS:
                total = Counter(data.get(kind) or {})
                total.update({k: int(v) for k, v in (delta.get(kind) or {}).items() if v})
                data[kind] = dict(sorted(total.items()))
            now = time.time()
            data["updated_at"] = now
            if delta.get("errors"):
                data["last_error_at"] = now
                data["last_error"] = max(delta["errors"].items(), key=lambda kv: kv[1])[0]
            tmp = p.with_name(f".{RPC_STATS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "w") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        return True
    except (OSError, Timeout, ValueError) as e:
        log.warning("could not record RPC stats for %s: %s", chain, e)
        return False


class RpcStatsRecorder:
    """Flushes what an `RpcStats` counted since the last flush (or since this recorder was made)."""

    def __init__(self, data_dir: Path, chain: str, stats: RpcStats, every_s: float = 15.0) -> None:
        self.data_dir, self.chain, self.stats, self.every_s = Path(data_dir), chain, stats, every_s
        self._flushed = {k: Counter(getattr(stats, k)) for k in KINDS}
        self._last = time.monotonic()

    def flush(self) -> None:
        delta = {k: dict(Counter(getattr(self.stats, k)) - self._flushed[k]) for k in KINDS}
        # `errors` also carries other counters (e.g. `verify:*`): keep the RPC errors (`method:kind`).
        delta["errors"] = {k: v for k, v in delta["errors"].items() if k.rpartition(":")[2] in ERROR_KINDS}
        if record_rpc_stats(self.data_dir, self.chain, delta):
            self._flushed = {k: Counter(getattr(self.stats, k)) for k in KINDS}
        self._last = time.monotonic()

    def maybe_flush(self) -> None:
        """Flush if `every_s` passed since the last one (long-running followers)."""
        if time.monotonic() - self._last >= self.every_s:
            self.flush()


def errors_by_method(errors: dict[str, int]) -> dict[str, int]:
    out: Counter = Counter()
    for key, n in errors.items():
        out[key.split(":", 1)[0]] += n
    return dict(out)


def failures(errors: dict[str, int]) -> int:
    """Errors that are failures: a range too large is the adaptive span at work, not a failing node."""
    return sum(n for k, n in errors.items() if not k.endswith(f":{RpcErrorKind.RANGE_TOO_LARGE.value}"))


def error_rate(stats: dict) -> float | None:
    """Failed requests / requests (every attempt counts)."""
    requests = sum((stats.get("requests") or {}).values())
    return failures(stats.get("errors") or {}) / requests if requests else None
