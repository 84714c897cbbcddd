"""Start and talk to a local anvil node (plain Python, no Dagster).

``Anvil`` runs the native anvil binary shipped by the ``@foundry-rs/anvil`` npm package
(``npm ci`` in the repository root installs it) on a free localhost port. ``rpc`` /
``RpcClient`` are a tiny synchronous JSON-RPC client (``http.client`` + orjson, one kept-alive
connection per thread and URL) that raises :class:`RpcError` on JSON-RPC errors.

anvil is always started with ``--hardfork cancun``: with the default hardfork each new block
got slower as the chain grew.  ``--prune-history`` is never passed, because it breaks
``anvil_reorg`` / ``anvil_rollback``.
"""

from __future__ import annotations

import atexit
import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = [
    "Anvil",
    "AnvilNotFoundError",
    "AnvilStartError",
    "RpcClient",
    "RpcError",
    "find_anvil",
    "free_port",
    "repo_root",
    "rpc",
    "rpc_batch",
]

#: ``indexer_dagster/devnet/anvil.py`` -> repository root (holds package.json / node_modules)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The repository root (the directory holding ``package.json`` and ``node_modules``)."""
    return _REPO_ROOT


class AnvilNotFoundError(FileNotFoundError):
    """No anvil binary could be found."""


class AnvilStartError(RuntimeError):
    """anvil exited or did not answer ``eth_chainId`` in time."""


class RpcError(RuntimeError):
    """A JSON-RPC error object returned by the node (or a malformed answer)."""

    def __init__(self, method: str, code: int | None, message: str, data: Any = None):
        self.method = method
        self.code = code
        self.message = message
        self.data = data
        text = f"{method}: JSON-RPC error {code}: {message}"
        if data is not None:
            text += f" (data: {str(data)[:300]})"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------
# finding the binary
# ---------------------------------------------------------------------------------------------


