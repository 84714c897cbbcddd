"""Bad input, as a user meets it: one clear error naming the problem and the fix, a non-zero exit
without a traceback, and nothing written (data already there keeps its bytes, mtimes and views).

Part 1 fuzzes the two parsers that take outside input (the config loader, the log decoder) with
Hypothesis. Part 2 drives the real CLI against the real anvil devnet: a good backfill first, then
every bad command against the same data directory.
"""

import json
import os
import string
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import indexer_dagster
from indexer_dagster.cli import main as cli
from indexer_dagster.config import ConfigError, parse_config
from indexer_dagster.devnet import write_config
from indexer_dagster.parse.abi import event_specs, load_abi
from indexer_dagster.parse.decode import decode_logs
from indexer_dagster.query import QueryError
from indexer_dagster.query import query as run_query
from tests.parse.test_decode import _json_value

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "node_modules/@uniswap/v2-core/build"

# One profile for these fuzzers: no per-example deadline (CI machines are shared and slow), a fixed
# seed on CI (a red run is reproducible from its log), no example database written into a clone.
settings.register_profile(
    "bad_input_ci", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.register_profile(
    "bad_input_dev", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("bad_input_ci" if os.environ.get("CI") else "bad_input_dev")


# =============================================================================================
# Part 1a: the config loader accepts anything and raises nothing but ConfigError


PAIR = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
ENV = {"RPC_URL": "http://127.0.0.1:8545", "EMPTY": ""}


@pytest.fixture(scope="module")
def abi_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("abis")
    for name in ("UniswapV2Pair", "UniswapV2Factory", "ERC20"):  # bare ABI lists: quick to load 200 times
        (d / f"{name}.json").write_text(json.dumps(load_abi(BUILD / f"{name}.json")))
    (d / "not_json.json").write_text("{not json")
    (d / "no_events.json").write_text('[{"type": "function", "name": "f", "inputs": []}]')
    return d


def _good_doc() -> dict:
    return {
        "chain": {"name": "devnet", "chain_id": 31337, "rpc_url": "${RPC_URL}", "confirmations": 5,
                  "start_block": 0, "blocks_per_partition": 25},
        "contracts": [
            {"name": "UniswapV2Factory", "abi": "UniswapV2Factory.json", "addresses": [PAIR],
             "events": ["PairCreated"]},
            {"name": "UniswapV2Pair", "abi": "UniswapV2Pair.json", "addresses": ["0x" + "ab" * 20],
             "events": ["Swap", "Sync"]},
        ],
        "storage": {"data_dir": "./data"},
    }


def _load_or_config_error(text: str, base: Path) -> None:
    """parse_config must return a config or raise ConfigError with a message; nothing else."""
    try:
        parse_config(text, base, "fuzz.yaml", environ=ENV)
    except ConfigError as e:
        assert str(e).strip(), "a ConfigError without a message"
    # Any other exception propagates and fails the test (with Hypothesis' minimal example).


def test_the_fuzzers_base_config_is_valid(abi_dir):
    """The mutation fuzzer starts from a config that loads (so its mutations reach deep checks)."""
    cfg = parse_config(yaml.safe_dump(_good_doc()), abi_dir, "good.yaml", environ=ENV)
    assert [s.table for _, s in cfg.all_specs()] == [
        "uniswap_v2_factory_pair_created", "uniswap_v2_pair_swap", "uniswap_v2_pair_sync"]


KEYS = [
    "chain", "chains", "contracts", "storage", "alerts", "name", "chain_id", "rpc_url", "confirmations",
    "rpc_urls", "verify_logs", "requests_per_second", "start_block", "blocks_per_partition",
    "blocks_per_request", "max_blocks_per_request", "concurrency",
    "headers_batch_size", "request_timeout_s", "max_retries", "reorg_window", "abi", "addresses", "events",
    "factory", "contract", "event", "parameter", "data_dir", "duckdb_path", "state_url", "webhook_url",
    "max_lag_blocks", "confirmation", "adresses", "", "0", "abi ",
]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([
        "devnet", "Dev Net", "${RPC_URL}", "${MISSING_VAR}", "${RPC_URL:-http://x}", "${EMPTY}", "${",
        "http://127.0.0.1:8545", "https://u:p@h:99999/k", "http://[zz", "ws://x", "ftp://x", "http://",
        PAIR, PAIR.lower(), PAIR.replace("F", "f", 1), "0x" + "zz" * 20, "0x12",
        "UniswapV2Pair.json", "UniswapV2Factory.json", "ERC20.json", "not_json.json", "no_events.json",
        "missing.json", ".", "/", "~", "~nosuchuser_xyz/abi.json", "~/x.json", "a\x00b", "abis/../ERC20.json",
        "Swap", "Sync", "Transfer", "PairCreated", "Transfer(address,address,uint256)", "Swap(", "pair",
        "UniswapV2Pair", "UniswapV2Factory", "ERC20", "postgresql://u@h/db", "2024-01-01", "1e3", "0x10",
    ]),
    st.text(max_size=12),
)


def _tree(leaves):
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.dictionaries(st.sampled_from(KEYS), kids, max_size=5),
        ),
        max_leaves=25,
    )


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS), _tree(SCALARS), max_size=5))
def test_fuzz_config_random_structures(abi_dir, doc):
    _load_or_config_error(yaml.safe_dump(doc, allow_unicode=True), abi_dir)


