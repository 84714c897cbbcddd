"""A fault-injecting JSON-RPC proxy for tests: sits between the indexer and a real node (anvil).

`FaultProxy(upstream_url, rate=0.2, seed=1).start()` serves on a free local port in a background
thread (its own event loop). Each request is forwarded to the node unless a fault is drawn (seeded
randomness; `rate` is the chance per HTTP request). The fault kind is the applicable kind injected
least so far (ties broken by the seeded RNG), so a run with enough faults exercises every kind.

Kinds (`KINDS`):
- `http_429` (with `Retry-After`), `http_500`, `http_502`, `http_503`: an HTTP error, node not asked;
- `reset`: the node's answer is cut mid-body and the connection closed;
- `hang`: no answer for `hang_s` (longer than the client's request_timeout_s);
- `truncated`: HTTP 200 with the node's body cut in half; `invalid_json`: HTTP 200 with an HTML page;
- `rpc_error`: HTTP 200 with a transient JSON-RPC error object (in one item of a batch);
- `head_lag`: `eth_blockNumber` answers a head 1..`max_lag` blocks behind (the head jumps backwards);
  also drawn on its own with `head_lag_rate`;
- `drop_log`: HTTP 200 with one log removed from an `eth_getLogs` result. `drop_pick` chooses it:
  `visible` (the only log of its address, or of its topic0, in its block: the bloom betrays it),
  `shadowed` (other logs of the block carry its address and its topic0: invisible to the bloom), `any`.
  With `drop_once_per_query` a given query (method + params) loses a log at most once (a flaky replica).

`item_error_rate`: each call of a batch is answered, with that chance, by `-32000 header not found` (a node
behind a load balancer whose replicas lag), independently of the others (kind `item_error`).

Rules that are not random: `max_logs_span` answers "query returned more than 10000 results" to
`eth_getLogs` over more blocks than that (kind `range_too_large`); `outage` = "503" or "reset" fails
every request (kind `outage_503` / `outage_reset`).

Counters: `injected[kind]`, `requests[method]` (each call of a batch counts), `log_requests` (the
(fromBlock, toBlock) or blockHash of each `eth_getLogs`), `header_requests` (block numbers asked with
`eth_getBlockByNumber`), `dropped` (the logs removed).
"""

import asyncio
import random
import threading
from collections import Counter
from typing import Any

import aiohttp
import orjson
from aiohttp import web

