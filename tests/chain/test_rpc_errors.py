"""RPC error classification against real provider and node message texts.

Texts come from provider docs, node sources (geth, reth, erigon, besu, nethermind, anvil,
proxyd) and the issue trackers where users pasted them; the comment on each row names its source.
"""

import asyncio
import json
import pickle
import ssl
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer_dagster.chain.errors import (
    RpcError,
    RpcErrorInfo,
    RpcErrorKind,
    classify_exception,
    classify_http,
    classify_rpc_error,
    parse_retry_after,
    redact,
)

R = RpcErrorKind.RANGE_TOO_LARGE
L = RpcErrorKind.RATE_LIMITED
T = RpcErrorKind.TRANSIENT
P = RpcErrorKind.PERMANENT


def e(code, message, data=None):
    err = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return err


# (id, error object, kind, suggested_range, max_block_span, max_results)
RPC_CASES = [
    # --- range errors with hints --------------------------------------------------------------
    pytest.param(
        # Infura (ethers.js #4703): -32005 with the range both in the text and in data
        e(-32005, "query returned more than 10000 results. Try with this block range [0xBDE5F8, 0x102DBCC].",
          {"from": "0xBDE5F8", "limit": 10000, "to": "0x102DBCC"}),
        R, (0xBDE5F8, 0x102DBCC), None, 10000, id="infura-results-32005",
    ),
    pytest.param(
        # Infura, data only (older answers kept the hint out of the message)
        e(-32005, "query returned more than 10000 results", {"from": "0x10", "to": "0x20", "limit": 10000}),
        R, (0x10, 0x20), None, 10000, id="infura-results-data-only",
    ),
    pytest.param(
        # Infura (INFURA/infura #237): the live block-range limit
        e(-32602, "range 1000000 exceeds limit of 10000"), R, None, 10000, None, id="infura-span-32602",
    ),
    pytest.param(
        # Alchemy (go-ethereum #25343): response size, 2K span is an alternative, not a cap
        e(-32602, "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and "
                  "no limit on the response size, or you can request any block range with a cap of 10K logs in the "
                  "response. Based on your parameters and the response size limit, this block range should work: "
                  "[0x0, 0x87fe9]"),
        R, (0, 0x87FE9), None, 10000, id="alchemy-response-size",
    ),
    pytest.param(
        # Alchemy (dank_mids #772): plan span limit with a suggestion
        e(-32600, "You can make eth_getLogs requests with up to a 500 block range. Based on your parameters, "
                  "this block range should work: [0x123c9b2, 0x123cba5]"),
        R, (0x123C9B2, 0x123CBA5), 500, None, id="alchemy-500-span",
    ),
    pytest.param(
        # Alchemy free tier
        e(-32600, "Under the Free tier plan, you can make eth_getLogs requests with up to a 10 block range. "
                  "Upgrade to PAYG for expanded block range."),
        R, None, 10, None, id="alchemy-free-tier",
    ),
    pytest.param(
        # QuickNode / BlastAPI / 1RPC (ponder tests)
        e(-32614, "eth_getLogs is limited to a 10,000 range"), R, None, 10000, None, id="quicknode-range",
    ),
    pytest.param(
        # Ankr (ponder, rindexer): no number in the text; 3000 is its observed limit
        e(-32600, "block range is too wide"), R, None, 3000, None, id="ankr-too-wide",
    ),
    pytest.param(
        # Ankr / LlamaRPC result cap
        e(-32602, "query exceeds max results 20000"), R, None, None, 20000, id="ankr-llamarpc-max-results",
    ),
    pytest.param(
        # Ankr (TAC chains)
        e(-32602, "maximum [from, to] blocks distance: 10000"), R, None, 10000, None, id="ankr-tac-distance",
    ),
    pytest.param(
        # Chainstack (ponder tests): no number
        e(-32602, "Block range limit exceeded."), R, None, None, None, id="chainstack",
    ),
    pytest.param(
        # Avalanche C-chain public node
        e(-32000, "requested too many blocks from 53164508 to 53166556, maximum is set to 2048"),
        R, None, 2048, None, id="avalanche",
    ),
    pytest.param(
        # Cloudflare
        e(-32047, "Max range: 800"), R, None, 800, None, id="cloudflare",
    ),
    pytest.param(
        # thirdweb: viem LimitExceededRpcError, i.e. -32005
        e(-32005, "Maximum allowed number of requested blocks is 1000"), R, None, 1000, None, id="thirdweb-32005",
    ),
    pytest.param(
        # Coinbase (Base node): -32005 again
        e(-32005, "please limit the query to at most 1000 blocks"), R, None, 1000, None, id="coinbase-32005",
    ),
    pytest.param(
        # BlockPI (foundry #12687); the docs URL must not leak into the message
        e(-32602, "eth_getLogs is limited to 1024 block range. Please check the parameter requirements at "
                  "https://docs.blockpi.io/documentations/api-reference"),
        R, None, 1024, None, id="blockpi",
    ),
    pytest.param(
        # dRPC free tier (foundry #12687)
        e(35, "ranges over 10000 blocks are not supported on freetier"), R, None, 10000, None, id="drpc-freetier",
    ),
    pytest.param(
        # dRPC / BlastAPI / reth result cap with a decimal suggested range
        e(-32602, "query exceeds max results 20000, retry with the range 50784086-50785570"),
        R, (50784086, 50785570), None, 20000, id="reth-drpc-results-range",
    ),
    pytest.param(
        # reth block-span limit (--rpc.max-blocks-per-filter)
        e(-32602, "query exceeds max block range 100000"), R, None, 100000, None, id="reth-span",
    ),
    pytest.param(
        # geth --rpc.rangelimit / publicnode
        e(-32000, "exceed maximum block range: 5000"), R, None, 5000, None, id="geth-publicnode-span",
    ),
    pytest.param(
        # geth family / zkEVM / Aurora result cap
        e(-32005, "query returned more than 10000 results"), R, None, None, 10000, id="geth-results",
    ),
    pytest.param(
        # Erigon 3 --rpc.blockrange.limit
        e(-32602, "query block range exceeds server limit, narrow your filter: 1000"),
        R, None, 1000, None, id="erigon-span",
    ),
    pytest.param(
        # Erigon 3 --rpc.logs.maxresults
        e(-32000, "query returns too many logs, narrow your filter: 20000"), R, None, None, 20000, id="erigon-results",
    ),
    pytest.param(
        # Nethermind: -32005
        e(-32005, "Too many logs requested. Max logs per response is 10000."), R, None, None, 10000,
        id="nethermind-32005",
    ),
    pytest.param(
        # Besu: -32005
        e(-32005, "Requested range exceeds maximum RPC range limit"), R, None, None, None, id="besu-32005",
    ),
    pytest.param(
        # cdk-erigon / Polygon zkEVM
        e(-32005, "block range too large, max range: 1000"), R, None, 1000, None, id="cdk-erigon-32005",
    ),
    pytest.param(
        # Arbitrum (Nitro)
        e(-32000, "logs matched by query exceeds limit of 10000"), R, None, None, 10000, id="arbitrum",
    ),
    pytest.param(
        # Optimism public node (proxyd -32020, sent with HTTP 500)
        e(-32020, "backend response too large"), R, None, None, None, id="optimism-proxyd",
    ),
    pytest.param(e(-32000, "Block range is too large"), R, None, None, None, id="optimism-2024"),
    pytest.param(e(-32000, "block range too large"), R, None, None, None, id="base"),
    pytest.param(e(-32603, "eth_getLogs range is too large, max is 1k blocks"), R, None, 1000, None, id="merkle"),
    pytest.param(e(-32602, "block range is too wide (maximum 1024)"), R, None, 1024, None, id="moonbeam-frontier"),
    pytest.param(e(-32000, "query must be smaller than size 1024"), R, None, 1024, None, id="harmony"),
    pytest.param(e(-32012, "requested range too large"), R, None, None, None, id="arc-32012"),
    pytest.param(e(-32000, "block range is bigger than maxBlockRange"), R, None, None, None, id="scroll"),
    pytest.param(
        # Infura documents the 10 s query limit as "narrow the range": range, not rate, despite -32005
        e(-32005, "query timeout exceeded"), R, None, None, None, id="infura-query-timeout-32005",
    ),
    # --- rate limits --------------------------------------------------------------------------
    pytest.param(
        # Infura (nimbus-eth2 #1632): -32005 rate limit, backoff in data
        e(-32005, "daily request count exceeded, request rate limited",
          {"rate": {"allowed_rps": 1, "backoff_seconds": 30, "current_rps": 1.27}, "see": "https://infura.io/dashboard"}),
        L, None, None, None, id="infura-daily-32005",
    ),
    pytest.param(e(-32005, "project ID request rate exceeded"), L, None, None, None, id="infura-rate-32005"),
    pytest.param(e(-32005, "rate limit exceeded"), L, None, None, None, id="tenderly-32005"),
    pytest.param(
        # Alchemy (latticexyz/mud #1522): code 429 inside the JSON-RPC error, also in batch items
        e(429, "Your app has exceeded its compute units per second capacity. If you have retries enabled, you can "
               "safely ignore this message. If not, check out https://docs.alchemy.com/reference/throughput"),
        L, None, None, None, id="alchemy-cu",
    ),
    pytest.param(
        # QuickNode (foundry #4894)
        e(-32007, "100/second request limit reached - reduce calls per second or upgrade your account at quicknode.com"),
        L, None, None, None, id="quicknode-rps",
    ),
    pytest.param(e(-32012, "credits limited to 6000/sec"), L, None, None, None, id="quicknode-credits"),
    pytest.param(
        # Ankr / Polygon public RPC
        e(-32090, "Too many requests, reason: call rate limit exhausted, retry in 10s"), L, None, None, None,
        id="ankr-rate",
    ),
    pytest.param(
        # Base public node (base/node #368): proxyd's answer wrapped in -32000
        e(-32000, '429 Too Many Requests: {"jsonrpc":"2.0","error":{"code":-32016,"message":"over rate limit"},"id":1}\n'),
        L, None, None, None, id="base-wrapped-429",
    ),
    pytest.param(e(-32016, "over rate limit"), L, None, None, None, id="proxyd-over-rate-limit"),
    pytest.param(e(-32029, "Too many requests"), L, None, None, None, id="code-32029"),
    pytest.param(e(-32000, "exceeded the quota usage"), L, None, None, None, id="quota"),
    # --- transient ------------------------------------------------------------------------------
    pytest.param(e(-32000, "header not found"), T, None, None, None, id="geth-header-not-found"),
    pytest.param(e(-32000, "unknown block"), T, None, None, None, id="geth-unknown-block"),
    pytest.param(
        # geth (execution-apis test): toBlock above the node's head = a lagging node
        e(-32602, "block range extends beyond current head block"), T, None, None, None, id="geth-beyond-head",
    ),
    pytest.param(
        # anvil mid-reorg / lagging
        e(-32602, "BlockOutOfRangeError: block height is 10 but requested was 12"), T, None, None, None,
        id="anvil-out-of-range",
    ),
    pytest.param(e(-32001, "Resource not found"), T, None, None, None, id="anvil-block-not-found"),
    pytest.param(e(-32019, "block is out of range"), T, None, None, None, id="proxyd-block-out-of-range"),
    pytest.param(e(-32014, "block not yet imported"), T, None, None, None, id="block-not-yet-imported"),
    pytest.param(e(-32011, "no backend is currently healthy to serve traffic"), T, None, None, None, id="base-no-backend"),
    pytest.param(e(-32603, "Internal error: request timed out"), T, None, None, None, id="internal-timeout"),
    pytest.param(e(-32000, "execution timeout"), T, None, None, None, id="execution-timeout"),
    pytest.param(e(-32603, "internal error"), T, None, None, None, id="internal-error"),
    # --- permanent ------------------------------------------------------------------------------
    pytest.param(e(-32601, "the method eth_foo does not exist/is not available"), P, None, None, None, id="geth-method"),
    pytest.param(e(-32601, "Method not found"), P, None, None, None, id="method-not-found"),
    pytest.param(e(-32602, "invalid argument 0: hex string without 0x prefix"), P, None, None, None, id="invalid-params"),
    pytest.param(e(-32000, "invalid block range params"), P, None, None, None, id="geth-from-after-to"),
    pytest.param(e(-32000, "exceed max topics"), P, None, None, None, id="geth-max-topics"),
    pytest.param(e(-32000, "exceed max addresses or topics per search position"), P, None, None, None,
                 id="geth-max-addresses"),
    pytest.param(e(3, "execution reverted: Ownable: caller is not the owner"), P, None, None, None, id="reverted"),
    pytest.param(e(-32000, "missing trie node 1a2b (path ) state 0x1a2b is not available"), P, None, None, None,
                 id="pruned-state"),
    pytest.param(e(-32603, "Required data unavailable"), P, None, None, None, id="anvil-prune-history"),
    pytest.param(e(-32002, "invalid project id"), P, None, None, None, id="infura-bad-key"),
    pytest.param(e(-32000, "Must be authenticated!"), P, None, None, None, id="alchemy-no-key"),
    pytest.param(e(-32000, "chain id mismatch"), P, None, None, None, id="chain-id-mismatch"),
    pytest.param(e(-32005, "Number of requests exceeds max batch size"), P, None, None, None, id="besu-batch-32005"),
    pytest.param(e(-32005, "Transaction gas limit exceeds block gas limit"), P, None, None, None, id="besu-gas-32005"),
    pytest.param(e(-32600, 'Too many ["eth_getLogs"] methods in the batch'), P, None, None, None, id="gnosis-batch"),
    pytest.param(e(-32602, "some parameter is wrong"), P, None, None, None, id="unknown-32602"),
]


