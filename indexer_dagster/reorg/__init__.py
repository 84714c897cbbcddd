"""Reorg detection (a pure decision over headers) and the guard every publisher of a chain's files takes."""