KINDS = (
    "http_429", "http_500", "http_502", "http_503", "reset", "hang", "truncated", "invalid_json", "rpc_error",
    "head_lag", "drop_log",
)
TRANSPORT_KINDS = tuple(k for k in KINDS if k not in ("head_lag", "drop_log"))


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        kinds: tuple[str, ...] = KINDS,
        seed: int = 0,
        retry_after: int = 1,
        hang_s: float = 3.0,
        max_logs_span: int | None = None,
        max_lag: int = 4,
        head_lag_rate: float = 0.0,
        drop_pick: str = "visible",
        drop_once_per_query: bool = False,
        item_error_rate: float = 0.0,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        assert not unknown, f"unknown fault kinds {unknown}"
        self.upstream = upstream
        self.rate = rate
        self.kinds = tuple(kinds)
        self.rng = random.Random(seed)
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.max_logs_span = max_logs_span
        self.max_lag = max_lag
        self.head_lag_rate = head_lag_rate
        self.drop_pick = drop_pick
        self.drop_once_per_query = drop_once_per_query
        self.item_error_rate = item_error_rate
        self.outage: str | None = None
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.log_requests: list[tuple] = []
        self.header_requests: list[int] = []
        self.dropped: list[dict] = []
        self._dropped_queries: set[bytes] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    async def _serve(self) -> None:
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counters(self) -> None:
        self.injected.clear()
        self.requests.clear()
        self.log_requests.clear()
        self.header_requests.clear()
        self.dropped.clear()
        self._dropped_queries.clear()

    def configure(self, **kw: Any) -> None:
        """Change settings while running (rate, kinds, outage, ...)."""
        for k, v in kw.items():
            assert hasattr(self, k), k
            setattr(self, k, v)

    # -- the handler -------------------------------------------------------------------------
    def _draw(self, method: str, batch: bool) -> str | None:
        if method == "eth_blockNumber" and not batch and self.head_lag_rate and self.rng.random() < self.head_lag_rate:
            return "head_lag"
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        ok = [
            k for k in self.kinds
            if (k != "head_lag" or (method == "eth_blockNumber" and not batch))
            and (k != "drop_log" or (method == "eth_getLogs" and not batch))
        ]
        if not ok:
            return None
        least = min(self.injected[k] for k in ok)
        return self.rng.choice([k for k in ok if self.injected[k] == least])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        msg = orjson.loads(raw)
        batch = isinstance(msg, list)
        calls = msg if batch else [msg]
        for c in calls:
            self.requests[c.get("method")] += 1
            self._record(c)
        method = calls[0].get("method") if calls else ""

        if self.outage == "503":
            self.injected["outage_503"] += 1
            return web.Response(status=503, text="service unavailable")
        if self.outage == "reset":
            self.injected["outage_reset"] += 1
            request.transport.close()
            return web.Response(status=503)

        if not batch and method == "eth_getLogs" and self.max_logs_span is not None:
            f = msg["params"][0]
            if "fromBlock" in f and int(f["toBlock"], 16) - int(f["fromBlock"], 16) + 1 > self.max_logs_span:
                self.injected["range_too_large"] += 1
                return self._json({"jsonrpc": "2.0", "id": msg.get("id"), "error": {
                    "code": -32005, "message": "query returned more than 10000 results"}})

        kind = self._draw(method, batch)
        if kind == "http_429":
            self.injected[kind] += 1
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": str(self.retry_after)})
        if kind in ("http_500", "http_502", "http_503"):
            self.injected[kind] += 1
            return web.Response(status=int(kind[-3:]), text="upstream error")
        if kind == "hang":
            self.injected[kind] += 1
            await asyncio.sleep(self.hang_s)
            return web.Response(status=504, text="gateway timeout")
        if kind == "invalid_json":
            self.injected[kind] += 1
            return web.Response(status=200, body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if kind == "rpc_error":
            self.injected[kind] += 1
            err = {"code": -32603, "message": "Internal error"}
            if batch:
                status, body = await self._forward(raw)
                items = orjson.loads(body)
                if isinstance(items, list) and items:
                    i = self.rng.randrange(len(items))
                    items[i] = {"jsonrpc": "2.0", "id": items[i].get("id"), "error": err}
                return self._json(items, status)
            return self._json({"jsonrpc": "2.0", "id": msg.get("id"), "error": err})

        status, body = await self._forward(raw)
        if batch and self.item_error_rate > 0:
            items = orjson.loads(body)
            for i, item in enumerate(items):
                if self.rng.random() < self.item_error_rate:
                    self.injected["item_error"] += 1
                    items[i] = {"jsonrpc": "2.0", "id": item.get("id"),
                                "error": {"code": -32000, "message": "header not found"}}
            body = orjson.dumps(items)
        if kind == "truncated":
            self.injected[kind] += 1
            return web.Response(status=status, body=body[: len(body) // 2], content_type="application/json")
        if kind == "reset":
            self.injected[kind] += 1
            resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            request.transport.close()
            return resp
        if kind == "head_lag":
            head = int(orjson.loads(body)["result"], 16)
            lagged = max(head - self.rng.randint(1, self.max_lag), 0)
            if lagged != head:
                self.injected[kind] += 1
            return self._json({"jsonrpc": "2.0", "id": msg.get("id"), "result": hex(lagged)}, status)
        if kind == "drop_log":
            body = self._drop(msg, body)
        return web.Response(status=status, body=body, content_type="application/json")

    def _record(self, call: dict) -> None:
        m, params = call.get("method"), call.get("params") or []
        if m == "eth_getLogs" and params:
            f = params[0]
            self.log_requests.append(
                (f["blockHash"],) if "blockHash" in f else (int(f["fromBlock"], 16), int(f["toBlock"], 16))
            )
        elif m == "eth_getBlockByNumber" and params and str(params[0]).startswith("0x"):
            self.header_requests.append(int(params[0], 16))

    def _drop(self, msg: dict, body: bytes) -> bytes:
        key = orjson.dumps(msg.get("params"))
        if self.drop_once_per_query and key in self._dropped_queries:
            return body
        reply = orjson.loads(body)
        logs = reply.get("result") if isinstance(reply, dict) else None
        if not logs:
            return body
        by_address = Counter((log["blockHash"], log["address"].lower()) for log in logs)
        by_topic = Counter((log["blockHash"], (log["topics"] or [None])[0]) for log in logs)

        def fits(log: dict) -> bool:
            # Visible to the bloom: the only log of its address, or of its topic0, in its block.
            alone = (by_address[(log["blockHash"], log["address"].lower())] == 1
                     or by_topic[(log["blockHash"], (log["topics"] or [None])[0])] == 1)
            return {"visible": alone, "shadowed": not alone, "any": True}[self.drop_pick]

        candidates = [i for i, log in enumerate(logs) if fits(log)]
        if not candidates:
            return body
        i = self.rng.choice(candidates)
        self.dropped.append(logs.pop(i))
        self._dropped_queries.add(key)
        self.injected["drop_log"] += 1
        return orjson.dumps(reply)

    async def _forward(self, raw: bytes) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.post(self.upstream, data=raw, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")