@pytest.mark.parametrize(("err", "kind", "suggested", "span", "results"), RPC_CASES)
def test_rpc_error_table(err, kind, suggested, span, results):
    info = classify_rpc_error(err)
    assert info.kind is kind, info.message
    assert info.suggested_range == suggested
    assert info.max_block_span == span
    assert info.max_results == results
    assert info.code == err["code"]
    assert info.recognized
    assert "http" not in info.message.lower()


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        # range, not rate: the text says so
        (e(-32005, "query returned more than 10000 results"), R),
        (e(-32005, "please limit the query to at most 1000 blocks"), R),
        (e(-32005, "Requested range exceeds maximum RPC range limit"), R),
        (e(-32005, "Too many logs requested. Max logs per response is 1."), R),
        (e(-32005, "Maximum allowed number of requested blocks is 1000"), R),
        (e(-32005, "query timeout exceeded"), R),
        # rate, not range
        (e(-32005, "daily request count exceeded, request rate limited"), L),
        (e(-32005, "rate limit exceeded"), L),
        (e(-32005, "Your app has exceeded its compute units per second capacity"), L),
    ],
)
def test_32005_is_decided_by_text_both_ways(err, kind):
    info = classify_rpc_error(err)
    assert info.kind is kind
    assert not info.ambiguous


