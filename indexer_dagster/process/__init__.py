"""Derived tables computed from the decoded event tables (pure functions: frames in, frames out)."""
