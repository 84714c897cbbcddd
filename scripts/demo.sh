#!/usr/bin/env bash
# `make demo`: a local chain with real Uniswap V2 traffic, a backfill through Dagster, example
# queries, then the Dagster UI (left running; Ctrl-C stops the UI and the chain).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
INDEXER=("$PY" -m indexer_dagster.cli)
DEVNET_DIR="${DEVNET_DIR:-$ROOT/.devnet}"
DEVNET_PORT="${DEVNET_PORT:-8545}"
UI_PORT="${UI_PORT:-3000}"
export DAGSTER_HOME="${DAGSTER_HOME:-$ROOT/.dagster_home}"
mkdir -p "$DAGSTER_HOME" "$DEVNET_DIR"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp "$ROOT/deploy/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"

rm -f "$DEVNET_DIR/indexer.yaml"
echo "== 1. devnet: anvil on port $DEVNET_PORT, real Uniswap V2 contracts, traffic"
"${INDEXER[@]}" devnet --out "$DEVNET_DIR" --port "$DEVNET_PORT" --blocks "${DEMO_BLOCKS:-400}" \
  --txs-per-block "${DEMO_TXS:-20}" --state-cache "$ROOT/.devnet-cache" > "$DEVNET_DIR/devnet.log" 2>&1 &
DEVNET_PID=$!
cleanup() {
  set +e  # a process already gone is not an error here
  # The live traffic, any run Dagster launched that outlived `dagster dev`, then the chain
  # (background jobs ignore Ctrl-C, so they get SIGTERM; the devnet stops anvil on it).
  [ -n "${LIVE_PID:-}" ] && kill "$LIVE_PID" 2>/dev/null
  pkill -f "$ROOT/.venv/bin/python3 -m dagster api execute_run" 2>/dev/null
  kill "$DEVNET_PID" 2>/dev/null
  wait "$DEVNET_PID" 2>/dev/null
  true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ -f "$DEVNET_DIR/indexer.yaml" ] && grep -q "ready" "$DEVNET_DIR/devnet.log" 2>/dev/null && break
  kill -0 $DEVNET_PID 2>/dev/null || { cat "$DEVNET_DIR/devnet.log"; exit 1; }
  sleep 0.5
done
cat "$DEVNET_DIR/devnet.log"
export INDEXER_CONFIG="$DEVNET_DIR/indexer.yaml"

echo
echo "== 2. backfill every block through Dagster (runs recorded in $DAGSTER_HOME)"
rm -rf "$DEVNET_DIR/data"
"${INDEXER[@]}" backfill --workers 2

q() { echo; echo "\$ indexer query \"$1\""; "${INDEXER[@]}" query "$1"; }
echo
echo "== 3. example queries (read-only DuckDB views over the Parquet lake)"
q "select status, count(*) as blocks, min(number) as first, max(number) as last from blocks group by status order by first"
q "select address as pool, count(*) as swaps, sum(amount0_in_num) as amount0_in, sum(amount1_in_num) as amount1_in from uniswap_v2_pair_swap group by address order by swaps desc"
q "select block_number, address as pair, reserve0, reserve1, status from uniswap_v2_pair_sync order by block_number desc, log_index desc limit 5"
q "select token0, token1, pair, block_number from uniswap_v2_factory_pair_created order by block_number, log_index"
echo
echo "== DEX tables (derived from the canonical events)"
q "select pair, pool, reserve0_h, reserve1_h, price, last_block, status from pool_state order by pool"
q "select pair, count(*) as swaps, sum(amount0_in_h) as token0_in, sum(amount1_in_h) as token1_in from swaps group by pair order by swaps desc"
q "select pair, interval, bucket_start, swap_count, volume_token0_h, volume_token1_h from pool_volume where interval = '1h' order by bucket_start desc, swap_count desc limit 6"
q "select pair, bucket_start, open, high, low, close, swap_count from pool_candles where interval = '1h' order by bucket_start desc limit 6"

echo
echo "== 4. live sync: Dagster (UI + daemon) on http://127.0.0.1:$UI_PORT follows the head by itself;"
echo "      a block of traffic every 2 s, and a reorg in ~40 s, detected and repaired (see the reorgs view)."
echo "      Ctrl-C stops everything."
echo "      (Dagster's own log: $DEVNET_DIR/dagster.log)"
"$PY" "$ROOT/scripts/demo_live.py" "$DEVNET_DIR" &
LIVE_PID=$!
# In the foreground, so Ctrl-C stops the UI and the daemon the way Dagster expects.
"$ROOT/.venv/bin/dagster" dev -w "$ROOT/workspace.yaml" -p "$UI_PORT" > "$DEVNET_DIR/dagster.log" 2>&1
