"""An async JSON-RPC client: one keep-alive HTTP session, bounded concurrency, classified retries.

Transient failures (timeouts, resets, 5xx, invalid JSON) and rate limits are retried with
exponential backoff and full jitter, honouring Retry-After; range errors go back to the caller,
which splits the range; permanent errors fail at once. The URL is never put in a message: it
may carry an API key.
"""

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson

from indexer_dagster.monitor.errors import (
    RpcError,
    RpcErrorInfo,
    RpcErrorKind,
    classify_exception,
    classify_http,
    classify_rpc_error,
)


@dataclass
class RpcStats:
    """Counters a run reports as metadata (and, later, as metrics)."""

    requests: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

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


class RpcClient:
    """Use as `async with RpcClient(url) as rpc:`; all methods are coroutines."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        stats: RpcStats | None = None,
    ) -> None:
        self._url = url
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

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _post_once(self, payload: bytes) -> bytes:
        assert self._session is not None, "use RpcClient as an async context manager"
        async with self._limit:
            async with self._session.post(self._url, data=payload) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RpcError(classify_http(resp.status, resp.headers, body[:2000].decode("utf-8", "replace")))
                return body

    async def _with_retries(self, method: str, payload: bytes, check) -> Any:
        """POST `payload` and run `check(body)`; retry what is transient, re-raise the rest."""
        attempt = 0
        while True:
            self.stats.requests[method] += 1
            try:
                body = await self._post_once(payload)
                return check(body)
            except RpcError as e:
                info = e.info
            except Exception as e:  # noqa: BLE001 - classified below, unknown kinds become RpcError
                info = classify_exception(e)
            self.stats.errors[f"{method}:{info.kind.value}"] += 1
            if info.ambiguous and attempt >= 1 and method == "eth_getLogs":
                # A bare "limit exceeded" that persists after a backoff is the range, not the rate.
                info = replace(info, kind=RpcErrorKind.RANGE_TOO_LARGE)
            retriable = info.kind in (RpcErrorKind.TRANSIENT, RpcErrorKind.RATE_LIMITED)
            if not retriable or attempt >= self.retry.max_retries:
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

    async def call_raw(self, method: str, params: Sequence[Any] = ()) -> bytes:
        """The raw response body of a successful call, for callers that parse it in bulk (eth_getLogs)."""
        payload = orjson.dumps({"jsonrpc": "2.0", "id": self._next_id(), "method": method, "params": list(params)})

        def check(body: bytes) -> bytes:
            # Log bodies hold only hex values, so a "result" key near the start means success;
            # anything else is parsed and classified.
            if b'"result"' in body[:80]:
                return body
            self._result(body)
            return body

        return await self._with_retries(method, payload, check)

    async def batch(self, method: str, params_list: Sequence[Sequence[Any]]) -> list[Any]:
        """One JSON-RPC batch of calls to the same method; results in order. Any error fails the batch."""
        if not params_list:
            return []
        first = self._next_id()
        self._ids += len(params_list)
        payload = orjson.dumps(
            [{"jsonrpc": "2.0", "id": first + i, "method": method, "params": list(p)} for i, p in enumerate(params_list)]
        )

        def check(body: bytes) -> list[Any]:
            try:
                msgs = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise RpcError(classify_exception(e)) from None
            if isinstance(msgs, dict):  # a provider that refuses batches answers with one error
                if msgs.get("error") is not None:
                    raise RpcError(classify_rpc_error(msgs["error"]))
                raise RpcError(classify_exception(ValueError("batch answered with a single object")))
            by_id = {m.get("id"): m for m in msgs if isinstance(m, dict)}
            out = []
            for i in range(len(params_list)):
                m = by_id.get(first + i)
                if m is None:
                    raise RpcError(classify_exception(ValueError("batch response is missing an item")))
                if m.get("error") is not None:
                    raise RpcError(classify_rpc_error(m["error"]))
                out.append(m.get("result"))
            return out

        return await self._with_retries(method, payload, check)


def call_sync(url: str, method: str, params: Sequence[Any] = (), timeout_s: float = 10.0) -> Any:
    """One blocking JSON-RPC call (for the few checks made while holding a lock inside other code)."""
    import urllib.request

    payload = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except Exception as e:  # noqa: BLE001 - classified, never with the URL
        raise RpcError(classify_exception(e), method=method) from None
    return RpcClient._result(body)