@pytest.mark.parametrize("message", ["limit exceeded", "Request exceeds defined limit", ""])
def test_32005_without_telling_text_is_an_ambiguous_rate_limit(message):
    # BSC dataseed answers "limit exceeded" even to one-block eth_getLogs; EIP-1474's text is no better.
    info = classify_rpc_error(e(-32005, message))
    assert info.kind is L
    assert info.ambiguous


def test_32005_over_http_429_is_a_rate_limit_even_with_range_like_text():
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(-32005, "query returned more than 10000 results")})
    assert classify_http(429, {}, body).kind is L
    assert classify_http(200, {}, body).kind is R


@pytest.mark.parametrize("code", [12345, -32000, -32099, None])
def test_unrecognized_error_is_transient_and_flagged(code):
    info = classify_rpc_error(e(code, "the flux capacitor is misaligned"))
    assert info.kind is T
    assert not info.recognized
    assert info.retryable
    assert "unrecognized" in info.message


def test_error_shapes_are_tolerated():
    assert classify_rpc_error("header not found").kind is T
    assert classify_rpc_error({"code": "-32005", "message": "rate limit exceeded"}).code == -32005
    assert classify_rpc_error({"message": None}).kind is T
    assert classify_rpc_error(None).kind is T
    assert classify_rpc_error({"code": True, "message": "x"}).code is None


