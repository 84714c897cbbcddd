"""decode_logs against logs ENCODED with eth_abi; expectations come from eth_abi.decode of the same bytes."""

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # allow plain `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import pytest  # noqa: E402
from eth_abi import decode as abi_decode  # noqa: E402
from eth_abi import encode as abi_encode  # noqa: E402
from eth_utils import keccak  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from indexer_dagster.parse.abi import EventSpec, event_specs, load_abi  # noqa: E402
from indexer_dagster.parse.decode import DecodeResult, decode_logs  # noqa: E402

BUILD = ROOT / "node_modules/@uniswap/v2-core/build"
KEYS = ["chain_id", "block_number", "block_hash", "block_timestamp", "transaction_hash", "transaction_index", "log_index", "address"]
LOGS_SCHEMA = {
    "chain_id": pl.Int64, "block_number": pl.Int64, "block_hash": pl.Utf8,
    "block_timestamp": pl.Datetime("us", "UTC"), "transaction_hash": pl.Utf8,
    "transaction_index": pl.Int64, "log_index": pl.Int64, "address": pl.Utf8,
    "topic0": pl.Utf8, "topic1": pl.Utf8, "topic2": pl.Utf8, "topic3": pl.Utf8, "data": pl.Utf8,
}
T0 = datetime(2024, 1, 1, tzinfo=UTC)
PAIR_A = "0x" + "a1" * 20
PAIR_B = "0x" + "b2" * 20
FACTORY = "0x5c69bee701ef814a2b6a3edd4b1652cb9cc5aa6f"
HIGH_ADDR = "0xffffffffffffffffffffffffffffffffffffff01"  # high bit set
U256 = [0, 1, 2**64 - 1, 2**64, 2**128 - 1, 2**128, 2**255, 2**256 - 1]
I256 = [-(2**255), -1, 0, 2**255 - 1, -(2**128), -(2**127), 2**127, -(2**127) - 1, 2**128]


def ev(name, inputs, anonymous=False):
    return {
        "type": "event", "name": name, "anonymous": anonymous,
        "inputs": [i if isinstance(i, dict) else {"type": i[0], "name": i[1], "indexed": i[2]} for i in inputs],
    }


def hx(b: bytes) -> str:
    return "0x" + b.hex()


# ----------------------------------------------------------------------------- log building


def encode_log(spec: EventSpec, values: list, address: str) -> tuple[str, list[str], str]:
    """(address, topics, data) for `values` (one per input, ABI order), encoded with eth_abi."""
    topics = [] if spec.anonymous else [spec.topic0]
    types, data_values = [], []
    for p, v in zip(spec.inputs, values):
        if p.indexed:
            if p.type == "string":
                topics.append(hx(keccak(v.encode())))
            elif p.type == "bytes":
                topics.append(hx(keccak(v)))
            elif p.is_value_type:
                topics.append(hx(abi_encode([p.type], [v])))
            else:  # arrays / tuples: the hash of the in-place encoding; any 32 bytes do here
                topics.append(hx(keccak(abi_encode([p.type], [v]))))
        else:
            types.append(p.type)
            data_values.append(v)
    return address, topics, hx(abi_encode(types, data_values))


