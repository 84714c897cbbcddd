"""An async JSON-RPC client: one keep-alive HTTP session, bounded concurrency, classified retries.

Transient failures (timeouts, resets, 5xx, invalid JSON) and rate limits are retried with
exponential backoff and full jitter, honouring Retry-After; range errors go back to the caller,
which splits the range; permanent errors fail at once. The URL is never put in a message: it
may carry an API key.
"""

import asyncio
import inspect
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson

from indexer_dagster.chain.budget import RpcBudget, endpoint_key
from indexer_dagster.chain.errors import (
    RpcError,
    RpcErrorInfo,
    RpcErrorKind,
    classify_exception,
    classify_http,
    classify_rpc_error,
)
from indexer_dagster.config import IndexerConfig


@dataclass
class RpcStats:
    """Counters a run reports as metadata (and, later, as metrics)."""

    requests: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    failovers: int = 0  # moves to the next endpoint after repeated failures
    budget_wait_s: float = 0.0  # time spent waiting for the shared requests-per-second budget

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_retries(self) -> int:
        return sum(self.retries.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "retries": dict(self.retries),
            "errors": dict(self.errors),
            "failovers": self.failovers,
            "budget_wait_s": round(self.budget_wait_s, 3),
        }


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    base_delay_s: float = 0.2
    max_delay_s: float = 20.0

    def delay(self, attempt: int, info: RpcErrorInfo) -> float:
        if info.retry_after is not None:
            return min(max(info.retry_after, 0.0), self.max_delay_s * 3)
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * (2**attempt)))


@dataclass
class _Failover:
    active: int = 0  # index of the endpoint requests go to
    fails: int = 0  # consecutive transient failures of the active endpoint
    moved_at: float = 0.0  # when requests left the preferred endpoint (monotonic)


_FAILOVER: dict[tuple[str, ...], _Failover] = {}