def test_timeouts_are_flagged():
    assert classify_rpc_error(e(-32603, "Internal error: request timed out")).timeout
    assert classify_rpc_error(e(-32005, "query timeout exceeded")).timeout
    assert not classify_rpc_error(e(-32000, "header not found")).timeout


# --- retry-after ---------------------------------------------------------------------------------

NOW = 1_700_000_000.0


def test_retry_after_seconds_header():
    info = classify_http(429, {"Retry-After": "7"}, "")
    assert info.kind is L and info.retry_after == 7.0 and info.http_status == 429


def test_retry_after_http_date_header():
    date = formatdate(NOW + 120, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:15:20 GMT"
    info = classify_http(429, {"retry-after": date}, "", now=NOW)
    assert info.retry_after == pytest.approx(120.0)


def test_retry_after_header_beats_body_hint():
    body = json.dumps({"error": e(-32005, "daily request count exceeded, request rate limited",
                                  {"rate": {"backoff_seconds": 30}})})
    assert classify_http(429, {"Retry-After": "2"}, body).retry_after == 2.0
    assert classify_http(429, {}, body).retry_after == 30.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("", None), (None, None),
     (formatdate(NOW - 60, usegmt=True), 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Too many requests, reason: call rate limit exhausted, retry in 10m0s", 600.0),  # Ankr
        ("Too many requests, reason: call rate limit exhausted, retry in 10s", 10.0),
        ("rate limited, try again in 1 second", 1.0),
        ("rate limit exceeded, retry after 250ms", 0.25),
    ],
)
def test_retry_after_from_message(message, seconds):
    info = classify_rpc_error(e(-32090, message))
    assert info.kind is L
    assert info.retry_after == pytest.approx(seconds)


