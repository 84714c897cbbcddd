"""Reorg handling: durable per-chain state (local chain window, reorg ledger, cursors, writer lock)."""