class RpcClient:
    """Use as `async with RpcClient(url) as rpc:`; all methods are coroutines.

    `url` may be a list of endpoints in order of preference: after `failover_after` consecutive
    transient failures or rate limits of the active endpoint, requests move to the next one, and
    `failback_after_s` later they try the preferred one again. `budget` (an `RpcBudget`) caps the
    requests per second of each endpoint across processes; every attempt waits for it.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout_s: float = 30.0,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        stats: RpcStats | None = None,
        budget: Any = None,
        failover_after: int = 3,
        failback_after_s: float = 60.0,
    ) -> None:
        self._urls = [url] if isinstance(url, str) else list(url)
        if not self._urls:
            raise ValueError("RpcClient needs at least one endpoint")
        self._budget = budget
        self._budget_keys = [endpoint_key(u) for u in self._urls]
        self.failover_after = max(1, failover_after)
        self.failback_after_s = failback_after_s
        # Shared by the clients of this process with the same endpoints: a new client (the next range,
        # the next follower tick) starts where the last one found a working endpoint.
        self._fo = _FAILOVER.setdefault(tuple(self._urls), _Failover())
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.stats = stats or RpcStats()
        self._session: aiohttp.ClientSession | None = None
        self._ids = 0

    async def __aenter__(self) -> "RpcClient":
        connector = aiohttp.TCPConnector(limit=self._concurrency, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers={"Content-Type": "application/json"}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._budget is not None:
            self._budget.close()

    @property
    def active_endpoint(self) -> int:
        """Index of the endpoint requests currently go to (0 = the preferred one)."""
        return self._fo.active

    def _endpoint(self) -> int:
        fo = self._fo
        if fo.active != 0 and time.monotonic() - fo.moved_at >= self.failback_after_s:
            fo.active, fo.fails = 0, 0  # try the preferred endpoint again
        return fo.active

    def _endpoint_ok(self, idx: int) -> None:
        if idx == self._fo.active:
            self._fo.fails = 0

    def _endpoint_failed(self, idx: int) -> bool:
        """Count a transient failure of endpoint `idx`; True if requests now go to another endpoint."""
        fo = self._fo
        if idx == fo.active and len(self._urls) > 1:
            fo.fails += 1
            if fo.fails >= self.failover_after:
                fo.active, fo.fails = (idx + 1) % len(self._urls), 0
                fo.moved_at = time.monotonic()
                self.stats.failovers += 1
        return fo.active != idx

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _post_once(self, payload: bytes, idx: int = 0) -> bytes:
        assert self._session is not None, "use RpcClient as an async context manager"
        async with self._limit:
            if self._budget is not None:
                self.stats.budget_wait_s += await self._budget.acquire(self._budget_keys[idx])
            async with self._session.post(self._urls[idx], data=payload) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RpcError(classify_http(resp.status, resp.headers, body[:2000].decode("utf-8", "replace")))
                return body

    async def _with_retries(
        self, method: str, payload: bytes, check, retries_for: Callable[[RpcErrorInfo], int | None] | None = None,
    ) -> Any:
        """POST `payload` and run `check(body)`; retry what is transient, re-raise the rest.
        `retries_for(error)`: how many retries that error gets (None: the policy's)."""
        attempt = 0
        free_moves = len(self._urls) - 1  # a move to another endpoint is not counted as a retry
        while True:
            self.stats.requests[method] += 1
            idx = self._endpoint()
            try:
                body = await self._post_once(payload, idx)
                result = check(body)
                # A check may parse in a worker thread; its failures are retried like the POST's.
                result = await result if inspect.isawaitable(result) else result
                self._endpoint_ok(idx)
                return result
            except RpcError as e:
                info = e.info
            except Exception as e:  # noqa: BLE001 - classified below, unknown kinds become RpcError
                info = classify_exception(e)
            self.stats.errors[f"{method}:{info.kind.value}"] += 1
            if info.ambiguous and attempt >= 1 and method == "eth_getLogs":
                # A bare "limit exceeded" that persists after a backoff is the range, not the rate.
                info = replace(info, kind=RpcErrorKind.RANGE_TOO_LARGE)
            retriable = info.kind in (RpcErrorKind.TRANSIENT, RpcErrorKind.RATE_LIMITED)
            if not retriable:
                self._endpoint_ok(idx)  # it answered: the request, not the endpoint, is at fault
            elif self._endpoint_failed(idx) and free_moves > 0:
                free_moves -= 1
                self.stats.retries[method] += 1
                continue  # at once, on the endpoint requests moved to
            limit = retries_for(info) if retries_for is not None else None
            if not retriable or attempt >= (self.retry.max_retries if limit is None else limit):
                if retriable:
                    info = replace(
                        info,
                        kind=RpcErrorKind.PERMANENT,
                        message=f"gave up after {attempt + 1} attempts: {info.message}",
                    )
                raise RpcError(info, method=method)
            self.stats.retries[method] += 1
            await asyncio.sleep(self.retry.delay(attempt, info))
            attempt += 1

    @staticmethod
    def _result(body: bytes) -> Any:
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise RpcError(classify_exception(e)) from None
        if isinstance(msg, dict) and msg.get("error") is not None:
            raise RpcError(classify_rpc_error(msg["error"]))
        if not isinstance(msg, dict) or "result" not in msg:
            raise RpcError(classify_exception(ValueError("JSON-RPC response without result")))
        return msg["result"]

    async def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        payload = orjson.dumps({"jsonrpc": "2.0", "id": self._next_id(), "method": method, "params": list(params)})
        return await self._with_retries(method, payload, self._result)

    async def call_raw(
        self, method: str, params: Sequence[Any] = (), parse: Callable[[bytes], Any] | None = None,
        retries_for: Callable[[RpcErrorInfo], int | None] | None = None,
    ) -> Any:
        """The raw response body of a successful call, for callers that parse it in bulk (eth_getLogs);
        or `parse(body)`, run in a worker thread: a 200 body it cannot parse (cut short, not JSON) is
        retried like any transient error instead of failing the run. `retries_for(error)`: how many retries
        that error gets (None: the policy's)."""
        payload = orjson.dumps({"jsonrpc": "2.0", "id": self._next_id(), "method": method, "params": list(params)})

        async def parsed(body: bytes) -> Any:
            assert parse is not None  # check() calls this only with a parser
            try:
                return await asyncio.to_thread(parse, body)
            except Exception as e:  # noqa: BLE001 - the body, not the code: fetch it again
                raise RpcError(RpcErrorInfo(
                    RpcErrorKind.TRANSIENT, f"invalid or truncated JSON response ({type(e).__name__})"
                )) from None

        def check(body: bytes) -> Any:
            # Log bodies hold only hex values, so a "result" key near the start means success;
            # anything else is parsed and classified.
            if b'"result"' not in body[:80]:
                self._result(body)
            return body if parse is None else parsed(body)

        return await self._with_retries(method, payload, check, retries_for)

    async def batch(self, method: str, params_list: Sequence[Sequence[Any]]) -> list[Any]:
        """One JSON-RPC batch of calls to the same method; results in order.

        A batch that fails as a whole (HTTP error, reset, a body that is not JSON) is retried as a whole;
        calls that fail inside an answered batch (a load-balanced node whose replica lags answers a few
        with `header not found`) are asked again alone, in a smaller batch, keeping the answers already
        had. A permanent error of any call fails the batch."""
        results: list[Any] = [None] * len(params_list)
        pending = list(range(len(params_list)))
        attempt = 0
        while pending:
            answers = await self._batch_once(method, [params_list[i] for i in pending])
            failed: list[int] = []
            last: RpcErrorInfo | None = None
            for i, (ok, value) in zip(pending, answers, strict=True):
                if ok:
                    results[i] = value
                    continue
                if value.kind not in (RpcErrorKind.TRANSIENT, RpcErrorKind.RATE_LIMITED):
                    raise RpcError(value, method=method)
                failed.append(i)
                last = value
            if not failed:
                break
            assert last is not None
            self.stats.errors[f"{method}:{last.kind.value}"] += len(failed)
            if attempt >= self.retry.max_retries:
                raise RpcError(replace(last, kind=RpcErrorKind.PERMANENT, message=(
                    f"gave up after {attempt + 1} attempts ({len(failed)} of {len(params_list)} calls "
                    f"still failing): {last.message}")), method=method)
            self.stats.retries[method] += 1
            await asyncio.sleep(self.retry.delay(attempt, last))
            attempt += 1
            pending = failed
        return results

    async def _batch_once(self, method: str, params_list: Sequence[Sequence[Any]]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, error info) per call of one batch; a batch that fails as a whole is
        retried here like any request."""
        first = self._next_id()
        self._ids += len(params_list)
        payload = orjson.dumps(
            [{"jsonrpc": "2.0", "id": first + i, "method": method, "params": list(p)} for i, p in enumerate(params_list)]
        )

        def check(body: bytes) -> list[tuple[bool, Any]]:
            try:
                msgs = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise RpcError(classify_exception(e)) from None
            if isinstance(msgs, dict):  # a provider that refuses batches answers with one error
                if msgs.get("error") is not None:
                    raise RpcError(classify_rpc_error(msgs["error"]))
                raise RpcError(classify_exception(ValueError("batch answered with a single object")))
            by_id = {m.get("id"): m for m in msgs if isinstance(m, dict)}
            out: list[tuple[bool, Any]] = []
            for i in range(len(params_list)):
                m = by_id.get(first + i)
                if m is None:  # an answer without this call: ask for it again
                    out.append((False, classify_exception(ValueError("batch response is missing an item"))))
                elif m.get("error") is not None:
                    out.append((False, classify_rpc_error(m["error"])))
                else:
                    out.append((True, m.get("result")))
            return out

        return await self._with_retries(method, payload, check)


def call_sync(url: str | Sequence[str], method: str, params: Sequence[Any] = (), timeout_s: float = 10.0) -> Any:
    """One blocking JSON-RPC call (for the few checks made while holding a lock inside other code).

    Several URLs: tried in order until one answers (an endpoint that is down is not an answer)."""
    if not isinstance(url, str):
        last: RpcError | None = None
        for u in url:
            try:
                return call_sync(u, method, params, timeout_s)
            except RpcError as e:
                if e.info.kind not in (RpcErrorKind.TRANSIENT, RpcErrorKind.RATE_LIMITED):
                    raise
                last = e
        assert last is not None, "call_sync needs at least one URL"
        raise last
    import urllib.request

    payload = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except Exception as e:  # noqa: BLE001 - classified, never with the URL
        raise RpcError(classify_exception(e), method=method) from None
    return RpcClient._result(body)


def rpc_client(
    cfg: IndexerConfig,
    stats: RpcStats | None = None,
    *,
    timeout_s: float | None = None,
    concurrency: int | None = None,
    retry: RetryPolicy | None = None,
) -> RpcClient:
    """The chain's endpoints with failover, under the shared per-endpoint budget if one is configured;
    the keyword arguments override the config's (a quick probe wants a short timeout, few retries)."""
    c = cfg.chain
    return RpcClient(
        c.endpoints,
        timeout_s=c.request_timeout_s if timeout_s is None else timeout_s,
        concurrency=c.concurrency if concurrency is None else concurrency,
        retry=retry or RetryPolicy(max_retries=c.max_retries),
        stats=stats,
        budget=RpcBudget(cfg.state_url, c.requests_per_second) if c.requests_per_second else None,
        failover_after=c.failover_after,
        failback_after_s=c.failback_after_s,
    )
