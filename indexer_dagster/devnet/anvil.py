"""Start and talk to a local anvil node (plain Python, no Dagster).

``Anvil`` runs the native anvil binary shipped by the ``@foundry-rs/anvil`` npm package
(``npm ci`` in the repository root installs it) on a free localhost port. JSON-RPC goes through
web3.py (``Anvil.w3``, :func:`web3_for`; :func:`call` / :func:`batch` for anvil's own methods and raw
batches, which raise web3's ``Web3RPCError``). The indexer's bulk path has a client of its own
(``indexer_dagster.chain.rpc``): see ``bench/web3_logs.py`` for why.

anvil is always started with ``--hardfork cancun``: with the default hardfork each new block
got slower as the chain grew.  ``--prune-history`` is never passed, because it breaks
``anvil_reorg`` / ``anvil_rollback``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, cast

from web3 import HTTPProvider, Web3
from web3.exceptions import Web3RPCError
from web3.types import RPCEndpoint

__all__ = [
    "Anvil",
    "AnvilNotFoundError",
    "AnvilStartError",
    "batch",
    "call",
    "find_anvil",
    "free_port",
    "repo_root",
    "rpc",
    "rpc_batch",
    "web3_for",
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
# JSON-RPC: web3.py
# ---------------------------------------------------------------------------------------------


def web3_for(url: str, timeout: float = 600.0) -> Web3:
    """A web3.py ``Web3`` on ``url`` with no middleware (anvil's own methods and raw batches pass as
    they are) and no retries (a node that is down says so at once: the start-up probe relies on it)."""
    return Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None),
                middleware=[])


def call(w3: Web3, method: str, params: Sequence[Any] | None = None) -> Any:
    """One JSON-RPC call; returns ``result`` or raises web3's ``Web3RPCError``."""
    return w3.manager.request_blocking(RPCEndpoint(method), list(params or []))


def batch(w3: Web3, calls: Iterable[tuple[str, Sequence[Any] | None]], raise_on_error: bool = True) -> list[Any]:
    """``[(method, params), ...]`` as ONE JSON-RPC batch; results in call order. With ``raise_on_error=False``
    a failed entry is returned as its ``Web3RPCError`` instead of raising the first one."""
    calls = list(calls)
    if not calls:
        return []
    provider = cast(HTTPProvider, w3.provider)
    out = provider.make_batch_request([(RPCEndpoint(m), list(p or [])) for m, p in calls])
    if not isinstance(out, list):  # the whole batch was rejected
        raise Web3RPCError(f"batch rejected: {out.get('error')}", rpc_response=out)
    results: list[Any] = []
    for (method, _), r in zip(calls, out, strict=True):
        if r.get("error") is None:
            results.append(r.get("result"))
            continue
        err = Web3RPCError(f"{method}: {r['error']}", rpc_response=r)
        if raise_on_error:
            raise err
        results.append(err)
    return results


def _close(w3: Web3) -> None:
    """Close the HTTP sessions of ``w3``'s provider (its kept-alive connections to the node)."""
    manager = getattr(w3.provider, "_request_session_manager", None)
    cache = getattr(manager, "session_cache", None)
    if cache is not None:
        for _key, session in list(cache.items()):
            session.close()
        cache.clear()


_local = threading.local()


def _client(url: str) -> Web3:
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    c = cache.get(url)
    if c is None:
        c = cache[url] = web3_for(url)
    return c


def rpc(url: str, method: str, params: Sequence[Any] | None = None) -> Any:
    """One synchronous JSON-RPC call to ``url`` (a ``Web3`` kept per thread); raises ``Web3RPCError``."""
    return call(_client(url), method, params)


def rpc_batch(url: str, calls: Iterable[tuple[str, Sequence[Any] | None]], raise_on_error: bool = True) -> list[Any]:
    """One JSON-RPC batch to ``url``; see :func:`batch`."""
    return batch(_client(url), calls, raise_on_error=raise_on_error)


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
        self._w3: Web3 | None = None

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
        self._w3 = web3_for(self.url)
        deadline = time.monotonic() + self.startup_timeout
        probe = web3_for(self.url, timeout=2.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AnvilStartError(
                        f"anvil exited with code {self.proc.returncode}: {' '.join(cmd)}\n{self._log_tail()}"
                    )
                try:
                    got = int(call(probe, "eth_chainId"), 16)
                except (OSError, Web3RPCError):  # requests' errors are OSErrors
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
            _close(probe)

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
        if self._w3 is not None:
            _close(self._w3)
            self._w3 = None
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
    @property
    def w3(self) -> Web3:
        """web3.py on this node (no middleware: see :func:`web3_for`)."""
        if self._w3 is None:
            raise RuntimeError("anvil is not started")
        return self._w3

    def rpc(self, method: str, params: Sequence[Any] | None = None) -> Any:
        """One JSON-RPC call; returns ``result`` or raises ``Web3RPCError``."""
        return call(self.w3, method, params)

    def batch(self, calls: Iterable[tuple[str, Sequence[Any] | None]], raise_on_error: bool = True) -> list[Any]:
        """One JSON-RPC batch ``[(method, params), ...]``; results in call order (see :func:`batch`)."""
        return batch(self.w3, calls, raise_on_error=raise_on_error)

    # -- small conveniences ---------------------------------------------------------------------
    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def accounts(self) -> list[str]:
        return self.rpc("eth_accounts")

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", [hex(blocks)])