def find_anvil() -> str:
    """Path of an anvil executable.

    Order: ``$ANVIL_BIN``; the native binary from ``node_modules/@foundry-rs/anvil-<platform>``;
    ``node_modules/.bin/anvil`` (a slower node wrapper); ``anvil`` on ``PATH``.
    """
    env = os.environ.get("ANVIL_BIN")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise AnvilNotFoundError(f"ANVIL_BIN={env!r} is not an executable file")
    nm = _REPO_ROOT / "node_modules"
    candidates: list[Path] = [nm / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"]
    scope = nm / "@foundry-rs"
    if scope.is_dir():
        candidates += sorted(scope.glob("anvil-*/bin/anvil"))
    candidates.append(nm / ".bin" / "anvil")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    raise AnvilNotFoundError(
        "anvil not found: run `npm ci` in the repository root "
        f"({_REPO_ROOT}) to install @foundry-rs/anvil, or put anvil on PATH / set ANVIL_BIN."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# JSON-RPC client
# ---------------------------------------------------------------------------------------------


class RpcClient:
    """Synchronous JSON-RPC over HTTP with one kept-alive connection (not thread-safe)."""

    def __init__(self, url: str, timeout: float = 120.0):
        self.url = url
        self.timeout = timeout
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"only http(s) JSON-RPC URLs are supported, got {url!r}")
        self._https = u.scheme == "https"
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or (443 if self._https else 80)
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._conn: http.client.HTTPConnection | None = None
        self._ids = itertools.count(1)

    # -- transport ------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def post(self, body: bytes) -> bytes:
        """POST raw bytes, return the raw response body (one reconnect on a dropped socket)."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(
                    "POST", self._path, body=body, headers={"Content-Type": "application/json"}
                )
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
                continue
            if resp.status != 200:
                # JSON-RPC errors normally come with 200; keep the body for the message
                try:
                    orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise RpcError("<http>", resp.status, data[:500].decode(errors="replace")) from None
            return data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- calls ----------------------------------------------------------------------------------
    def call(self, method: str, params: Sequence[Any] | None = None) -> Any:
        """One call; returns ``result`` or raises :class:`RpcError`."""
        req = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params or [])}
        out = orjson.loads(self.post(orjson.dumps(req)))
        if isinstance(out, dict) and "error" in out and out["error"] is not None:
            e = out["error"]
            raise RpcError(method, e.get("code"), e.get("message", ""), e.get("data"))
        if not isinstance(out, dict) or "result" not in out:
            raise RpcError(method, None, f"malformed response: {str(out)[:300]}")
        return out["result"]

    def batch(
        self, calls: Iterable[tuple[str, Sequence[Any] | None] | list], raise_on_error: bool = True
    ) -> list[Any]:
        """Send ``[(method, params), ...]`` as ONE JSON-RPC batch; results in call order.

        With ``raise_on_error=False`` failed entries are returned as :class:`RpcError` objects
        instead of raising the first one.
        """
        calls = list(calls)
        if not calls:
            return []
        first = next(self._ids)
        reqs = []
        for i, c in enumerate(calls):
            method, params = c[0], (c[1] if len(c) > 1 else None)
            reqs.append({"jsonrpc": "2.0", "id": first + i, "method": method, "params": list(params or [])})
        for _ in range(len(calls) - 1):
            next(self._ids)
        out = orjson.loads(self.post(orjson.dumps(reqs)))
        if isinstance(out, dict):  # the whole batch was rejected
            e = out.get("error") or {}
            raise RpcError("<batch>", e.get("code"), e.get("message", str(out)[:300]), e.get("data"))
        by_id = {r.get("id"): r for r in out}
        results: list[Any] = []
        for i, c in enumerate(calls):
            r = by_id.get(first + i)
            if r is None:
                err: Any = RpcError(c[0], None, "no response for this batch entry")
            elif r.get("error") is not None:
                e = r["error"]
                err = RpcError(c[0], e.get("code"), e.get("message", ""), e.get("data"))
            else:
                results.append(r.get("result"))
                continue
            if raise_on_error:
                raise err
            results.append(err)
        return results

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_local = threading.local()


def _client(url: str) -> RpcClient:
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    c = cache.get(url)
    if c is None:
        c = cache[url] = RpcClient(url)
    return c


def rpc(url: str, method: str, params: Sequence[Any] | None = None) -> Any:
    """One synchronous JSON-RPC call to ``url`` (connection kept per thread); raises RpcError."""
    return _client(url).call(method, params)


def rpc_batch(url: str, calls: Iterable[tuple[str, Sequence[Any] | None]], raise_on_error: bool = True) -> list[Any]:
    """One JSON-RPC batch to ``url``; see :meth:`RpcClient.batch`."""
    return _client(url).batch(calls, raise_on_error=raise_on_error)


# ---------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------

_RUNNING: weakref.WeakSet[Anvil] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # never leave an orphan anvil behind
    for a in list(_RUNNING):
        try:
            a.stop()
        except Exception:  # noqa: BLE001 - best effort at exit: stop the others too
            pass


class Anvil:
    """A local anvil process.  Use as a context manager or call :meth:`start` / :meth:`stop`.

    >>> with Anvil(chain_id=31337) as node:
    ...     node.rpc("eth_blockNumber")
    '0x0'
    """

    def __init__(
        self,
        port: int | None = None,
        chain_id: int = 31337,
        block_time: float | None = None,
        load_state: str | os.PathLike | None = None,
        dump_state: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        hardfork: str = "cancun",
        silent: bool = True,
        gas_limit: int | None = None,
        timestamp: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 30.0,
        log_path: str | os.PathLike | None = None,
    ):
        self.requested_port = port
        self.port: int | None = port
        self.host = host
        self.chain_id = chain_id
        self.block_time = block_time
        self.load_state = str(load_state) if load_state else None
        self.dump_state = str(dump_state) if dump_state else None
        self.extra_args = list(extra_args)
        self.hardfork = hardfork
        self.silent = silent
        self.gas_limit = gas_limit
        self.timestamp = timestamp
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.log_path = str(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None
        self._own_log = False
        self._client: RpcClient | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("anvil is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        binary = self.binary or find_anvil()
        cmd = [
            binary,
            "--host", self.host,
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--hardfork", self.hardfork,
        ]
        if self.block_time is not None:
            bt = self.block_time
            cmd += ["--block-time", str(int(bt)) if float(bt).is_integer() else str(bt)]
        if self.silent:
            cmd.append("--silent")
        if self.gas_limit is not None:
            cmd += ["--gas-limit", str(self.gas_limit)]
        if self.timestamp is not None:
            cmd += ["--timestamp", str(int(self.timestamp))]
        if self.load_state:
            cmd += ["--load-state", self.load_state]
        if self.dump_state:
            cmd += ["--dump-state", self.dump_state]
        cmd += self.extra_args
        if any(a.startswith("--prune-history") for a in cmd):
            raise ValueError("--prune-history breaks anvil_reorg/anvil_rollback; don't use it")
        return cmd

    def start(self) -> Anvil:
        if self.running:
            return self
        if self.load_state and not os.path.exists(self.load_state):
            raise FileNotFoundError(f"anvil state file not found: {self.load_state}")
        attempts = 1 if self.requested_port is not None else 3
        last: Exception | None = None
        for _ in range(attempts):
            self.port = self.requested_port if self.requested_port is not None else free_port(self.host)
            try:
                self._spawn_and_wait()
                _RUNNING.add(self)
                return self
            except AnvilStartError as e:  # e.g. the free port got taken meanwhile
                last = e
                self._terminate(kill_after=2.0)
        assert last is not None
        raise last

    def _spawn_and_wait(self) -> None:
        cmd = self.command()
        if self.log_path:
            self._log_file = open(self.log_path, "ab")
            self._own_log = False
        else:
            self._log_file = tempfile.TemporaryFile(prefix="anvil-", suffix=".log")
            self._own_log = True
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the parent's terminal doesn't hit anvil
        )
        self._client = RpcClient(self.url, timeout=600.0)
        deadline = time.monotonic() + self.startup_timeout
        probe = RpcClient(self.url, timeout=2.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AnvilStartError(
                        f"anvil exited with code {self.proc.returncode}: {' '.join(cmd)}\n{self._log_tail()}"
                    )
                try:
                    got = int(probe.call("eth_chainId"), 16)
                except (OSError, http.client.HTTPException, RpcError):
                    got = None
                if got is not None:
                    if got != self.chain_id:
                        raise AnvilStartError(f"anvil answered chain id {got}, expected {self.chain_id}")
                    return
                if time.monotonic() > deadline:
                    raise AnvilStartError(
                        f"anvil did not answer eth_chainId within {self.startup_timeout}s\n{self._log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            probe.close()

    def _log_tail(self, n: int = 4000) -> str:
        f = self._log_file
        if f is None:
            return ""
        try:
            f.flush()
            with open(f.fileno(), "rb", closefd=False) as r:
                r.seek(0, os.SEEK_END)
                size = r.tell()
                r.seek(max(0, size - n))
                return r.read().decode(errors="replace")
        except Exception:  # noqa: BLE001 - the log tail only decorates an error message
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop anvil: SIGINT (lets ``--dump-state`` write its file), SIGKILL after ``timeout``."""
        rc = self._terminate(kill_after=timeout)
        _RUNNING.discard(self)
        return rc

    def _terminate(self, kill_after: float) -> int | None:
        if self._client is not None:
            self._client.close()
            self._client = None
        p, self.proc = self.proc, None
        rc = None
        if p is not None:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGINT)
                    rc = p.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
            else:
                rc = p.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return rc

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self.running else "stopped"
        return f"<Anvil chain_id={self.chain_id} {state}>"

    # -- RPC ------------------------------------------------------------------------------------
    def client(self) -> RpcClient:
        if self._client is None:
            raise RuntimeError("anvil is not started")
        return self._client

    def rpc(self, method: str, params: Sequence[Any] | None = None) -> Any:
        """One JSON-RPC call; returns ``result`` or raises :class:`RpcError`."""
        return self.client().call(method, params)

    def batch(self, calls: Iterable[tuple[str, Sequence[Any] | None]], raise_on_error: bool = True) -> list[Any]:
        """One JSON-RPC batch ``[(method, params), ...]``; results in call order."""
        return self.client().batch(calls, raise_on_error=raise_on_error)

    # -- small conveniences ---------------------------------------------------------------------
    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def accounts(self) -> list[str]:
        return self.rpc("eth_accounts")

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", [hex(blocks)])

