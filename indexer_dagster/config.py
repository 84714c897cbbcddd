"""The indexer's configuration: one YAML file, validated by typed models before anything runs.

Every mistake becomes one `ConfigError` whose message names the key and the fix. Static checks
(keys, types, addresses, ABI files and events) happen when the file is loaded; checks that need the
node (reachable RPC, chain id, start block below head) happen in `check_against_node`, before a
backfill writes anything.
"""

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from eth_utils import is_checksum_address, is_hex_address, to_checksum_address
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from indexer_dagster.parse.abi import AbiError, EventSpec, event_specs, load_abi

if TYPE_CHECKING:
    from upath import UPath

CONFIG_ENV_VAR = "INDEXER_CONFIG"
CHAIN_ENV_VAR = "INDEXER_CHAIN"  # picks one chain of a multi-chain config
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CHAIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChainConfig(_Strict):
    name: str = Field(description="Short lower-case name; keys partitions, files and views.")
    chain_id: int = Field(gt=0)
    rpc_url: str | None = Field(
        default=None, description="HTTP(S) JSON-RPC endpoint; use ${VAR} to keep keys out of files."
    )
    rpc_urls: list[str] | None = Field(
        default=None, min_length=1,
        description="Several endpoints in order of preference (instead of rpc_url): failover and failback.",
    )
    requests_per_second: float | None = Field(
        default=None, gt=0,
        description="Cap per endpoint, shared by every run and host using the same storage.state_url.",
    )
    failover_after: int = Field(default=3, ge=1, description="Consecutive failed attempts before the next endpoint.")
    failback_after_s: float = Field(default=60.0, ge=0, description="Seconds before trying the preferred endpoint again.")
    confirmations: int = Field(default=12, ge=0)
    start_block: int = Field(default=0, ge=0)
    blocks_per_partition: int = Field(default=10_000, ge=1, le=10_000_000)
    blocks_per_request: int = Field(default=100, ge=1, description="Initial eth_getLogs span; adapts.")
    max_blocks_per_request: int = Field(default=10_000, ge=1)
    concurrency: int = Field(default=4, ge=1, le=64, description="RPC requests in flight per run.")
    headers_batch_size: int = Field(default=100, ge=1, le=1000)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=8, ge=0)
    verify_logs: Literal["bloom", "double", "off"] = Field(
        default="bloom",
        description="Missing-log detection: check logs against each header's logsBloom; 'double' also "
        "fetches every chunk's logs twice and requires agreement; 'off' for chains without usable blooms.",
    )
    reorg_window: int | None = Field(
        default=None, ge=1, description="Canonical headers kept to detect reorgs; default max(2 x confirmations, 64)."
    )
    reference_token: str | None = Field(
        default=None, description="Token whose units DEX volumes are also given in (`volume_ref`), e.g. WETH's "
        "address: pools of different tokens ranked by one volume.")

    @field_validator("reference_token")
    @classmethod
    def _reference_token(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not is_hex_address(v):
            raise ValueError(f"reference_token {v!r} is not an address: expected 0x followed by 40 hex characters")
        if v != v.lower() and not is_checksum_address(v):
            raise ValueError(f"reference_token {v!r} has a wrong EIP-55 checksum (a typo?); the checksummed form "
                             f"of these bytes is {to_checksum_address(v)}, or write it all lower-case")
        return v.lower()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _CHAIN_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid chain name: use lower-case letters, digits and _ (e.g. 'mainnet')")
        return v

    @field_validator("verify_logs", mode="before")
    @classmethod
    def _verify_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("rpc_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("the RPC URL must start with http:// or https:// (websocket URLs are not supported)")
        return v

    @field_validator("rpc_urls")
    @classmethod
    def _urls(cls, v: list[str] | None) -> list[str] | None:
        for i, u in enumerate(v or []):
            if not re.match(r"^https?://[^\s/]+", u):
                raise ValueError(f"entry [{i}] must start with http:// or https:// (websocket URLs are not supported)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("an endpoint is listed twice")
        return v

    @model_validator(mode="after")
    def _endpoints(self) -> "ChainConfig":
        if (self.rpc_url is None) == (self.rpc_urls is None):
            raise ValueError(
                "give exactly one of chain.rpc_url (one endpoint) and chain.rpc_urls (a list, in order of preference)"
                if self.rpc_url else "chain.rpc_url is missing: give the node's URL (or chain.rpc_urls, a list)"
            )
        if self.rpc_urls is not None:
            object.__setattr__(self, "rpc_url", self.rpc_urls[0])  # the preferred one, for single-URL callers
        return self

    @property
    def endpoints(self) -> list[str]:
        """The RPC endpoints in order of preference."""
        if self.rpc_urls:
            return list(self.rpc_urls)
        assert self.rpc_url is not None  # _endpoints: one of rpc_url and rpc_urls is given
        return [self.rpc_url]

    @model_validator(mode="after")
    def _spans(self) -> "ChainConfig":
        if self.blocks_per_request > self.max_blocks_per_request:
            raise ValueError("blocks_per_request must not exceed max_blocks_per_request")
        if self.reorg_window is None:
            object.__setattr__(self, "reorg_window", max(2 * self.confirmations, 64))
        elif self.reorg_window < self.confirmations:
            raise ValueError("reorg_window must be at least confirmations (a reorg that deep must stay repairable)")
        return self


class FactoryConfig(_Strict):
    """Where a contract's addresses come from when a factory creates them (e.g. Uniswap V2 pairs)."""

    contract: str = Field(description="Name of the configured contract (with addresses) that creates them.")
    event: str = Field(description="The factory's creation event: a name or a full signature.")
    parameter: str = Field(description="The event argument (type address) holding the new contract's address.")


class ContractConfig(_Strict):
    name: str
    abi: str = Field(description="Path to a bare ABI list or an artifact JSON with an 'abi' key.")
    # Exactly one of `addresses` and `factory`; a factory contract's `addresses` stays [] (its
    # addresses are the factory's children, resolved at run time by `sync.contracts`).
    addresses: list[str] = Field(default_factory=list)
    factory: FactoryConfig | None = None
    events: list[str] | None = Field(default=None, description="Event names or signatures; default all.")
    start_block: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", v):
            raise ValueError(f"{v!r} is not a valid contract name: use letters, digits and _, starting with a letter")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        out = []
        for v in values:
            if not isinstance(v, str) or not is_hex_address(v):
                raise ValueError(f"{v!r} is not an address: expected 0x followed by 40 hex characters")
            if v != v.lower() and not is_checksum_address(v):
                raise ValueError(
                    f"{v!r} has a wrong EIP-55 checksum (a typo?); the checksummed form of these bytes is "
                    f"{to_checksum_address(v)}, or write it all lower-case to skip the check"
                )
            out.append(v.lower())
        if len(set(out)) != len(out):
            raise ValueError("an address is listed twice")
        return out

    @model_validator(mode="after")
    def _addresses_or_factory(self) -> "ContractConfig":
        if bool(self.addresses) == (self.factory is not None):
            raise ValueError(
                f"contract {self.name} needs exactly one of `addresses` (a list of addresses) and `factory` "
                "({contract, event, parameter}: its addresses are created by a factory contract)"
            )
        return self


class StorageConfig(_Strict):
    data_dir: str = "./data"
    duckdb_path: str | None = Field(default=None, description="Default: <data_dir>/indexer.duckdb")
    state_url: str | None = Field(
        default=None,
        description="Durable indexer state (local chain, reorg ledger, locks): a postgresql:// URL, "
        "or a SQLite file path; default <data_dir>/state.sqlite",
    )
    lake_url: str | None = Field(
        default=None,
        description="Where the Parquet lake lives: a local directory (default: data_dir) or an fsspec URL "
        "of object storage, e.g. s3://bucket/prefix. data_dir keeps the local files (locks, staging, "
        "SQLite state, the DuckDB catalog).",
    )
    lake_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options of lake_url (e.g. endpoint_url, region_name). Credentials come "
        "from the provider's environment variables (AWS_ACCESS_KEY_ID, ...), never from this file.",
    )

    @field_validator("lake_options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        secret = sorted(k for k in v if re.search(r"key|secret|token|password|credential", k, re.I))
        if secret:
            raise ValueError(
                f"{', '.join(secret)}: credentials do not belong in lake_options (they would be stored in the "
                "catalog); set them in the environment the storage library reads (for S3: AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and remove them here"
            )
        return v


class AlertsConfig(_Strict):
    """Where alerts go (`health.alerts`) and when the indexer counts as stale."""

    webhook_url: str | None = Field(default=None, description="JSON POST target; may carry a token: never logged.")
    max_lag_blocks: int = Field(default=50, ge=0, description="Alert when the indexed head is further behind.")
    max_lag_seconds: float = Field(default=600.0, ge=0, description="Same, in block-timestamp seconds.")
    rpc_failures: int = Field(default=3, ge=1, description="Consecutive failed node checks before an alert.")
    timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("the webhook URL must start with http:// or https://")
        return v or None


class IndexerConfig(_Strict):
    chain: ChainConfig
    contracts: Annotated[list[ContractConfig], Field(min_length=1)]
    storage: StorageConfig = StorageConfig()
    alerts: AlertsConfig = AlertsConfig()

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _specs: dict[str, list[EventSpec]] = PrivateAttr(default_factory=dict)
    # Factory-created contract name -> [(the factory's creation event, the column holding the child)].
    _factories: dict[str, list[tuple[EventSpec, str]]] = PrivateAttr(default_factory=dict)
    # Every chain of the file (a `chains:` config); each shares the storage section.
    _siblings: tuple["IndexerConfig", ...] = PrivateAttr(default=())

    @property
    def chains(self) -> list["IndexerConfig"]:
        """The configs of all chains in the file (just this one for a single-chain config)."""
        return list(self._siblings) or [self]

    def for_chain(self, name: str) -> "IndexerConfig":
        for c in self.chains:
            if c.chain.name == name:
                return c
        names = ", ".join(c.chain.name for c in self.chains)
        raise ConfigError(f"chain {name!r} is not in the config (it has: {names}); pass one of those to --chain")

    @model_validator(mode="after")
    def _unique_names(self) -> "IndexerConfig":
        names = [c.name for c in self.contracts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"contract names must be unique; {', '.join(dupes)} appears more than once")
        return self

    # Paths are relative to the config file, so a config works from any working directory.
    def resolve(self, path: str) -> Path:
        try:
            p = Path(path).expanduser()
        except RuntimeError:  # "~user/..." of a user this machine does not know
            raise ConfigError(f"{path!r}: cannot expand '~' (no such user or no home directory); "
                              "write the path out in full") from None
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.storage.data_dir)

    @property
    def lake_root(self) -> "Path | UPath":
        """The lake's root: data_dir, a local lake_url, or a UPath on the object store of lake_url."""
        url = self.storage.lake_url
        if not url:
            return self.data_dir
        scheme = re.match(r"^([a-zA-Z][\w+.-]*)://", url)
        if scheme is None or scheme.group(1).lower() == "file":
            return self.resolve(url[len("file://"):] if scheme else url)
        import fsspec
        from upath import UPath

        protocol = scheme.group(1).lower()
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise ConfigError(f"{url}: the {protocol}:// filesystem needs a package that is not installed "
                              f"({e}); install it (for s3://: pip install s3fs)") from None
        except ValueError:
            raise ConfigError(f"{url}: unknown storage protocol {protocol!r}; use a local directory or an "
                              "fsspec URL such as s3://bucket/prefix") from None
        if not url[len(protocol) + 3:].strip("/"):
            raise ConfigError(f"{url}: name a bucket (and optionally a prefix), e.g. {protocol}://my-bucket/lake")
        # Listings are never cached: other processes add and remove files all the time.
        return UPath(url.rstrip("/"), **{"use_listings_cache": False, **self.storage.lake_options})

    @property
    def duckdb_path(self) -> Path:
        if self.storage.duckdb_path:
            return self.resolve(self.storage.duckdb_path)
        return self.data_dir / "indexer.duckdb"

    @property
    def state_url(self) -> str:
        url = self.storage.state_url
        if url and re.match(r"^postgres(ql)?(\+\w+)?://", url):
            return url
        return str(self.resolve(url) if url else self.data_dir / "state.sqlite")

    def contract_start(self, contract: ContractConfig) -> int:
        return contract.start_block if contract.start_block is not None else self.chain.start_block

    @property
    def start_block(self) -> int:
        """The lowest block any contract needs."""
        return min(self.contract_start(c) for c in self.contracts)

    def event_specs(self, contract: ContractConfig) -> list[EventSpec]:
        return self._specs[contract.name]

    def all_specs(self) -> list[tuple[ContractConfig, EventSpec]]:
        return [(c, s) for c in self.contracts for s in self._specs[c.name]]

    def factory_events(self, contract: ContractConfig) -> list[tuple[EventSpec, str]]:
        """The creation event(s) of a factory-created contract and the column naming the child."""
        return self._factories.get(contract.name, [])

    def _load_factories(self) -> None:
        by_name = {c.name: c for c in self.contracts}
        for i, c in enumerate(self.contracts):
            if c.factory is None:
                continue
            f, key = c.factory, f"contracts[{i}] ({c.name}).factory"
            parent = by_name.get(f.contract)
            if parent is None or parent.factory is not None or parent is c:
                names = ", ".join(x.name for x in self.contracts if x.factory is None) or "none"
                raise ConfigError(
                    f"{key}.contract: {f.contract!r} is not a configured contract with addresses (configured: "
                    f"{names}); add the factory under contracts with its addresses, and name it here"
                )
            try:
                specs = event_specs(parent.name, load_abi(self.resolve(parent.abi)), [f.event])
            except AbiError as e:
                raise ConfigError(f"{key}.event: {e}") from None
            found = []
            for spec in specs:
                match = [p for p in spec.inputs if p.name == f.parameter]
                if match and match[0].type != "address":
                    raise ConfigError(f"{key}.parameter: {f.parameter!r} of {spec.signature} is a {match[0].type}, "
                                      "not an address; name the argument that holds the created contract's address")
                if match:
                    found.append((spec, match[0].column))
            if not found:
                args = ", ".join(f"{p.name or '<unnamed>'} {p.type}" for s in specs for p in s.inputs)
                raise ConfigError(f"{key}.parameter: {f.event} has no argument {f.parameter!r} (its arguments: "
                                  f"{args}); name the address argument that holds the created contract")
            self._factories[c.name] = found

    def _load_abis(self) -> None:
        for i, c in enumerate(self.contracts):
            key = f"contracts[{i}] ({c.name})"
            try:
                abi = load_abi(self.resolve(c.abi))
            except (AbiError, ConfigError) as e:
                raise ConfigError(f"{key}.abi: {e}") from None
            try:
                self._specs[c.name] = event_specs(c.name, abi, c.events)
            except AbiError as e:
                # Name the key to fix: the selection when the whole ABI is fine, else the ABI.
                raise ConfigError(f"{key}.{'events' if c.events and _abi_sound(c.name, abi) else 'abi'}: {e}") from None
            if not self._specs[c.name]:
                raise ConfigError(f"{key}.events: the selection decodes no event; list at least one event of the ABI")
        tables = [s.table for _, s in self.all_specs()]
        clash = sorted({t for t in tables if tables.count(t) > 1})
        if clash:
            raise ConfigError(f"contracts: two contracts produce the same table {clash}; rename one contract")
        self._load_factories()


def _abi_sound(contract: str, abi: list[dict]) -> bool:
    try:
        event_specs(contract, abi, None)
    except AbiError:
        return False
    return True


def interpolate_env(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace ${VAR} (or ${VAR:-default}) with the environment's value; a missing variable is an error."""
    env = os.environ if environ is None else environ

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (the config refers to ${{{name}}}); export it first")

    return _ENV_REF.sub(sub, text)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key; check its spelling against the README's configuration table")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(lines)


def parse_config(text: str, base_dir: Path, source: str = "<config>", environ: dict[str, str] | None = None) -> IndexerConfig:
    """The config of a file; for a `chains:` file, its first chain (`.chains` / `.for_chain()` give the others)."""
    return parse_configs(text, base_dir, source, environ)[0]


def parse_configs(text: str, base_dir: Path, source: str = "<config>", environ: dict[str, str] | None = None) -> list[IndexerConfig]:
    """One config per chain: a file has either `chain:` + `contracts:` or a `chains:` list of both."""
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys chain, contracts, storage")
    # Interpolate after parsing so a secret's characters cannot change the YAML structure.
    try:
        raw = _interpolate_tree(raw, environ)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if "chains" not in raw:
        return [_validate(raw, base_dir, source, "")]
    return _parse_chains(raw, base_dir, source)


def _validate(raw: dict, base_dir: Path, source: str, where: str) -> IndexerConfig:
    try:
        cfg = IndexerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {where}{_format_validation_error(e)}") from None
    cfg._base_dir = base_dir
    try:
        cfg._load_abis()
        for key, attr in (("data_dir",) * 2, ("duckdb_path",) * 2, ("state_url",) * 2, ("lake_url", "lake_root")):
            try:  # paths resolve now, not mid-run
                getattr(cfg, attr)
            except ConfigError as e:
                raise ConfigError(f"storage.{key}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return cfg


def _parse_chains(raw: dict, base_dir: Path, source: str) -> list[IndexerConfig]:
    """`chains: [{name, chain_id, rpc_url, ..., contracts: [...]}, ...]` with the other sections shared."""
    chains = raw["chains"]
    if "chain" in raw or "contracts" in raw:
        raise ConfigError(f"{source}: use either chain + contracts (one chain) or chains (several), not both; "
                          "move each chain's contracts under its entry in chains")
    if not isinstance(chains, list) or not chains or not all(isinstance(c, dict) for c in chains):
        raise ConfigError(f"{source}: chains must be a non-empty list of mappings, each with the chain keys "
                          "(name, chain_id, rpc_url, ...) and its contracts")
    shared = {k: v for k, v in raw.items() if k != "chains"}
    configs = []
    for i, entry in enumerate(chains):
        label = f"chains[{i}]" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        if "contracts" not in entry:
            raise ConfigError(f"{source}: {label}.contracts: required key is missing; list the chain's contracts")
        chain = {k: v for k, v in entry.items() if k != "contracts"}
        configs.append(_validate({**shared, "chain": chain, "contracts": entry["contracts"]}, base_dir, source,
                                 f"{label}: "))
    for attr, what in (("name", "name"), ("chain_id", "chain_id")):
        values = [getattr(c.chain, attr) for c in configs]
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise ConfigError(f"{source}: chains: {what} {', '.join(dupes)} appears more than once; "
                              f"each chain needs its own {what}")
    tables: dict[str, tuple[str, object]] = {}
    for c in configs:
        for _, spec in c.all_specs():
            seen = tables.setdefault(spec.table, (c.chain.name, spec.schema()))
            if seen[1] != spec.schema():
                raise ConfigError(f"{source}: chains: table {spec.table} has different columns on {seen[0]} and "
                                  f"{c.chain.name} (one view serves all chains); rename one of the contracts")
    for c in configs:
        c._siblings = tuple(configs)
    return configs


def _interpolate_tree(node: Any, environ: dict[str, str] | None, where: str = "", parents: tuple = (),
                      done: dict[int, Any] | None = None) -> Any:
    if isinstance(node, str):
        try:
            return interpolate_env(node, environ)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    if isinstance(node, (list, dict)):
        if any(node is p for p in parents):  # YAML anchors can make a structure contain itself
            raise ConfigError(f"{where or 'config'}: a YAML alias refers to the structure that contains it "
                              "(a cycle); copy the values instead of using *alias there")
        done = {} if done is None else done
        if id(node) in done:  # a structure shared by aliases is walked once (no exponential blow-up)
            return done[id(node)]
        parents = (*parents, node)
        if isinstance(node, list):
            out: Any = [_interpolate_tree(v, environ, f"{where}[{i}]", parents, done) for i, v in enumerate(node)]
        else:
            out = {k: _interpolate_tree(v, environ, f"{where}.{k}" if where else str(k), parents, done)
                   for k, v in node.items()}
        done[id(node)] = out
        return out
    return node


def load_config(path: str | os.PathLike | None = None, chain: str | None = None) -> IndexerConfig:
    """Load the config from `path`, else from $INDEXER_CONFIG; `chain` (else $INDEXER_CHAIN) picks one chain."""
    cfg = _load_file(path)
    chain = chain or os.environ.get(CHAIN_ENV_VAR) or None
    return cfg.for_chain(chain) if chain else cfg


def _load_file(path: str | os.PathLike | None) -> IndexerConfig:
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR)
        if not path:
            raise ConfigError(f"no config given: pass --config PATH or set {CONFIG_ENV_VAR}=path/to/indexer.yaml")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass --config PATH or set {CONFIG_ENV_VAR}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}); save the YAML config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror}); check its permissions") from None
    return parse_config(text, p.resolve().parent, str(p))
