"""ABI loading, snake_case, event specs (names, signatures, topic0, columns, tables, schema)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # allow plain `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402
import pytest  # noqa: E402
from eth_utils import keccak  # noqa: E402

from indexer_dagster.parse.abi import (  # noqa: E402
    KEY_COLUMNS,
    AbiError,
    EventSpec,
    Param,
    event_specs,
    load_abi,
    snake_case,
)

BUILD = ROOT / "node_modules/@uniswap/v2-core/build"
PAIR = BUILD / "UniswapV2Pair.json"
FACTORY = BUILD / "UniswapV2Factory.json"
ERC20 = BUILD / "ERC20.json"

# Well-known topic0 values (Etherscan / 4byte), independent of the code under test.
TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
SWAP = "0xd78ad95fa46c994b6551d0da85fc275fe613ce37657fb8d5e3d130840159d822"
SYNC = "0x1c411e9a96e071241c2f21f7726b17ae89e3cab4c78be50e062b03a9fffbbad1"
MINT = "0x4c209b5fc8ad50758f13e2e1088ba56a560dff690a1c6fef26394f4c03821c4f"
BURN = "0xdccd412f0b1252819cb1fd330b93224ca42612892bb3f4f789976e6d81936496"
PAIR_CREATED = "0x0d3648bd0f6ba80134a33ba9275ac585d9d315f0ad8355cddefde31afa28d0e9"


def ev(name, inputs, anonymous=False):
    """An ABI event entry from (type, name, indexed) triples (a dict passes through)."""
    return {
        "type": "event",
        "name": name,
        "anonymous": anonymous,
        "inputs": [
            i if isinstance(i, dict) else {"type": i[0], "name": i[1], "indexed": i[2]} for i in inputs
        ],
    }


def h(sig: str) -> str:
    return "0x" + keccak(text=sig).hex()


# ---------------------------------------------------------------------------------- load_abi


def test_artifact_and_bare_list_load_the_same(tmp_path):
    artifact = load_abi(PAIR)
    bare = tmp_path / "Pair.json"
    bare.write_text(json.dumps(artifact))
    assert load_abi(bare) == artifact
    assert load_abi(str(bare)) == artifact
    assert any(e.get("type") == "event" and e["name"] == "Swap" for e in artifact)


def test_foundry_style_artifact_and_abi_as_string(tmp_path):
    abi = load_abi(ERC20)
    foundry = tmp_path / "Foundry.json"
    foundry.write_text(json.dumps({"abi": abi, "bytecode": {"object": "0x00"}, "methodIdentifiers": {}}))
    assert load_abi(foundry) == abi
    stringly = tmp_path / "Explorer.json"
    stringly.write_text(json.dumps({"abi": json.dumps(abi)}))
    assert load_abi(stringly) == abi


def test_missing_file(tmp_path):
    p = tmp_path / "abis" / "Nope.json"
    with pytest.raises(AbiError, match="Nope.json: file not found"):
        load_abi(p)


def test_bad_json_names_file_position_and_fix(tmp_path):
    p = tmp_path / "Pair.json"
    p.write_text('[\n  {"type": "event",\n    "name": }\n]')
    with pytest.raises(AbiError) as e:
        load_abi(p)
    msg = str(e.value)
    assert "Pair.json" in msg and "not valid JSON" in msg and "line 3" in msg
    assert '"abi" key' in msg  # the fix
    assert isinstance(e.value, ValueError)


def test_no_events_and_wrong_shapes(tmp_path):
    p = tmp_path / "Fn.json"
    p.write_text(json.dumps([{"type": "function", "name": "f", "inputs": [], "outputs": []}]))
    with pytest.raises(AbiError, match="Fn.json: the ABI has no events"):
        load_abi(p)
    p.write_text(json.dumps({"bytecode": "0x"}))
    with pytest.raises(AbiError, match='without an "abi" key'):
        load_abi(p)
    p.write_text(json.dumps({"abi": {"not": "a list"}}))
    with pytest.raises(AbiError, match="expected a JSON list"):
        load_abi(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(AbiError, match="not a JSON object"):
        load_abi(p)
    with pytest.raises(AbiError, match="not a file"):
        load_abi(tmp_path)


# -------------------------------------------------------------------------------- snake_case


@pytest.mark.parametrize(
    "name,expected",
    [
        ("UniswapV2Pair", "uniswap_v2_pair"),
        ("UniswapV2Factory", "uniswap_v2_factory"),
        ("ERC20", "erc20"),
        ("amount0In", "amount0_in"),
        ("amount1Out", "amount1_out"),
        ("PairCreated", "pair_created"),
        ("HTTPServer", "http_server"),
        ("already_snake", "already_snake"),
        ("_underscore", "underscore"),
        ("_from", "from"),
        ("tokenID", "token_id"),
        ("ERC20Token", "erc20_token"),
        ("reserve0", "reserve0"),
        ("my-contract.v2", "my_contract_v2"),
        ("Swap", "swap"),
    ],
)
def test_snake_case(name, expected):
    assert snake_case(name) == expected


# ------------------------------------------------------------------------------- event_specs


def test_uniswap_pair_specs():
    specs = {s.name: s for s in event_specs("UniswapV2Pair", load_abi(PAIR), None)}
    assert set(specs) == {"Approval", "Burn", "Mint", "Swap", "Sync", "Transfer"}
    swap = specs["Swap"]
    assert swap.signature == "Swap(address,uint256,uint256,uint256,uint256,address)"
    assert swap.topic0 == SWAP and not swap.anonymous
    assert swap.table == "uniswap_v2_pair_swap"
    assert [p.column for p in swap.inputs] == ["sender", "amount0_in", "amount1_in", "amount0_out", "amount1_out", "to"]
    assert [p.indexed for p in swap.inputs] == [True, False, False, False, False, True]
    assert swap.inputs[1] == Param(name="amount0In", column="amount0_in", type="uint256", indexed=False)
    assert {n: s.topic0 for n, s in specs.items()} == {
        "Approval": APPROVAL, "Burn": BURN, "Mint": MINT, "Swap": SWAP, "Sync": SYNC, "Transfer": TRANSFER,
    }
    assert specs["Sync"].signature == "Sync(uint112,uint112)"
    assert swap.schema() == {
        "chain_id": pl.Int64, "block_number": pl.Int64, "block_hash": pl.Utf8,
        "block_timestamp": pl.Datetime("us", "UTC"), "transaction_hash": pl.Utf8,
        "transaction_index": pl.Int64, "log_index": pl.Int64, "address": pl.Utf8,
        "sender": pl.Utf8,
        "amount0_in": pl.Utf8, "amount0_in_f64": pl.Float64,
        "amount1_in": pl.Utf8, "amount1_in_f64": pl.Float64,
        "amount0_out": pl.Utf8, "amount0_out_f64": pl.Float64,
        "amount1_out": pl.Utf8, "amount1_out_f64": pl.Float64,
        "to": pl.Utf8,
    }
    assert list(swap.schema()) == list(swap.schema().keys())  # ordered


def test_factory_and_erc20_specs():
    (pc,) = event_specs("UniswapV2Factory", load_abi(FACTORY), ["PairCreated"])
    assert pc.signature == "PairCreated(address,address,address,uint256)" and pc.topic0 == PAIR_CREATED
    assert pc.table == "uniswap_v2_factory_pair_created"
    assert [p.column for p in pc.inputs] == ["token0", "token1", "pair", "arg3"]  # unnamed -> arg<i>
    specs = event_specs("ERC20", load_abi(ERC20), ["Transfer"])
    assert [s.table for s in specs] == ["erc20_transfer"]
    assert [p.column for p in specs[0].inputs] == ["from", "to", "value"]


def test_selection_by_signature_and_unknown_event_lists_what_exists():
    abi = load_abi(PAIR)
    (t,) = event_specs("Pair", abi, ["Transfer(address,address,uint256)"])
    assert t.name == "Transfer"
    (t2,) = event_specs("Pair", abi, ["Transfer(address, address, uint)"])  # spaces, uint alias
    assert t2 == t
    assert event_specs("Pair", abi, ["Swap", "Swap(address,uint256,uint256,uint256,uint256,address)"]) == [
        s for s in event_specs("Pair", abi, None) if s.name == "Swap"
    ]
    assert event_specs("Pair", abi, []) == []
    with pytest.raises(AbiError) as e:
        event_specs("UniswapV2Pair", abi, ["Swapped"])
    msg = str(e.value)
    assert "'Swapped'" in msg and "UniswapV2Pair" in msg
    for sig in ("Swap(address,uint256,uint256,uint256,uint256,address)", "Sync(uint112,uint112)", "Transfer(address,address,uint256)"):
        assert sig in msg
    with pytest.raises(AbiError, match="Sync\\(uint112,uint112\\)"):
        event_specs("UniswapV2Pair", abi, ["Transfer(address,uint256)"])


def test_overloaded_events_get_topic0_suffixes():
    abi = [
        ev("Transfer", [("address", "from", True), ("address", "to", True), ("uint256", "value", False)]),
        ev("Transfer", [("address", "to", True), ("uint256", "value", False)]),
        ev("Transfer", [("bytes32", "id", False)], anonymous=True),
        ev("Other", [("uint8", "x", False)]),
    ]
    specs = event_specs("Token", abi, ["Transfer"])
    assert len(specs) == 3
    sigs = ["Transfer(address,address,uint256)", "Transfer(address,uint256)", "Transfer(bytes32)"]
    assert [s.signature for s in specs] == sigs
    assert [s.table for s in specs] == [f"token_transfer_{h(sig)[2:10]}" for sig in sigs]
    assert specs[0].topic0 == TRANSFER
    assert specs[2].topic0 is None and specs[2].anonymous
    # the suffix does not depend on the selection
    (only,) = event_specs("Token", abi, ["Transfer(address,uint256)"])
    assert only.table == specs[1].table
    (other,) = event_specs("Token", abi, ["Other"])
    assert other.table == "token_other"
    # exact duplicates (merged ABIs) collapse to one
    assert len(event_specs("Token", abi + abi[:1], ["Transfer"])) == 3


def test_column_name_collisions_and_dedupe():
    abi = [
        ev(
            "Weird",
            [
                ("address", "address", True),
                ("uint256", "blockNumber", False),
                ("bytes", "data", False),
                ("bytes32", "topic0", False),
                ("uint8", "", False),
                ("uint64", "value", False),
                ("uint64", "value", False),
                ("uint256", "amount", False),
                ("uint32", "amountF64", False),
                ("bool", "status", False),
                ("int8", "_value", False),
                ("uint16", "", False),
            ],
        )
    ]
    (s,) = event_specs("C", abi, None)
    cols = [p.column for p in s.inputs]
    assert cols == [
        "arg_address",
        "arg_block_number",
        "arg_data",
        "arg_topic0",
        "arg4",
        "value",
        "value_2",
        "amount",
        "amount_f64_2",
        "arg_status",
        "value_3",
        "arg11",
    ]
    schema = s.schema()
    assert len(schema) == len(set(schema)) == 8 + len(cols) + 2  # + two big-int _f64 columns
    assert "arg_block_number_f64" in schema and "amount_f64" in schema
    assert not (set(cols) & KEY_COLUMNS)
    # a later big int never takes an existing "<x>_f64"
    (s2,) = event_specs("C", [ev("E", [("uint8", "xF64", False), ("uint256", "x", False)])], None)
    assert [p.column for p in s2.inputs] == ["x_f64", "x_2"]
    assert list(s2.schema())[-3:] == ["x_f64", "x_2", "x_2_f64"]


def test_types_are_canonical_and_tuples_expanded():
    comp = {
        "type": "tuple[]",
        "name": "orders",
        "indexed": False,
        "components": [
            {"type": "uint", "name": "amount"},
            {"type": "tuple", "name": "who", "components": [{"type": "address", "name": "a"}, {"type": "bool", "name": "b"}]},
        ],
    }
    abi = [ev("Placed", [("uint", "id", True), comp, ("int", "delta", False), ("string", "note", True)])]
    (s,) = event_specs("Book", abi, None)
    assert s.signature == "Placed(uint256,(uint256,(address,bool))[],int256,string)"
    assert s.topic0 == h(s.signature)
    assert [p.type for p in s.inputs] == ["uint256", "(uint256,(address,bool))[]", "int256", "string"]
    assert s.schema()["orders"] == pl.Utf8 and s.schema()["note"] == pl.Utf8
    assert s.schema()["id"] == pl.Utf8 and s.schema()["id_f64"] == pl.Float64  # indexed uint256 is a value
    assert s.table == "book_placed"


def test_small_int_bool_and_bytes_dtypes():
    abi = [ev("E", [("uint8", "a", False), ("int64", "b", True), ("uint64", "c", False), ("int72", "d", False),
                    ("bool", "e", False), ("bytes32", "f", False), ("address", "g", False), ("uint128", "h", False)])]
    (s,) = event_specs("X", abi, None)
    sch = s.schema()
    assert sch["a"] == pl.UInt64 and sch["b"] == pl.Int64 and sch["c"] == pl.UInt64
    assert sch["d"] == pl.Utf8 and sch["d_f64"] == pl.Float64
    assert sch["e"] == pl.Boolean and sch["f"] == pl.Utf8 and sch["g"] == pl.Utf8
    assert sch["h"] == pl.Utf8 and sch["h_f64"] == pl.Float64
    assert isinstance(s, EventSpec)


def test_invalid_abis():
    with pytest.raises(AbiError, match="uint7"):
        event_specs("X", [ev("E", [("uint7", "a", False)])], None)
    with pytest.raises(AbiError, match="at most 3"):
        event_specs("X", [ev("E", [("uint8", n, True) for n in "abcd"])], None)
    # 4 indexed is fine for an anonymous event
    (s,) = event_specs("X", [ev("E", [("uint8", n, True) for n in "abcd"], anonymous=True)], None)
    assert s.topic_count == 4
    with pytest.raises(AbiError, match="same table"):
        event_specs("X", [ev("FooBar", []), ev("Foo_bar", [])], None)
