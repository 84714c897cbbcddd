"""Fixed-width block ranges and their zero-padded partition keys ("000000010000-000000019999").

Zero padding makes keys sort like the blocks they hold; Dagster's dynamic partitions keep
insertion order, so keys are always added in ascending order.
"""

import re
from dataclasses import dataclass

KEY_DIGITS = 12
_KEY = re.compile(r"^(\d{12})-(\d{12})$")


@dataclass(frozen=True, order=True)
class BlockRange:
    start: int
    end: int  # inclusive

    @property
    def key(self) -> str:
        return f"{self.start:0{KEY_DIGITS}d}-{self.end:0{KEY_DIGITS}d}"

    def clip(self, low: int, high: int) -> "BlockRange | None":
        """The part of the range inside [low, high], or None."""
        s, e = max(self.start, low), min(self.end, high)
        return BlockRange(s, e) if s <= e else None

    def __len__(self) -> int:
        return self.end - self.start + 1


def range_for_block(block: int, width: int) -> BlockRange:
    start = (block // width) * width
    return BlockRange(start, start + width - 1)


def ranges_between(first_block: int, last_block: int, width: int) -> list[BlockRange]:
    """The aligned ranges that together cover [first_block, last_block]."""
    if first_block < 0 or last_block < 0:
        raise ValueError(f"block numbers must not be negative (got {first_block}..{last_block})")
    if first_block > last_block:
        raise ValueError(f"--from {first_block} is above --to {last_block}; swap them")
    first = range_for_block(first_block, width).start
    return [BlockRange(s, s + width - 1) for s in range(first, last_block + 1, width)]


def parse_key(key: str) -> BlockRange:
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a block-range key like 000000010000-000000019999")
    r = BlockRange(int(m.group(1)), int(m.group(2)))
    if r.start > r.end:
        raise ValueError(f"{key!r}: start is above end")
    return r