def _paths(node, prefix=()):
    """Every (path, value) of a nested dict/list document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def _mutated_docs(draw):
    """The good config with 1-3 edits: a value replaced, a key removed, or a key added."""
    doc = _good_doc()
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(_tree(SCALARS))
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(_tree(SCALARS))
        else:
            parent.append(draw(_tree(SCALARS)))
    return doc


@FUZZ
@given(doc=_mutated_docs())
@example(doc={**_good_doc(), "storage": {"data_dir": "~nosuchuser_xyz/data"}})  # found by this fuzzer
@example(doc={**_good_doc(), "contracts": [{"name": "A", "abi": "~nosuchuser_xyz/a.json", "addresses": [PAIR]}]})
def test_fuzz_config_mutations_of_a_good_config(abi_dir, doc):
    _load_or_config_error(yaml.safe_dump(doc, allow_unicode=True), abi_dir)


_YAML_BITS = [
    "chain:", "contracts:", "storage:", "chains:", "  ", "    ", "\n", "- ", ": ", "{", "}", "[", "]", ",",
    "&a ", "*a", "<<: *a", "!!binary ", "!!python/object:os.system ", "!!set ", "!!str ", "? ", "|", ">",
    "'", '"', "#", "---", "...", "%YAML 1.1", "\t", "name: x", "abi: ERC20.json", "rpc_url: ${RPC_URL}",
    "chain_id: 1", "addresses: [" + PAIR + "]", "\x00", "\ufeff", "\udcff"[:0] + "é", "0x", "~",
]


@FUZZ
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(_YAML_BITS), st.text(max_size=6)), max_size=40).map("".join),
))
def test_fuzz_config_yaml_ish_text(abi_dir, text):
    _load_or_config_error(text, abi_dir)


JSON_TREE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.text(max_size=8),
              st.sampled_from(["event", "function", "uint256", "tuple", "tuple[]", "string", "address[2]",
                               "uint", "int7", "bytes33", "fixed", "Transfer", "Swap"])),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.sampled_from(["type", "name", "inputs", "indexed", "anonymous", "components",
                                         "abi", "outputs"]), kids, max_size=5),
    ),
    max_leaves=30,
)


@FUZZ
@example(abi=[{"type": "event", "name": "E", "inputs": [{"type": "tuple", "components": [1]}]}], events=None)
@given(abi=JSON_TREE, events=st.one_of(st.none(), st.lists(st.sampled_from(["Transfer", "Swap", "x", "T(uint)"]),
                                                           min_size=1, max_size=2)))
def test_fuzz_config_abi_file_contents(tmp_path_factory, abi, events):
    """Whatever JSON the ABI file holds, loading the config ends in a config or a ConfigError."""
    d = tmp_path_factory.mktemp("fuzzabi", numbered=True)
    (d / "fuzz.json").write_text(json.dumps(abi))
    doc = _good_doc()
    contract = {"name": "Fuzz", "abi": "fuzz.json", "addresses": [PAIR]}
    doc["contracts"] = [{**contract, "events": events} if events else contract]
    _load_or_config_error(yaml.safe_dump(doc), d)


@pytest.mark.parametrize("text, expected", [
    ("a: &x [*x]", "cycle"),                                  # a recursive alias
    ("chain: &c {name: devnet, chain_id: 1, rpc_url: x, self: *c}", "cycle"),
])
def test_recursive_yaml_aliases_are_a_config_error(abi_dir, text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, abi_dir, "fuzz.yaml", environ=ENV)


def test_alias_bomb_is_rejected_quickly(abi_dir):
    """Nine levels of nine aliases (9**9 strings if expanded) are walked once, not expanded."""
    lines = ["a0: &a0 ['${RPC_URL}', x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="a9: unknown key"):
        parse_config("\n".join(lines) + "\nchain: *a9\n", abi_dir, "fuzz.yaml", environ=ENV)
    assert time.perf_counter() - started < 5


# =============================================================================================
# Part 1b: the log decoder never crashes; malformed logs are skipped and counted; good ones round-trip

LOG_SCHEMA = {
    "chain_id": pl.Int64, "block_number": pl.Int64, "block_hash": pl.Utf8,
    "block_timestamp": pl.Datetime("us", "UTC"), "transaction_hash": pl.Utf8,
    "transaction_index": pl.Int64, "log_index": pl.Int64, "address": pl.Utf8,
    "topic0": pl.Utf8, "topic1": pl.Utf8, "topic2": pl.Utf8, "topic3": pl.Utf8, "data": pl.Utf8,
}
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _ev(name, inputs, anonymous=False):
    def one(i, x):
        if isinstance(x, dict):
            return x
        typ, indexed = x
        return {"type": typ, "name": f"a{i}", "indexed": indexed}
    return {"type": "event", "name": name, "anonymous": anonymous, "inputs": [one(i, x) for i, x in enumerate(inputs)]}


def _tuple(name, comps, array="", indexed=False):
    return {"type": "tuple" + array, "name": name, "indexed": indexed,
            "components": [c if isinstance(c, dict) else {"type": c, "name": f"c{i}"} for i, c in enumerate(comps)]}


# Synthetic events with dynamic arguments (strings, bytes, arrays, tuples, indexed dynamic types).
SYNTH_ABI = [
    _ev("Note", [("address", True), ("string", False), ("bytes", False)]),
    _ev("Batch", [("uint256[]", False), ("address[2]", False), ("bool", True)]),
    _ev("Nested", [_tuple("pos", ["uint128", "string", _tuple("inner", ["address", "bytes"])]), ("int24", False)]),
    _ev("Orders", [_tuple("orders", ["address", "uint256"], array="[]"), ("bytes32[]", False), ("string[]", False)]),
    _ev("Tagged", [("string", True), ("bytes", True), _tuple("key", ["uint8", "address"], indexed=True),
                   ("int256", False)]),
    _ev("Grid", [("uint8[2][]", False), ("int64[][2]", False)]),
    _ev("Anon", [("address", True), ("bytes", False)], anonymous=True),
]


@pytest.fixture(scope="module")
def uniswap_specs():
    specs = event_specs("UniswapV2Pair", load_abi(BUILD / "UniswapV2Pair.json"), None)
    specs += event_specs("UniswapV2Factory", load_abi(BUILD / "UniswapV2Factory.json"), ["PairCreated"])
    return specs


@pytest.fixture(scope="module")
def synth_specs():
    return event_specs("Synth", SYNTH_ABI, None)


def _frame(rows: list[dict]) -> pl.DataFrame:
    out = []
    for i, r in enumerate(rows):
        topics = list(r["topics"]) + [None] * (4 - len(r["topics"]))
        out.append({
            "chain_id": 1, "block_number": 100 + i, "block_hash": "0x" + f"{100 + i:064x}",
            "block_timestamp": T0 + timedelta(seconds=12 * i), "transaction_hash": "0x" + f"{i + 7:064x}",
            "transaction_index": 0, "log_index": i, "address": r.get("address", "0x" + "a1" * 20),
            "topic0": topics[0], "topic1": topics[1], "topic2": topics[2], "topic3": topics[3], "data": r["data"],
        })
    return pl.DataFrame(out, schema=LOG_SCHEMA, orient="row") if out else pl.DataFrame(schema=LOG_SCHEMA)


def _hexs(min_bytes=0, max_bytes=200):
    return st.binary(min_size=min_bytes, max_size=max_bytes).map(lambda b: "0x" + b.hex())


# A 32-byte word that is sometimes canonical for small types (zero padding), sometimes not.
WORD = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: b.hex()),
    st.integers(0, 2**160 - 1).map(lambda n: f"{n:064x}"),
    st.integers(0, 255).map(lambda n: f"{n:064x}"),
    st.sampled_from(["0" * 64, "f" * 64, "0" * 63 + "1", "0" * 62 + "20"]),
)
TOPIC = st.one_of(
    WORD.map(lambda w: "0x" + w),
    st.sampled_from(["0x", "", "0x123", "0x" + "g" * 64, "0X" + "a" * 64, "a" * 66, "0x" + "A" * 64]),
    st.text(max_size=70),
)
DATA = st.one_of(
    _hexs(),
    st.lists(WORD, max_size=12).map(lambda ws: "0x" + "".join(ws)),          # whole words: reaches deep checks
    st.lists(WORD, max_size=8).map(lambda ws: "0x" + "".join(ws) + "0"),     # odd length
    st.text(alphabet=string.hexdigits + "xXg -", max_size=140),              # not hex / no 0x / mixed case
    st.sampled_from(["", "0x", "0x0", "0x" + "0" * 63, "0xzz" + "0" * 62, "0x" + "0" * 64 + "é"]),
)


@st.composite
def _log_rows(draw, specs):
    topic0s = [s.topic0 for s in specs if s.topic0] + [s.selector_hash for s in specs]
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        n = draw(st.integers(0, 4))
        first = draw(st.one_of(st.sampled_from(topic0s), TOPIC)) if n else None
        topics = ([first] if n else []) + [draw(TOPIC) for _ in range(n - 1)]
        rows.append({"topics": topics, "data": draw(st.one_of(DATA, st.just(None))) if draw(st.integers(0, 30)) == 0
                     else draw(DATA)})
    return rows


def _check_never_crashes(specs, rows):
    logs = _frame(rows)
    out = decode_logs(logs, specs)
    assert set(out) == {s.table for s in specs}
    known = {s.topic0 for s in specs if not s.anonymous}
    for s in specs:
        res = out[s.table]
        assert res.frame.schema == pl.Schema(s.schema())
        assert res.skipped >= 0
        if not s.anonymous:
            # Every log carrying the event's topic0 is either decoded or counted as skipped.
            matched = sum(1 for r in rows if r["topics"] and r["topics"][0] == s.topic0)
            assert res.frame.height + res.skipped == matched
        else:
            candidates = sum(1 for r in rows if not r["topics"] or r["topics"][0] not in known)
            assert res.frame.height + res.skipped <= candidates


@FUZZ
@given(data=st.data())
def test_fuzz_decoder_uniswap_events_never_crash(uniswap_specs, data):
    _check_never_crashes(uniswap_specs, data.draw(_log_rows(uniswap_specs)))


@FUZZ
@given(data=st.data())
def test_fuzz_decoder_dynamic_events_never_crash(synth_specs, data):
    _check_never_crashes(synth_specs, data.draw(_log_rows(synth_specs)))


# -- well-formed logs: eth_abi.encode -> decode_logs gives back exactly the encoded values


def _value_strategy(t):
    """A Hypothesis strategy of Python values of the eth_abi type `t` (a parsed type)."""
    from eth_abi.grammar import TupleType

    if t.arrlist:
        dim = t.arrlist[-1]
        item = _value_strategy(t.item_type)
        size = dim[0] if dim else None
        return st.lists(item, min_size=size or 0, max_size=size or 3)
    if isinstance(t, TupleType):
        return st.tuples(*[_value_strategy(c) for c in t.components])
    base, sub = t.base, t.sub
    if base == "address":
        return st.binary(min_size=20, max_size=20).map(lambda b: to_checksum_address(b))
    if base == "bool":
        return st.booleans()
    if base == "uint":
        return st.one_of(st.integers(0, 2**sub - 1), st.sampled_from([0, 2**sub - 1]))
    if base == "int":
        lo, hi = -(2 ** (sub - 1)), 2 ** (sub - 1) - 1
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, -1, 0, hi]))
    if base == "bytes":
        return st.binary(min_size=sub, max_size=sub) if sub else st.binary(max_size=70)
    if base == "string":
        return st.text(max_size=40)
    raise AssertionError(f"no strategy for {t}")


def _expected(t, v):
    """The decoder's promised output for value `v` of parsed type `t` (README: value mapping): the JSON
    form of `test_decode._json_value`, except that top-level integers of at most 64 bits stay integers."""
    from eth_abi.grammar import TupleType

    if not (t.arrlist or isinstance(t, TupleType)) and t.base in ("uint", "int") and t.sub <= 64:
        return v
    return _json_value(t.to_type_str(), v)


@st.composite
def _encoded_logs(draw, specs):
    from eth_abi.grammar import parse

    spec = draw(st.sampled_from(specs))
    rows, expected = [], []
    for _ in range(draw(st.integers(1, 4))):
        address = "0x" + draw(st.binary(min_size=20, max_size=20)).hex()
        topics = [] if spec.anonymous else [spec.topic0]
        data_types, data_values, want = [], [], {}
        for p in spec.inputs:
            t = parse(p.type)
            v = draw(_value_strategy(t))
            if p.indexed:
                if p.type == "string":
                    topic = "0x" + keccak(v.encode()).hex()
                elif p.type == "bytes":
                    topic = "0x" + keccak(v).hex()
                elif p.is_value_type:
                    topic = "0x" + abi_encode([p.type], [v]).hex()
                else:
                    topic = "0x" + keccak(abi_encode([p.type], [v])).hex()
                topics.append(topic)
                want[p.column] = _expected(t, v) if p.is_value_type else topic
            else:
                data_types.append(p.type)
                data_values.append(v)
                want[p.column] = _expected(t, v)
            if p.is_big_int:
                want[p.f64_column] = float(v)
        rows.append({"topics": topics, "address": address, "data": "0x" + abi_encode(data_types, data_values).hex()})
        expected.append({"address": address, **want})
    return spec, rows, expected


def _round_trip(specs, case):
    spec, rows, expected = case
    res = decode_logs(_frame(rows), [spec])[spec.table]
    assert res.skipped == 0
    got = res.frame.drop(["chain_id", "block_number", "block_hash", "block_timestamp", "transaction_hash",
                          "transaction_index", "log_index"]).to_dicts()
    for g in got:
        for p in spec.inputs:
            if not p.indexed and not p.is_value_type and p.type not in ("string", "bytes"):
                g[p.column] = json.loads(g[p.column])
    assert got == expected


@FUZZ
@given(data=st.data())
def test_property_uniswap_events_round_trip(uniswap_specs, data):
    _round_trip(uniswap_specs, data.draw(_encoded_logs(uniswap_specs)))


@FUZZ
@given(data=st.data())
def test_property_dynamic_events_round_trip(synth_specs, data):
    _round_trip(synth_specs, data.draw(_encoded_logs(synth_specs)))


@st.composite
def _damaged(draw, specs):
    """Well-formed logs, then damaged: data cut short or extended, a character replaced by a non-hex
    or upper-case one, a topic dropped or added, a word's padding made non-canonical."""
    spec, rows, _ = draw(_encoded_logs(specs))
    for r in rows:
        how = draw(st.sampled_from(["cut", "extend", "char", "drop_topic", "add_topic", "pad", "none"]))
        d = r["data"]
        if how == "cut":
            r["data"] = d[: draw(st.integers(0, len(d)))]
        elif how == "extend":
            r["data"] = d + draw(st.sampled_from(["0", "00", "0" * 64, "f" * 64, "zz"]))
        elif how == "char" and len(d) > 2:
            i = draw(st.integers(2, len(d) - 1))
            r["data"] = d[:i] + draw(st.sampled_from(list("gzA F-"))) + d[i + 1:]
        elif how == "drop_topic" and r["topics"]:
            r["topics"] = r["topics"][:-1] if len(r["topics"]) > 1 or spec.anonymous else r["topics"]
        elif how == "add_topic" and len(r["topics"]) < 4:
            r["topics"] = [*r["topics"], "0x" + "11" * 32]
        elif how == "pad" and len(d) >= 66:
            w = draw(st.integers(0, (len(d) - 2) // 64 - 1))
            r["data"] = d[: 2 + 64 * w] + "f" + d[3 + 64 * w:]
    return specs, rows


@FUZZ
@given(data=st.data())
def test_fuzz_decoder_damaged_well_formed_logs(uniswap_specs, synth_specs, data):
    specs, rows = data.draw(st.one_of(_damaged(uniswap_specs), _damaged(synth_specs)))
    _check_never_crashes(specs, rows)


# =============================================================================================
# Part 2: the real CLI against the real anvil devnet. A good backfill first; then every bad command
# against the same data directory must fail with one clear message and leave every byte in place.

INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]
FAKE_KEY = "FAKEKEY0123456789abcdef"  # must never be printed


class Indexed:
    """A data directory filled by a good `indexer backfill`, and the means to run bad commands at it."""

    def __init__(self, root: Path, node, deployment):
        self.root, self.node = root, node
        self.config = write_config(root / "good" / "indexer.yaml", node.url, 31337, deployment, "data",
                                   blocks_per_partition=25, confirmations=5)
        self.data = self.config.parent / "data"
        self.catalog = self.data / "indexer.duckdb"
        self.home = root / "good" / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_bytes((REPO / "deploy" / "dagster.yaml").read_bytes())
        self.doc = yaml.safe_load(self.config.read_text())
        # Bad configs live outside the snapshot, with absolute paths to the same data and ABIs.
        self.doc["storage"] = {"data_dir": str(self.data), "duckdb_path": str(self.catalog)}
        for c in self.doc["contracts"]:
            c["abi"] = str(self.config.parent / c["abi"])
        self.bad_dir = root / "bad"
        self.bad_dir.mkdir()
        self._n = 0

    def env(self, config: Path) -> dict:
        return {"INDEXER_CONFIG": str(config), "DAGSTER_HOME": str(self.home), "INDEXER_CHAIN": None}

    def bad_config(self, edit=None, text: str | bytes | None = None) -> Path:
        """A config file with `edit(doc)` applied to the good document (or the raw `text`)."""
        self._n += 1
        path = self.bad_dir / f"bad{self._n}.yaml"
        if text is None:
            doc = json.loads(json.dumps(self.doc))
            if edit:
                edit(doc)
            text = yaml.safe_dump(doc, sort_keys=False)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def snapshot(self) -> dict:
        """Every file under the good folder (data, catalog, state, Dagster instance): bytes and mtime."""
        files = {}
        for p in sorted(self.config.parent.rglob("*")):
            if p.is_file():
                st_ = p.stat()
                files[str(p.relative_to(self.config.parent))] = (st_.st_size, st_.st_mtime_ns, p.read_bytes())
        return files

    def views(self) -> dict:
        names = run_query(self.catalog, "select if(schema_name = 'main', '', schema_name || '.') || view_name v "
                                        "from duckdb_views() where not internal order by 1")["v"]
        out = {n: run_query(self.catalog, f"select count(*) n from {n}")["n"][0] for n in names}
        out["logs rows"] = run_query(self.catalog, "select * from logs order by block_number, log_index")
        return out

    def assert_untouched(self, before: tuple) -> None:
        files, views = before
        after = self.snapshot()
        assert sorted(after) == sorted(files), "files were added or removed"
        changed = [k for k in files if files[k] != after[k]]
        assert not changed, f"files changed: {changed}"
        now = self.views()
        assert now.keys() == views.keys()
        for k in views:
            assert now[k].equals(views[k]) if isinstance(now[k], pl.DataFrame) else now[k] == views[k], k


@pytest.fixture(scope="module")
def indexed(devnet, tmp_path_factory):
    node, deployment = devnet
    ix = Indexed(tmp_path_factory.mktemp("bad_input"), node, deployment)
    env = {**os.environ, "INDEXER_CONFIG": str(ix.config), "DAGSTER_HOME": str(ix.home)}
    env.pop("INDEXER_CHAIN", None)
    proc = subprocess.run([*INDEXER, "backfill"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ix.head = node.block_number()
    ix.baseline = (ix.snapshot(), ix.views())
    assert ix.baseline[1]["logs"] > 100 and ix.baseline[1]["uniswap_v2_pair_swap"] > 10
    return ix


def run_cli(ix: Indexed, config: Path, *args) -> tuple[int, str]:
    """Run `indexer ARGS` in this process; any exception other than click's exit fails the test."""
    result = CliRunner().invoke(cli, list(args), env=ix.env(config), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would have seen
    return result.exit_code, result.output


def assert_one_error(code: int, out: str, *expected: str) -> str:
    assert code != 0, out
    assert "Traceback" not in out, out
    assert sum(line.startswith("Error: ") for line in out.splitlines()) == 1, f"not one error:\n{out}"
    for e in expected:
        assert e in out, f"{e!r} not in:\n{out}"
    assert FAKE_KEY not in out
    return out


def _set(path: str, value):
    """An edit setting the dotted `path` (e.g. 'chain.confirmation', 'contracts.1.events')."""
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _del(path: str):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[last]
    return edit


def _config_cases(ix: Indexed):
    """(case id, bad config path, substrings the one error message must contain)."""
    pair = ix.doc["contracts"][1]
    addr = pair["addresses"][0]
    mixed = addr[:2] + (addr[2:].swapcase() if addr[2:].swapcase() != addr[2:] else addr[2:])
    not_json = ix.bad_dir / "not_json.json"
    not_json.write_text("{this is not json")
    good_text = yaml.safe_dump(ix.doc, sort_keys=False)
    return [
        ("no such config file", ix.bad_dir / "missing.yaml", ["missing.yaml does not exist", "pass --config PATH"]),
        ("config not UTF-8", ix.bad_config(text=good_text.encode("utf-16")),
         ["not a UTF-8 text file", "save the YAML config as UTF-8"]),
        ("malformed yaml", ix.bad_config(text=good_text.replace("chain:", "chain: [oops", 1)),
         ["not valid YAML at line", "expected ','"]),
        ("yaml alias cycle", ix.bad_config(text="chain: &c {name: devnet, self: *c}\n"),
         ["chain.self: a YAML alias refers to the structure that contains it", "copy the values"]),
        ("unknown top-level key", ix.bad_config(lambda d: d.update(storages=d.pop("storage"))),
         ["storages: unknown key", "check its spelling"]),
        ("unknown nested key", ix.bad_config(_set("chain.confirmation", 5)),
         ["chain.confirmation: unknown key", "check its spelling"]),
        ("unknown key in a list item", ix.bad_config(_set("contracts.1.abbi", "x.json")),
         ["contracts[1].abbi: unknown key"]),
        ("missing env var", ix.bad_config(_set("chain.rpc_url", "${INDEXER_TEST_UNSET_RPC}")),
         ["chain.rpc_url: environment variable INDEXER_TEST_UNSET_RPC is not set", "export it first"]),
        ("invalid address", ix.bad_config(_set("contracts.1.addresses.0", addr[:-2])),
         ["contracts[1].addresses", "is not an address", "expected 0x followed by 40 hex characters"]),
        ("bad checksum", ix.bad_config(_set("contracts.1.addresses.0", mixed)),
         ["contracts[1].addresses", "wrong EIP-55 checksum", f"checksummed form of these bytes is {addr}",
          "or write it all lower-case"]),
        ("abi not json", ix.bad_config(_set("contracts.1.abi", str(not_json))),
         ["contracts[1] (UniswapV2Pair).abi", "not valid JSON", 'give a bare ABI list or an artifact']),
        ("abi lacks the event", ix.bad_config(_set("contracts.1.events", ["Swap", "Swapp"])),
         ["contracts[1] (UniswapV2Pair).events", "no event 'Swapp'", "it has: ", "Swap(address,uint256"]),
        ("duplicate contract names", ix.bad_config(_set("contracts.2.name", "UniswapV2Pair")),
         ["contract names must be unique", "UniswapV2Pair appears more than once"]),
        ("rpc url not http", ix.bad_config(_set("chain.rpc_url", f"wss://127.0.0.1:8546/{FAKE_KEY}")),
         ["chain.rpc_url", "must start with http:// or https://"]),
        ("rpc url without scheme", ix.bad_config(_set("chain.rpc_url", f"127.0.0.1:8545/{FAKE_KEY}")),
         ["chain.rpc_url", "must start with http:// or https://"]),
        ("negative start block", ix.bad_config(_set("chain.start_block", -1)),
         ["chain.start_block", "greater than or equal to 0"]),
    ]


@pytest.mark.slow
def test_config_mistakes_one_error_and_nothing_written(indexed):
    """Every command that reads the config stops at a config mistake: one message naming the key and
    the fix, exit 1, and the data directory (files, mtimes, views) exactly as the good backfill left it."""
    ix = indexed
    report = []
    for case, path, expected in _config_cases(ix):
        for command in (["check"], ["backfill"], ["catalog"], ["query", "select count(*) from logs"]):
            code, out = run_cli(ix, path, *command)
            assert_one_error(code, out, *expected)
            assert code == 1, (case, command, out)
        report.append(f"{case}: {out.strip()}")
    ix.assert_untouched(ix.baseline)
    print("\n".join(report))


@pytest.mark.slow
def test_node_mistakes_one_error_and_nothing_written(indexed):
    """Mistakes only the node can reveal: another chain, an unreachable URL (its key never printed),
    a start block above the head."""
    ix = indexed
    closed = _closed_port()
    both = (["check"], ["backfill"])
    cases = [
        ("another chain id", both, ix.bad_config(_set("chain.chain_id", 1)),
         ["chain.chain_id: the config says 1 but the node at", "is chain 31337",
          "at the right network or correct chain_id"]),
        ("unreachable rpc, key in path and query", both, ix.bad_config(
            _set("chain.rpc_url", f"http://127.0.0.1:{closed}/v3/{FAKE_KEY}?apikey={FAKE_KEY}")),
         [f"chain.rpc_url: the node at http://127.0.0.1:{closed}/… did not answer", "check the URL"]),
        ("unreachable rpc, key as user info", (["check"],), ix.bad_config(
            _set("chain.rpc_url", f"https://user:{FAKE_KEY}@127.0.0.1:{closed}/{FAKE_KEY}")),
         [f"chain.rpc_url: the node at https://127.0.0.1:{closed}/… did not answer"]),
        ("start block above the head", both, ix.bad_config(_set("chain.start_block", ix.head + 100)),
         [f"chain.start_block: start block {ix.head + 100} is above the chain head", "lower it"]),
    ]
    report = []
    for case, commands, path, expected in cases:
        for command in commands:
            code, out = run_cli(ix, path, *command)
            assert_one_error(code, out, *expected)
        report.append(f"{case}: {out.strip()}")
    ix.assert_untouched(ix.baseline)
    print("\n".join(report))


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return port


@pytest.mark.slow
def test_bad_block_ranges_one_error_and_nothing_written(indexed):
    ix = indexed
    head = ix.head
    cases = [
        (["--from", "40", "--to", "30"], 1, ["--from 40 is above --to 30", "swap them"]),
        (["--from", "-3"], 2, ["Invalid value for '--from'", "-3 is not in the range x>=0"]),
        (["--to", "-1"], 2, ["Invalid value for '--to'", "-1 is not in the range x>=0"]),
        (["--to", str(head + 1000)], 1, [f"--to {head + 1000} is beyond the chain head {head}",
                                          "lower it or omit --to"]),
        (["--from", str(head + 5)], 1, [f"--from {head + 5} is beyond the chain head {head}", "lower it"]),
        (["--workers", "0"], 2, ["Invalid value for '--workers'"]),
    ]
    report = []
    for args, exit_code, expected in cases:
        code, out = run_cli(ix, ix.config, "backfill", *args)
        assert_one_error(code, out, *expected)
        assert code == exit_code, out
        report.append(f"backfill {' '.join(args)}: {out.strip().splitlines()[-1]}")
    ix.assert_untouched(ix.baseline)
    print("\n".join(report))


WRITING_SQL = [
    ("insert into logs select * from logs", "INSERT"),
    ("create table t as select 1", "CREATE"),
    ("create temp table t as select 1", "CREATE"),
    ("drop view logs", "DROP"),
    ("update blocks set number = 1", "UPDATE"),
    ("delete from blocks", "DELETE"),
    ("copy (select * from logs) to '{out}/copied.csv'", "COPY"),
    ("export database '{out}/exported'", "EXPORT"),
    ("attach '{out}/attached.duckdb' as other", "ATTACH"),
    ("install httpfs", "LOAD"),
    ("load httpfs", "LOAD"),
    ("pragma enable_profiling", "PRAGMA"),
    ("set threads = 1", "SET"),
    ("checkpoint", "CALL"),
    ("vacuum", "VACUUM"),
    ("call pragma_version()", "CALL"),
    ("explain analyze copy (select 1) to '{out}/explained.csv'", "EXPLAIN"),
    ("create or replace macro m(a) as a", "CREATE"),
]


@pytest.mark.slow
def test_query_refuses_sql_that_writes(indexed):
    ix = indexed
    out_dir = ix.bad_dir / "sql_out"
    out_dir.mkdir()
    report = []
    for sql, kind in WRITING_SQL:
        sql = sql.format(out=out_dir)
        code, out = run_cli(ix, ix.config, "query", sql)
        assert_one_error(code, out, "the catalog is read-only: `indexer query` runs SELECT, WITH, FROM",
                         f"statements only, not {kind}")
        report.append(f"{sql}: {out.strip()}")
    code, out = run_cli(ix, ix.config, "query", "select 1; copy (select 1) to 'x.csv'")
    report.append(assert_one_error(code, out, "`indexer query` runs exactly one statement; got 2").strip())
    code, out = run_cli(ix, ix.config, "query", "  ")
    report.append(assert_one_error(code, out, "`indexer query` runs exactly one statement; got 0").strip())
    assert list(out_dir.iterdir()) == []  # no file was written by COPY / EXPORT / ATTACH
    missing_dir = ix.bad_dir / "no" / "such" / "folder"
    code, out = run_cli(ix, ix.config, "query", "-o", str(missing_dir / "x.csv"), "--format", "csv", "select 1")
    report.append(assert_one_error(code, out, f"the folder {missing_dir} does not exist", "create it").strip())
    code, out = run_cli(ix, ix.config, "query", "--format", "parquet", "select 1")
    report.append(assert_one_error(code, out, "--format parquet needs --output FILE").strip())
    garbage = ix.bad_dir / "garbage.duckdb"
    garbage.write_text("not a DuckDB file " * 100)
    code, out = run_cli(ix, ix.bad_config(_set("storage.duckdb_path", str(garbage))), "query", "select 1")
    report.append(assert_one_error(code, out, f"cannot open the catalog {garbage}", "not a valid DuckDB database",
                                   "rebuild it with `indexer catalog`").strip())
    # Reading still works, with every read-only form the help names.
    for sql in ("select count(*) from logs", "with x as (select 1) select * from x", "from blocks limit 1",
                "describe logs", "show tables", "explain select 1", "values (1)", "summarize select 1 a"):
        code, out = run_cli(ix, ix.config, "query", sql)
        assert code == 0, (sql, out)
    ix.assert_untouched(ix.baseline)
    print("\n".join(report))


class _Holder:
    """Another program (a separate process) holding a read-write DuckDB connection on a file."""

    def __init__(self, path: Path):
        code = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('open', flush=True); "
                "sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "open"

    def close(self) -> None:
        self.proc.stdin.close()  # the holder exits: its connection and lock go away
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_locked_catalog_is_named_and_nothing_written(indexed):
    """A DuckDB shell/notebook holding the catalog open read-write: `indexer query`, `indexer catalog`
    and `indexer backfill` say so (the lock, its PID, what to do) and write nothing. The backfill checks
    before it fetches, so it writes no Parquet either; after the holder closes, everything works."""
    ix = indexed
    holder = _Holder(ix.catalog)
    pid = holder.proc.pid
    expected = [f"the DuckDB catalog {ix.catalog} is locked", f"PID {pid}", "has it open for writing",
                "Close that connection", "read-only", "run the command again"]
    report = []
    try:
        for command in (["query", "select count(*) from logs"], ["catalog"]):
            code, out = run_cli(ix, ix.config, *command)
            report.append(f"{command[0]}: " + assert_one_error(code, out, *expected).strip())
        with pytest.raises(QueryError) as e:  # the Python API says the same
            with indexer_dagster.connect(ix.catalog) as api:
                api.sql("select count(*) from logs")
        assert all(x in str(e.value) for x in expected), str(e.value)
        report.append(f"indexer_dagster.connect(): {e.value}")
        # The backfill in a real process (so the no-traceback check is the real one). Were it not
        # stopped, it would rewrite the range files (new mtimes) and record a run in the Dagster instance.
        env = {**os.environ, "INDEXER_CONFIG": str(ix.config), "DAGSTER_HOME": str(ix.home)}
        env.pop("INDEXER_CHAIN", None)
        proc = subprocess.run([*INDEXER, "backfill"], env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1
        report.append("backfill: " + assert_one_error(proc.returncode, out, *expected, "nothing was written").strip())
    finally:
        holder.close()
    ix.assert_untouched(ix.baseline)
    code, out = run_cli(ix, ix.config, "query", "select count(*) n from logs")
    assert code == 0 and str(ix.baseline[1]["logs"]) in out
    print("\n".join(report))


@pytest.mark.slow
def test_cli_errors_in_a_real_process_have_no_traceback(indexed):
    """The same messages from the installed entry point: stderr holds `Error: ...` and no traceback."""
    ix = indexed
    bad = ix.bad_config(text="chain: [oops\n")
    env = {**os.environ, "DAGSTER_HOME": str(ix.home)}
    env.pop("INDEXER_CHAIN", None)
    for args, expected in [
        (["check", "--config", str(bad)], "not valid YAML at line 2"),
        (["query", "--config", str(ix.config), "copy (select 1) to 'x.csv'"], "not COPY"),
    ]:
        proc = subprocess.run([*INDEXER, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("Error: ") and expected in proc.stderr
        assert proc.stdout == ""
    ix.assert_untouched(ix.baseline)
