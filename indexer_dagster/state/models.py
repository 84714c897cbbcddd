"""The state store's types: local-chain headers, reorg phases and records, and its errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class Header:
    """A block header as the local chain keeps it. Hashes are normalized to lower-case 0x hex."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "number", int(self.number))
        object.__setattr__(self, "timestamp", int(self.timestamp))
        object.__setattr__(self, "hash", str(self.hash).lower())
        object.__setattr__(self, "parent_hash", str(self.parent_hash).lower())

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "hash": self.hash, "parent_hash": self.parent_hash, "timestamp": self.timestamp}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Header:
        return cls(int(d["number"]), d["hash"], d["parent_hash"], int(d["timestamp"]))


def as_header(h: Header | Mapping[str, Any]) -> Header:
    return h if isinstance(h, Header) else Header.from_dict(h)


class Phase(str, Enum):
    DETECTED = "detected"
    SUSPENDING = "suspending"
    ROLLING_BACK = "rolling_back"
    RESTORING = "restoring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED)


FINISHED_SQL = "('done', 'failed')"  # must match Phase.finished; used in the partial unique index


@dataclass
class Reorg:
    """One row of the reorg ledger (a durable reorg context)."""

    id: int
    chain: str
    detected_at: datetime
    common_ancestor: int
    ancestor_hash: str
    depth: int  # old_head - common_ancestor
    old_head: int
    old_head_hash: str
    new_head: int
    new_head_hash: str
    new_chain: list[Header]  # the new fork, common_ancestor+1 .. new_head, as seen at detection
    phase: Phase
    affected_partitions: list[str]
    rows_archived: dict[str, int]
    touched_confirmed: bool
    updated_at: datetime
    finished_at: datetime | None
    note: str = ""

    @property
    def finished(self) -> bool:
        return self.phase.finished


@dataclass(frozen=True)
class Halt:
    """A chain stopped for an operator: no writer touches its files until `indexer resume`."""

    chain: str
    reason: str  # what happened and the way out
    reorg_id: int | None
    halted_at: datetime


class StateError(Exception):
    """Base class of the state store's errors."""


class ChainHalted(StateError):
    """A writer refused: the chain is halted for an operator (see `Halt`)."""

    def __init__(self, halt: Halt) -> None:
        super().__init__(
            f"chain {halt.chain!r} is halted since {halt.halted_at:%Y-%m-%d %H:%M:%S} UTC: {halt.reason} "
            f"(nothing is written until `indexer resume --chain {halt.chain}`)"
        )
        self.halt = halt


class StateConnectionError(StateError):
    """The state database could not be reached (the message never contains a password)."""


class ReorgNotFound(StateError, LookupError):
    def __init__(self, reorg_id: int) -> None:
        super().__init__(f"reorg {reorg_id} does not exist")
        self.reorg_id = reorg_id


class StaleReorgPhase(StateError):
    """`set_phase(..., expect=X)` found the reorg in another phase (another process moved it)."""

    def __init__(self, reorg_id: int, expected: Phase, actual: Phase) -> None:
        super().__init__(f"reorg {reorg_id} is in phase {actual.value!r}, expected {expected.value!r}")
        self.reorg_id = reorg_id
        self.expected = expected
        self.actual = actual


class ReorgFinished(StateError):
    """A finished reorg (phase done or failed) cannot change phase or be extended."""

    def __init__(self, reorg_id: int, phase: Phase, action: str) -> None:
        super().__init__(f"reorg {reorg_id} is finished (phase {phase.value!r}); cannot {action}")
        self.reorg_id = reorg_id
        self.phase = phase


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def check_chain_range(headers: Sequence[Header], ancestor: int, new_head: int) -> None:
    for h in headers:
        if not ancestor < h.number <= new_head:
            raise ValueError(
                f"new_chain header {h.number} is outside common_ancestor+1..new_head ({ancestor + 1}..{new_head})"
            )


def sorted_unique(headers: Sequence[Header]) -> list[Header]:
    by_number: dict[int, Header] = {}
    for h in headers:
        by_number[h.number] = h  # the last one given for a number wins
    return [by_number[n] for n in sorted(by_number)]