def test_retry_after_header_applies_to_rate_limits_in_other_statuses():
    body = json.dumps({"error": e(-32090, "Too many requests, reason: call rate limit exhausted")})
    info = classify_http(503, {"Retry-After": "4"}, body)
    assert info.kind is L and info.retry_after == 4.0


# --- HTTP statuses ---------------------------------------------------------------------------------

HTTP_CASES = [
    pytest.param(429, "", L, id="429-empty"),
    pytest.param(401, "Unauthorized", P, id="401"),
    pytest.param(403, "<html>Forbidden</html>", P, id="403"),
    pytest.param(403, json.dumps(e(-32090, "Too many requests, reason: call rate limit exhausted")), L,
                 id="403-with-rate-limit-body"),
    pytest.param(404, "404 page not found", P, id="404"),
    pytest.param(405, "Method Not Allowed", P, id="405"),
    pytest.param(402, "", P, id="402"),
    pytest.param(301, "", P, id="redirect"),
    pytest.param(408, "", T, id="408"),
    pytest.param(425, "", T, id="425"),
    pytest.param(500, "", T, id="500-empty"),
    pytest.param(502, "<html><head><title>502 Bad Gateway</title></head></html>", T, id="502-html"),
    pytest.param(503, '{"message":"Service is not available"}', T, id="503-json-non-rpc"),
    pytest.param(504, "", T, id="504"),
    pytest.param(520, "", T, id="cloudflare-520"),
    # proxyd sends its JSON-RPC errors with these statuses
    pytest.param(500, json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(-32020, "backend response too large")}), R,
                 id="500-proxyd-response-too-large"),
    pytest.param(503, json.dumps({"jsonrpc": "2.0", "id": 1,
                                  "error": e(-32018, "backend is currently not healthy to serve traffic")}), T,
                 id="503-proxyd-not-healthy"),
    pytest.param(413, "<html><title>413 Request Entity Too Large</title></html>", R, id="413-html"),
    pytest.param(413, json.dumps(e(-32614, "eth_getLogs is limited to a 10,000 range")), R, id="413-quicknode"),
    pytest.param(413, json.dumps({"error": e(-32021, "request body too large")}), P, id="413-proxyd-request-body"),
    pytest.param(400, json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(-32602, "query exceeds max block range 100000")}),
                 R, id="400-jsonrpc-range"),
    pytest.param(400, json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(-32601, "Method not found")}), P,
                 id="400-jsonrpc-method"),
    pytest.param(400, '{"error":"block range too large"}', R, id="400-error-string"),
    pytest.param(400, "Bad Request", P, id="400-text"),
    pytest.param(200, json.dumps([{"jsonrpc": "2.0", "id": 1, "error": e(429, "Your app has exceeded its compute units per "
                                                                               "second capacity.")}]), L,
                 id="200-batch-item-429"),
    pytest.param(200, "<html>challenge</html>", T, id="200-html"),
]