def make_logs(entries: list[tuple[str, list[str], str]]) -> pl.DataFrame:
    rows = []
    for i, (addr, topics, data) in enumerate(entries):
        t = list(topics) + [None] * (4 - len(topics))
        block = 1000 + i // 3
        rows.append({
            "chain_id": 1, "block_number": block, "block_hash": "0x" + f"{block:064x}",
            "block_timestamp": T0 + timedelta(seconds=12 * (i // 3)),
            "transaction_hash": "0x" + f"{i + 77:064x}", "transaction_index": i % 3, "log_index": i,
            "address": addr, "topic0": t[0], "topic1": t[1], "topic2": t[2], "topic3": t[3], "data": data,
        })
    return pl.DataFrame(rows, schema=LOGS_SCHEMA, orient="row") if rows else pl.DataFrame(schema=LOGS_SCHEMA)


# ------------------------------------------------------------------------------ expectations


def _json_value(t: str, v):
    """eth_abi's Python value -> the JSON form the decoder promises (ints as decimal strings)."""
    from eth_abi.grammar import TupleType, parse

    def conv(tt, x):
        if tt.arrlist:
            return [conv(tt.item_type, y) for y in x]
        if isinstance(tt, TupleType):
            return [conv(c, y) for c, y in zip(tt.components, x)]
        if tt.base == "address":
            return x.lower()
        if tt.base in ("uint", "int"):
            return str(x)
        if tt.base == "bytes":
            return "0x" + x.hex()
        return x

    return conv(parse(t), v)


def expected_rows(spec: EventSpec, logs: pl.DataFrame) -> list[dict]:
    """Decode every row of `logs` with eth_abi and map to the promised output representation."""
    out = []
    non_indexed = [p for p in spec.inputs if not p.indexed]
    for row in logs.iter_rows(named=True):
        dec = iter(abi_decode([p.type for p in non_indexed], bytes.fromhex(row["data"][2:])))
        topic_i = 0 if spec.anonymous else 1
        rec = {k: row[k] for k in KEYS}
        for p in spec.inputs:
            if p.indexed:
                topic = row[f"topic{topic_i}"]
                topic_i += 1
                if not p.is_value_type:
                    rec[p.column] = topic
                    continue
                v = abi_decode([p.type], bytes.fromhex(topic[2:]))[0]
            else:
                v = next(dec)
            if p.type == "address":
                rec[p.column] = v.lower()
            elif p.type == "bool":
                rec[p.column] = v
            elif re.fullmatch(r"u?int\d+", p.type):
                if p.is_big_int:
                    rec[p.column] = str(v)
                    rec[p.f64_column] = float(v)
                else:
                    rec[p.column] = v
            elif re.fullmatch(r"bytes\d*", p.type):
                rec[p.column] = hx(v)
            elif p.type == "string":
                rec[p.column] = v
            else:
                rec[p.column] = _json_value(p.type, v)
        out.append(rec)
    return out


def actual_rows(spec: EventSpec, res: DecodeResult) -> list[dict]:
    rows = res.frame.to_dicts()
    for r in rows:
        for p in spec.inputs:
            if not p.indexed and not p.is_value_type and p.type not in ("string", "bytes"):
                r[p.column] = json.loads(r[p.column])
    return rows


def check(spec: EventSpec, res: DecodeResult, logs: pl.DataFrame, skipped: int = 0) -> None:
    assert res.frame.schema == pl.Schema(spec.schema())
    assert actual_rows(spec, res) == expected_rows(spec, logs)
    assert res.skipped == skipped


# ------------------------------------------------------------------------------------ Uniswap


@pytest.fixture(scope="module")
def pair_specs():
    return {s.name: s for s in event_specs("UniswapV2Pair", load_abi(BUILD / "UniswapV2Pair.json"), None)}


@pytest.fixture(scope="module")
def factory_spec():
    return event_specs("UniswapV2Factory", load_abi(BUILD / "UniswapV2Factory.json"), ["PairCreated"])[0]


def test_uniswap_events_mixed_stream(pair_specs, factory_spec):
    P = pair_specs
    user, router = "0x" + "0c" * 20, "0x7a250d5630b4cf539739df2c5dacb4c659f2488d"
    wanted = {
        "Transfer": [
            ["0x" + "00" * 20, user, 10**18],
            [user, PAIR_A, 2**256 - 1],
        ],
        "Approval": [[user, router, 2**256 - 1]],
        "Mint": [[router, 12345, 2**112 - 1]],
        "Burn": [[router, 2**64, 2**128, user]],
        "Swap": [
            [router, 0, 10**21, 5 * 10**20, 0, user],
            [router, 2**128 - 1, 2**200 + 3, 1, 2**64 - 1, HIGH_ADDR],
        ],
        "Sync": [[2**112 - 1, 0], [10**30, 77]],
    }
    entries, by_event = [], {}
    addr_cycle = [PAIR_A, PAIR_B]
    for name, rows in wanted.items():
        for i, vals in enumerate(rows):
            e = encode_log(P[name], vals, addr_cycle[i % 2])
            entries.append(e)
            by_event.setdefault(name, []).append(len(entries) - 1)
    entries.append(encode_log(factory_spec, ["0x" + "11" * 20, HIGH_ADDR, PAIR_A, 1], FACTORY))
    entries.append((PAIR_A, ["0x" + "ee" * 32], "0x"))  # unrelated event
    logs = make_logs(entries)
    # interleave: decode order must follow the logs order, whatever the event
    logs = logs.sample(fraction=1.0, shuffle=True, seed=3).sort("log_index")
    specs = [*P.values(), factory_spec]
    res = decode_logs(logs, specs)
    assert set(res) == {s.table for s in specs}
    for name, spec in P.items():
        subset = logs.filter(pl.col("topic0") == spec.topic0)
        check(spec, res[spec.table], subset)
        assert res[spec.table].frame.height == len(wanted[name])
    check(factory_spec, res[factory_spec.table], logs.filter(pl.col("address") == FACTORY))
    swap = res[P["Swap"].table].frame
    assert swap["amount1_in"].to_list() == [str(10**21), str(2**200 + 3)]
    assert swap["amount0_in"].to_list() == ["0", str(2**128 - 1)]
    assert swap["to"].to_list() == [user, HIGH_ADDR]
    pc = res[factory_spec.table].frame.row(0, named=True)
    assert (pc["token1"], pc["pair"], pc["arg3"], pc["arg3_f64"]) == (HIGH_ADDR, PAIR_A, "1", 1.0)


def test_address_filter_and_empty_inputs(pair_specs):
    sync = pair_specs["Sync"]
    logs = make_logs([encode_log(sync, [i, i + 1], a) for i, a in enumerate([PAIR_A, PAIR_B, PAIR_A])])
    res = decode_logs(logs, [sync], {sync.table: [PAIR_A.upper().replace("0X", "0x")]})
    assert res[sync.table].frame["reserve0"].to_list() == ["0", "2"]
    assert res[sync.table].skipped == 0  # other emitters are not "skipped", just not ours
    assert decode_logs(logs, [sync], {sync.table: []})[sync.table].frame.height == 0
    assert decode_logs(logs, [sync], {"other_table": [PAIR_B]})[sync.table].frame.height == 3
    empty = decode_logs(make_logs([]), list(pair_specs.values()))
    for spec in pair_specs.values():
        assert empty[spec.table].frame.schema == pl.Schema(spec.schema())
        assert empty[spec.table].frame.height == 0 and empty[spec.table].skipped == 0


# ------------------------------------------------------------------------------- boundaries


def test_uint256_and_int256_boundaries_topics_and_data():
    abi = [
        ev("U", [("uint256", "t", True), ("uint256", "d", False), ("uint128", "m", False)]),
        ev("I", [("int256", "t", True), ("int256", "d", False), ("int128", "m", False)]),
    ]
    u, i = event_specs("B", abi, None)
    entries = [encode_log(u, [v, v, v % 2**128], PAIR_A) for v in U256]
    entries += [encode_log(u, [v, w, w % 2**128], PAIR_A) for v, w in zip(U256, reversed(U256))]
    i128 = [-(2**127), -1, 0, 2**127 - 1]
    entries += [encode_log(i, [v, v, i128[k % 4]], PAIR_A) for k, v in enumerate(I256)]
    logs = make_logs(entries)
    res = decode_logs(logs, [u, i])
    check(u, res[u.table], logs.filter(pl.col("topic0") == u.topic0))
    check(i, res[i.table], logs.filter(pl.col("topic0") == i.topic0))
    assert res[u.table].frame["d"].to_list()[: len(U256)] == [str(v) for v in U256]
    assert res[u.table].frame["d"][len(U256)] == "115792089237316195423570985008687907853269984665640564039457584007913129639935"
    assert res[i.table].frame["d"].to_list() == [str(v) for v in I256]
    assert res[i.table].frame["t"].to_list() == [str(v) for v in I256]
    assert res[i.table].frame["m"].to_list() == [str(i128[k % 4]) for k in range(len(I256))]
    assert res[i.table].frame["d_f64"].to_list() == [float(v) for v in I256]


def test_small_ints_bool_bytes_address():
    abi = [ev("S", [
        ("int8", "a", False), ("uint8", "b", False), ("int64", "c", False), ("uint64", "d", False),
        ("bool", "e", False), ("bytes32", "f", False), ("address", "g", False), ("bytes4", "h", False),
        ("uint112", "i", False), ("int72", "j", False), ("int8", "k", True), ("bool", "l", True),
        ("address", "m", True),
    ])]
    (s,) = event_specs("Small", abi, None)
    cases = [
        [-128, 255, -(2**63), 2**64 - 1, True, b"\xff" * 32, HIGH_ADDR, b"\x00\x01\x02\x03", 2**112 - 1, -(2**71), -128, True, HIGH_ADDR],
        [127, 0, 2**63 - 1, 0, False, b"\x00" * 32, "0x" + "00" * 20, b"\xde\xad\xbe\xef", 0, 2**71 - 1, 127, False, "0x" + "80" + "00" * 19],
        [-1, 1, -1, 1, True, bytes(range(32)), "0x" + "7f" * 20, b"\x80\x00\x00\x01", 1, -1, -1, False, PAIR_B],
    ]
    logs = make_logs([encode_log(s, c, PAIR_A) for c in cases])
    res = decode_logs(logs, [s])[s.table]
    check(s, res, logs)
    f = res.frame
    assert f["a"].to_list() == [-128, 127, -1] and f["a"].dtype == pl.Int64
    assert f["b"].to_list() == [255, 0, 1] and f["b"].dtype == pl.UInt64
    assert f["c"].to_list() == [-(2**63), 2**63 - 1, -1]
    assert f["d"].to_list() == [2**64 - 1, 0, 1]
    assert f["k"].to_list() == [-128, 127, -1]
    assert f["e"].to_list() == [True, False, True] and f["l"].to_list() == [True, False, False]
    assert f["g"][0] == HIGH_ADDR and f["m"][1] == "0x80" + "00" * 19
    assert f["h"].to_list() == ["0x00010203", "0xdeadbeef", "0x80000001"]
    assert f["j"].to_list() == [str(-(2**71)), str(2**71 - 1), "-1"]


def test_dynamic_arguments_rowwise():
    tup = {"type": "tuple[]", "name": "items", "indexed": False, "components": [
        {"type": "uint256", "name": "amount"}, {"type": "address", "name": "who"}, {"type": "string", "name": "memo"}]}
    abi = [ev("D", [
        ("string", "note", False), ("uint256", "x", False), ("bytes", "blob", False), ("uint256[]", "arr", False),
        ("string", "tag", True), ("int8", "small", False), tup, ("bytes32[2]", "pair", False), ("address", "who", True),
        ("bytes", "raw", True),
    ])]
    (s,) = event_specs("Dyn", abi, None)
    assert s.signature == "D(string,uint256,bytes,uint256[],string,int8,(uint256,address,string)[],bytes32[2],address,bytes)"
    cases = [
        ["hello", 2**256 - 1, b"\x00\xff", [0, 1, 2**256 - 1], "tag-a", -5, [(2**200, HIGH_ADDR, "m")], [b"\x01" * 32, b"\x02" * 32], PAIR_B, b"raw"],
        ["", 0, b"", [], "", 127, [], [b"\x00" * 32, b"\xff" * 32], HIGH_ADDR, b""],
        ["ünïcødé ✓" * 20, 2**70, bytes(range(256)), list(range(40)), "x" * 100, -128,
         [(1, PAIR_A, ""), (2, PAIR_B, "second")], [b"\x03" * 32, b"\x04" * 32], PAIR_A, b"\x01" * 64],
    ]
    logs = make_logs([encode_log(s, c, PAIR_A) for c in cases])
    res = decode_logs(logs, [s])[s.table]
    check(s, res, logs)
    f = res.frame
    assert f["note"].to_list() == [c[0] for c in cases]
    assert f["blob"].to_list() == [hx(c[2]) for c in cases]
    assert json.loads(f["arr"][0]) == ["0", "1", str(2**256 - 1)]
    assert f["tag"][0] == hx(keccak(b"tag-a"))
    assert json.loads(f["items"][0]) == [[str(2**200), HIGH_ADDR, "m"]]
    assert f["x"].to_list() == [str(2**256 - 1), "0", str(2**70)]


def test_invalid_utf8_string_is_replaced_not_skipped():
    (s,) = event_specs("X", [ev("M", [("string", "s", False)])], None)
    data = hx(abi_encode(["bytes"], [b"ok\xff\xfe"]))  # same encoding as a string
    logs = make_logs([(PAIR_A, [s.topic0], data)])
    res = decode_logs(logs, [s])[s.table]
    assert res.frame["s"].to_list() == ["ok\ufffd\ufffd"] and res.skipped == 0


# ------------------------------------------------------------------------ anonymous & overloads


def test_anonymous_events():
    abi = [
        ev("Named", [("uint256", "v", False)]),  # 1 topic + 1 word, like Anon
        ev("Anon", [("bytes32", "id", True), ("uint256", "v", False)], anonymous=True),
        ev("Anon0", [("uint64", "a", False), ("bool", "b", False)], anonymous=True),
        ev("AnonAddr", [("address", "who", True), ("address", "to", True), ("int8", "x", False)], anonymous=True),
    ]
    named, anon, anon0, anon_addr = event_specs("C", abi, None)
    assert anon.topic0 is None and anon.topic_count == 1 and anon0.topic_count == 0
    entries = [
        encode_log(named, [5], PAIR_A),  # topic0 known -> Named only
        encode_log(anon, [b"\x01" * 32, 6], PAIR_A),  # topic0 holds `id`
        encode_log(anon, [b"\xff" * 32, 2**256 - 1], PAIR_A),
        encode_log(anon0, [2**64 - 1, True], PAIR_A),  # no topics at all
        encode_log(anon, [b"\x02" * 32, 7], PAIR_B),  # another contract
        (PAIR_A, ["0x" + "ab" * 32], "0x" + "00" * 31),  # 1 topic, short data -> skipped for Anon
        (PAIR_A, [], "0x" + "00" * 32 + "00" * 31 + "02"),  # bool=2 -> skipped for Anon0
        (PAIR_A, ["0x" + "ab" * 32, "0x" + "cd" * 32], "0x" + "00" * 32),  # 2 topics: nobody's candidate
        encode_log(anon_addr, [HIGH_ADDR, PAIR_B, -3], PAIR_B),
        (PAIR_B, ["0x" + "ff" * 32, "0x" + "00" * 12 + "11" * 20], "0x" + "00" * 32),  # dirty address
    ]
    logs = make_logs(entries)
    specs = [named, anon, anon0, anon_addr]
    only_a = {anon.table: [PAIR_A], anon0.table: [PAIR_A], anon_addr.table: [PAIR_B]}
    res = decode_logs(logs, specs, only_a)
    check(named, res[named.table], logs[0:1])
    check(anon, res[anon.table], logs[1:3], skipped=1)
    check(anon0, res[anon0.table], logs[3:4], skipped=1)
    check(anon_addr, res[anon_addr.table], logs[8:9], skipped=1)
    assert res[anon.table].frame["id"].to_list() == [hx(b"\x01" * 32), hx(b"\xff" * 32)]
    assert res[anon_addr.table].frame.row(0, named=True)["who"] == HIGH_ADDR
    # without an address filter Anon also takes the other contract's log
    assert decode_logs(logs, specs)[anon.table].frame["v"].to_list() == ["6", str(2**256 - 1), "7"]
    # documented rule: without Named in the same call its log is indistinguishable from Anon's
    alone = decode_logs(logs, [anon], {anon.table: [PAIR_A]})[anon.table]
    assert alone.frame["id"].to_list() == [named.topic0, hx(b"\x01" * 32), hx(b"\xff" * 32)]
    assert alone.skipped == 1


def test_same_name_different_signatures():
    abi = [
        ev("Transfer", [("address", "from", True), ("address", "to", True), ("uint256", "value", False)]),
        ev("Transfer", [("address", "to", True), ("uint256", "value", False)]),
    ]
    erc20ish, short = event_specs("Tok", abi, ["Transfer"])
    assert erc20ish.table != short.table and erc20ish.table.startswith("tok_transfer_")
    entries = [
        encode_log(erc20ish, [PAIR_A, PAIR_B, 1], PAIR_A),
        encode_log(short, [PAIR_B, 2], PAIR_A),
        encode_log(erc20ish, [PAIR_B, PAIR_A, 3], PAIR_A),
    ]
    logs = make_logs(entries)
    res = decode_logs(logs, [erc20ish, short])
    check(erc20ish, res[erc20ish.table], logs[[0, 2]])
    check(short, res[short.table], logs[1:2])


# ------------------------------------------------------------------------------- wrong shapes


def test_wrong_shapes_are_skipped_and_counted(pair_specs):
    transfer = pair_specs["Transfer"]
    t0 = transfer.topic0
    pad = lambda a: "0x" + "00" * 12 + a[2:]  # noqa: E731
    good = encode_log(transfer, [PAIR_A, PAIR_B, 42], PAIR_A)
    entries = [
        good,
        (PAIR_A, [t0, pad(PAIR_A), pad(PAIR_B), "0x" + f"{7:064x}"], "0x"),  # ERC-721 Transfer
        (PAIR_A, [t0, pad(PAIR_A)], "0x" + f"{1:064x}"),  # too few topics
        (PAIR_A, [t0, pad(PAIR_A), pad(PAIR_B)], "0x"),  # no data
        (PAIR_A, [t0, pad(PAIR_A), pad(PAIR_B)], "0x" + f"{1:064x}" * 2),  # too much data
        (PAIR_A, [t0, pad(PAIR_A), pad(PAIR_B)], "0x" + f"{1:064x}"[:-2]),  # not whole words
        (PAIR_A, [t0, "0x" + "01" * 12 + PAIR_A[2:], pad(PAIR_B)], "0x" + f"{1:064x}"),  # dirty address
        good,
    ]
    logs = make_logs(entries)
    res = decode_logs(logs, [transfer])[transfer.table]
    check(transfer, res, logs[[0, 7]], skipped=6)

    sync = pair_specs["Sync"]
    over = "0x" + "00" * 13 + "ff" * 19 + f"{1:064x}"  # uint112 with bits above 112 set
    logs2 = make_logs([(PAIR_A, [sync.topic0], over), encode_log(sync, [1, 2], PAIR_A)])
    r2 = decode_logs(logs2, [sync])[sync.table]
    assert r2.frame["reserve0"].to_list() == ["1"] and r2.skipped == 1


def test_wrong_shapes_dynamic_and_sign_extension():
    (d,) = event_specs("X", [ev("D", [("string", "s", False), ("uint256", "n", False)])], None)
    (i,) = event_specs("X", [ev("I", [("int8", "v", False)])], None)
    bad_offset = "0x" + f"{4096:064x}" + f"{1:064x}"  # offset past the end
    short = "0x" + f"{64:064x}"
    bad_int8 = "0x" + "00" * 31 + "80"  # 128 is not an int8 (no sign extension)
    logs = make_logs([
        (PAIR_A, [d.topic0], bad_offset),
        (PAIR_A, [d.topic0], short),
        encode_log(d, ["fine", 3], PAIR_A),
        (PAIR_A, [i.topic0], bad_int8),
        encode_log(i, [-128], PAIR_A),
    ])
    res = decode_logs(logs, [d, i])
    check(d, res[d.table], logs[2:3], skipped=2)
    check(i, res[i.table], logs[4:5], skipped=1)


def test_event_without_arguments():
    (s,) = event_specs("X", [ev("Paused", [])], None)
    logs = make_logs([
        (PAIR_A, [s.topic0], "0x"),
        (PAIR_A, [s.topic0], "0x" + "00" * 32),  # unexpected data
        (PAIR_A, [s.topic0, s.topic0], "0x"),  # unexpected topic
        (PAIR_B, [s.topic0], "0x"),
    ])
    res = decode_logs(logs, [s], {s.table: PAIR_A})[s.table]  # a bare string works as one address
    assert res.frame.columns == KEYS and res.frame["log_index"].to_list() == [0]
    assert res.skipped == 2


def test_duplicate_tables_rejected(pair_specs):
    with pytest.raises(ValueError, match="table"):
        decode_logs(make_logs([]), [pair_specs["Sync"], pair_specs["Sync"]])


# ---------------------------------------------------------------------------- property test

_INT_BITS = [8, 16, 24, 32, 64, 72, 112, 128, 160, 256]


@st.composite
def _static_type(draw):
    kind = draw(st.sampled_from(["uint", "int", "address", "bool", "bytes"]))
    if kind in ("uint", "int"):
        return f"{kind}{draw(st.sampled_from(_INT_BITS))}"
    if kind == "bytes":
        return f"bytes{draw(st.integers(1, 32))}"
    return kind


def _value_for(t: str):
    if t == "address":
        return st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
    if t == "bool":
        return st.booleans()
    if t.startswith("bytes"):
        n = int(t[5:])
        return st.binary(min_size=n, max_size=n)
    bits = int(t.lstrip("uint"))
    if t.startswith("u"):
        edge = st.sampled_from([0, 1, 2**bits - 1, 2 ** (bits - 1)])
        return st.one_of(edge, st.integers(0, 2**bits - 1))
    edge = st.sampled_from([0, -1, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return st.one_of(edge, st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))


@st.composite
def _event_and_rows(draw):
    types = draw(st.lists(_static_type(), min_size=1, max_size=7))
    anonymous = draw(st.booleans())
    max_idx = 4 if anonymous else 3
    indexed = []
    for _ in types:
        indexed.append(sum(indexed) < max_idx and draw(st.booleans()))
    inputs = [(t, f"p{k}", ix) for k, (t, ix) in enumerate(zip(types, indexed))]
    (spec,) = event_specs("Prop", [ev("E", inputs, anonymous=anonymous)], None)
    rows = draw(st.lists(st.tuples(*[_value_for(t) for t in types]), min_size=1, max_size=6))
    return spec, rows


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event_and_rows())
def test_property_static_events_round_trip(case):
    spec, rows = case
    logs = make_logs([encode_log(spec, list(r), PAIR_A) for r in rows])
    res = decode_logs(logs, [spec])[spec.table]
    check(spec, res, logs)
    for p, col in zip(spec.inputs, zip(*rows)):  # and directly against the values encoded
        got = res.frame[p.column].to_list()
        if p.type == "address":
            assert got == list(col)
        elif p.type == "bool" or (p.type.startswith(("uint", "int")) and not p.is_big_int):
            assert got == list(col)
        elif p.is_big_int:
            assert got == [str(v) for v in col]
            assert res.frame[p.f64_column].to_list() == [float(v) for v in col]
        else:
            assert got == [hx(v) for v in col]


@st.composite
def _dynamic_event_and_rows(draw):
    types = draw(st.lists(st.sampled_from(["string", "bytes", "uint256", "int16", "address", "bool", "bytes3"]), min_size=1, max_size=5))
    if not {"string", "bytes"} & set(types):
        types.append(draw(st.sampled_from(["string", "bytes"])))
    indexed = [t not in ("string", "bytes") and draw(st.booleans()) for t in types[:3]] + [False] * (len(types) - 3)
    inputs = [(t, f"p{k}", ix) for k, (t, ix) in enumerate(zip(types, indexed))]
    (spec,) = event_specs("Dyn", [ev("E", inputs)], None)
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
    vals = {"string": text, "bytes": st.binary(max_size=100)}
    rows = draw(st.lists(st.tuples(*[vals[t] if t in vals else _value_for(t) for t in types]), min_size=1, max_size=5))
    return spec, rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_dynamic_event_and_rows())
def test_property_string_bytes_events_round_trip(case):
    spec, rows = case
    logs = make_logs([encode_log(spec, list(r), PAIR_A) for r in rows])
    res = decode_logs(logs, [spec])[spec.table]
    check(spec, res, logs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([
        [("string", "s", False), ("uint256", "n", False), ("bytes", "b", False)],  # vectorised path
        [("bytes", "b", False), ("uint32[]", "a", False), ("bool", "f", False)],  # eth_abi per row
    ]),
    st.text(max_size=40),
    st.binary(max_size=70),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_property_corrupted_dynamic_data_skipped_iff_eth_abi_rejects(inputs, text, blob, flips):
    (spec,) = event_specs("Dyn", [ev("E", inputs)], None)
    vals = {"string": text, "bytes": blob, "uint256": 7, "uint32[]": [1, 2, 3], "bool": True}
    _, topics, data = encode_log(spec, [vals[t] for t, _, _ in inputs], PAIR_A)
    raw = bytearray(bytes.fromhex(data[2:]))
    for pos, byte in flips:  # corrupt offsets, lengths, padding or content
        raw[pos % len(raw)] = byte
    logs = make_logs([(PAIR_A, topics, hx(bytes(raw)))])
    res = decode_logs(logs, [spec])[spec.table]
    decode_types = [t.replace("string", "bytes") for t, _, _ in inputs]
    try:
        abi_decode(decode_types, bytes(raw))
    except Exception:  # noqa: BLE001 - eth_abi refusing the bytes in any way means: skipped
        assert res.frame.height == 0 and res.skipped == 1
        return
    assert res.skipped == 0 and res.frame.height == 1
    got = res.frame.row(0, named=True)
    exp = abi_decode(decode_types, bytes(raw))
    for (t, name, _), v in zip(inputs, exp):
        if t == "string":
            assert got[name] == v.decode("utf-8", errors="replace")
        elif t == "bytes":
            assert got[name] == hx(v)
        elif t == "uint32[]":
            assert json.loads(got[name]) == [str(x) for x in v]
        elif t == "uint256":
            assert got[name] == str(v)
        else:
            assert got[name] == v


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event_and_rows(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_property_corrupted_static_words_skipped_iff_eth_abi_rejects(case, flips):
    spec, rows = case
    _, topics, data = encode_log(spec, list(rows[0]), PAIR_A)
    words = [bytearray(bytes.fromhex(t[2:])) for t in topics] + [bytearray(bytes.fromhex(data[2:]))]
    first = 0 if spec.anonymous else 1  # never corrupt a real topic0
    targets = [w for k, w in enumerate(words) if k >= first and len(w)]
    if not targets:
        return
    for pos, byte in flips:
        w = targets[pos % len(targets)]
        w[(pos // 7) % len(w)] = byte
    topics = [hx(bytes(w)) for w in words[:-1]]
    logs = make_logs([(PAIR_A, topics, hx(bytes(words[-1])))])
    res = decode_logs(logs, [spec])[spec.table]
    try:
        expected = expected_rows(spec, logs)  # eth_abi (strict) on every topic and on the data
    except Exception:  # noqa: BLE001 - eth_abi refusing the log in any way means: skipped
        assert (res.frame.height, res.skipped) == (0, 1)
        return
    assert res.skipped == 0 and actual_rows(spec, res) == expected
