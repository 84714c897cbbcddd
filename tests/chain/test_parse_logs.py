"""The eth_getLogs body parser of the bulk path (`chain.fetch.parse_logs_body`): what it keeps, what it refuses."""

import orjson
import pytest

from indexer_dagster.chain.fetch import parse_logs_body
from indexer_dagster.persist.datasets import LOG_SCHEMA

LOG = {
    "address": "0xE7f1725E7734CE288F8367e1Bb143E90bb3F0512",
    "topics": ["0xDDF252AD1BE2C89B69C2B068FC378DAA952BA7F163C4A11628F55A4DF523B3EF",
               "0x000000000000000000000000f39fd6e51aad88f6f4ce6ab8827279cfffb92266"],
    "data": "0x00000000000000000000000000000000000000000000000098E1FEE62BDF1800",
    "blockHash": "0x74d6878557fc49fbc333ce6049801235634a79cf34f0b4fb835a6e5d120a1e5c",
    "blockNumber": "0x100",
    "transactionHash": "0x2702c5a0a0efa67c89cb3773075e82fbc3833aa003bbbe95437cfe3455bae336",
    "transactionIndex": "0x1a",
    "logIndex": "0x2",
    "removed": False,
}


def body(*logs: dict) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": 7, "result": list(logs)})


def test_a_log_becomes_one_typed_lower_case_row():
    df = parse_logs_body(body(LOG), 31337)
    assert df.schema == {k: v for k, v in LOG_SCHEMA.items() if k != "block_timestamp"}
    row = df.row(0, named=True)
    assert row == {
        "chain_id": 31337, "block_number": 256, "block_hash": LOG["blockHash"],
        "transaction_hash": LOG["transactionHash"], "transaction_index": 26, "log_index": 2,
        "address": LOG["address"].lower(), "topic0": LOG["topics"][0].lower(), "topic1": LOG["topics"][1],
        "topic2": None, "topic3": None, "data": LOG["data"].lower(),
    }


def test_fields_a_node_adds_are_ignored_and_an_empty_answer_is_an_empty_frame():
    extra = {**LOG, "blockTimestamp": "0x6b123cf7", "somethingNew": {"nested": [1, 2]}}
    assert parse_logs_body(body(extra, {**LOG, "logIndex": "0x3"}), 1)["log_index"].to_list() == [2, 3]
    assert parse_logs_body(body(), 1).height == 0
    assert parse_logs_body(b'{"jsonrpc":"2.0","id":1,"result":[]}', 1).height == 0


@pytest.mark.parametrize("field", ["blockNumber", "blockHash", "logIndex", "address", "data", "transactionHash"])
def test_a_log_without_a_required_field_is_refused_not_stored_with_a_null(field):
    broken = {k: v for k, v in LOG.items() if k != field}
    with pytest.raises(ValueError, match=field):
        parse_logs_body(body(LOG, broken), 1)


def test_a_chunk_whose_headers_are_not_the_blocks_asked_for_is_fetched_again():
    """Logs are matched to headers by position, which holds only for consecutive headers in order."""
    import polars as pl

    from indexer_dagster.chain.fetch import _consistent

    blocks = pl.DataFrame({"number": [10, 11, 13], "hash": ["a", "b", "c"], "parent_hash": ["z", "a", "b"]})
    logs = pl.DataFrame({"block_number": [13], "block_hash": ["c"]})
    assert not _consistent(blocks, logs)
    assert _consistent(blocks.with_columns(number=pl.Series([10, 11, 12])), logs.with_columns(block_number=12))
    assert not _consistent(blocks.with_columns(number=pl.Series([10, 11, 12])), logs)  # a log of block 13


@pytest.mark.parametrize("field", ["address", "topics", "data", "blockHash", "transactionHash"])
def test_upper_case_hex_in_any_one_field_of_any_one_log_is_stored_lower_case(field):
    """The parser skips lower-casing a body without upper-case hex: one such digit anywhere still counts."""
    lower = {k: ([t.lower() for t in v] if k == "topics" else v.lower() if isinstance(v, str) else v)
             for k, v in LOG.items()}
    upper = {**lower, field: ([t.upper().replace("0X", "0x") for t in lower["topics"]] if field == "topics"
                              else lower[field].upper().replace("0X", "0x"))}
    df = parse_logs_body(body(lower, {**upper, "logIndex": "0x3"}), 1)
    assert df.row(1, named=True) == df.row(0, named=True) | {"log_index": 3}
    assert parse_logs_body(body({**lower, field: f"0X{lower[field][2:]}"} if field != "topics" else lower), 1
                           ).row(0, named=True) == df.row(0, named=True)