@pytest.mark.parametrize(("status", "body", "kind"), HTTP_CASES)
def test_http_table(status, body, kind):
    info = classify_http(status, {}, body)
    assert info.kind is kind, info.message
    assert info.http_status == status


def test_http_400_jsonrpc_error_keeps_hints():
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(
        -32602, "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no "
                "limit on the response size, or you can request any block range with a cap of 10K logs in the "
                "response. Based on your parameters and the response size limit, this block range should work: "
                "[0x0, 0xd043b8]")})
    info = classify_http(400, {}, body)
    assert info.kind is R
    assert info.suggested_range == (0, 0xD043B8)
    assert info.code == -32602


def test_http_truncated_body_still_classified():
    # The client passes only the first 2000 bytes of an error body.
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(
        -32602, "query exceeds max results 20000, retry with the range 50784086-50785570", {"pad": "x" * 3000})})[:200]
    info = classify_http(400, {}, body)
    assert info.kind is R
    assert info.suggested_range == (50784086, 50785570)


def test_http_headers_lookup_is_case_insensitive_for_plain_dicts():
    assert classify_http(429, {"RETRY-AFTER": "5"}, "").retry_after == 5.0
    assert classify_http(429, None, "").retry_after is None


def test_http_auth_message_names_the_fix():
    for status in (401, 403):
        assert "API key" in classify_http(status, {}, "").message
    assert "RPC URL" in classify_http(404, {}, "").message


# --- no URL (API key) in any message --------------------------------------------------------------

SECRET = "k3yS3cr3tZZ9x7"
URLS = [
    f"https://eth-mainnet.g.alchemy.com/v2/{SECRET}",
    f"https://mainnet.infura.io/v3/{SECRET}",
    f"wss://example.quiknode.pro/{SECRET}/",
    f"mainnet.infura.io/v3/{SECRET}",
    f"https://user:{SECRET}@rpc.example.org:8545/path",
    f"https://rpc.example.org/?apikey={SECRET}",
    f"http://127.0.0.1:8545/{SECRET}",
]


@pytest.mark.parametrize("url", URLS)
def test_no_url_in_rpc_messages(url):
    for kind_text in ("block range too large", "rate limit exceeded", "header not found", "something new"):
        info = classify_rpc_error(e(-32000, f"{kind_text} (upstream {url})", {"host": url, "request": url}))
        assert SECRET not in info.message
        assert "://" not in info.message


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 413, 429, 500, 502])
def test_no_url_in_http_messages(url, status):
    bodies = [
        f"<html>error at {url}</html>",
        json.dumps({"jsonrpc": "2.0", "id": 1, "error": e(-32000, f"failed to reach {url}", {"url": url})}),
        json.dumps({"error": e(-32005, "query returned more than 10000 results", {"host": url})}),
    ]
    for body in bodies:
        info = classify_http(status, {"Location": url}, body)
        assert SECRET not in info.message
        assert "://" not in info.message


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=16, max_size=40),
    prefix=st.sampled_from(["https://", "http://", "wss://", ""]),
    host=st.sampled_from(["eth-mainnet.g.alchemy.com/v2/", "mainnet.infura.io/v3/", "x.quiknode.pro/", "rpc.ankr.com/eth/"]),
    message=st.sampled_from(["Cannot connect to host {u}", "bad response from {u}: 502", "{u} said: limit exceeded"]),
)
def test_redaction_property(key, prefix, host, message):
    url = prefix + host + key
    text = message.format(u=url)
    assert key not in redact(text)
    assert key not in classify_rpc_error(e(-32000, text)).message
    assert key not in classify_http(502, {}, text).message
    assert key not in classify_exception(OSError(text)).message


def test_redact_keeps_useful_text_and_bounds_length():
    assert redact("query returned more than 10000 results") == "query returned more than 10000 results"
    assert redact("exceed maximum block range: 5000") == "exceed maximum block range: 5000"
    assert "<redacted>" in redact("invalid api_key=abcdef123")
    assert len(redact("x" * 10_000)) <= 240


# --- exceptions ------------------------------------------------------------------------------------


class ServerDisconnectedError(Exception):  # aiohttp classes are matched by name
    pass


class ClientConnectorCertificateError(Exception):
    pass


def test_builtin_exceptions():
    cases = [
        (TimeoutError(), T, True),
        (TimeoutError("read timeout"), T, True),
        (ConnectionResetError(104, "Connection reset by peer"), T, False),
        (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 8545)"), T, False),
        (BrokenPipeError(), T, False),
        (OSError(101, "Network is unreachable"), T, False),
        (json.JSONDecodeError("Expecting value", '{"result": [', 12), T, False),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), T, False),
        (ValueError("JSON-RPC response without result"), T, False),
        (ssl.SSLCertVerificationError("certificate verify failed"), P, False),
        (ssl.SSLEOFError(), T, False),
        (ServerDisconnectedError("Server disconnected"), T, False),
        (ClientConnectorCertificateError("Cannot connect to host x.io:443"), P, False),
    ]
    for exc, kind, timeout in cases:
        info = classify_exception(exc)
        assert info.kind is kind, (exc, info)
        assert info.timeout is timeout, (exc, info)
        assert info.recognized


def test_orjson_decode_error_is_transient():
    orjson = pytest.importorskip("orjson")
    with pytest.raises(orjson.JSONDecodeError) as exc_info:
        orjson.loads(b'{"jsonrpc":"2.0","id":1,"result":[{"address":"0x')
    assert classify_exception(exc_info.value).kind is T


def test_aiohttp_exceptions():
    aiohttp = pytest.importorskip("aiohttp")
    yarl = pytest.importorskip("yarl")
    multidict = pytest.importorskip("multidict")
    assert classify_exception(aiohttp.ServerDisconnectedError()).kind is T
    timeout = classify_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
    assert timeout.kind is T and timeout.timeout
    assert classify_exception(aiohttp.ClientPayloadError("Response payload is not completed")).kind is T
    bad_url = classify_exception(aiohttp.InvalidURL(f"https://mainnet.infura.io/v3/{SECRET}"))
    assert bad_url.kind is P and SECRET not in bad_url.message

    url = yarl.URL(f"https://eth-mainnet.g.alchemy.com/v2/{SECRET}")
    request_info = aiohttp.RequestInfo(url, "POST", multidict.CIMultiDictProxy(multidict.CIMultiDict()), url)
    limited = aiohttp.ClientResponseError(
        request_info, (), status=429, message="Too Many Requests",
        headers=multidict.CIMultiDictProxy(multidict.CIMultiDict({"Retry-After": "3"})),
    )
    info = classify_exception(limited)
    assert info.kind is L and info.retry_after == 3.0 and SECRET not in info.message
    denied = classify_exception(aiohttp.ClientResponseError(request_info, (), status=401, message="Unauthorized"))
    assert denied.kind is P and SECRET not in denied.message


def test_cancellation_is_not_retryable_and_unknown_is_transient():
    assert classify_exception(asyncio.CancelledError()).kind is P
    unknown = classify_exception(RuntimeError("weird"))
    assert unknown.kind is T and not unknown.recognized


def test_rpc_error_carries_info_and_pickles():
    info = classify_rpc_error(e(-32005, "limit exceeded"))
    err = RpcError(info, method="eth_getLogs")
    assert err.info is info and err.method == "eth_getLogs" and err.kind is L
    assert classify_exception(err) is info
    again = pickle.loads(pickle.dumps(err))
    assert again.info == info and again.method == "eth_getLogs" and str(again) == str(err)
    assert str(RpcError(RpcErrorInfo(P, "boom"))) == "permanent: boom"
