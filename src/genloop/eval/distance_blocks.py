"""How many query rows one block of a pairwise-distance computation takes, so that the block's
distance matrix stays a bounded size whatever the size of the bank it is measured against."""

from __future__ import annotations

BLOCK_VALUES = 1 << 25  # distances in one block: 128 MB of float32


def block_rows(bank_rows: int, most: int) -> int:
    """Query rows per block against `bank_rows` others: `most` (the block size that was always used
    for small banks), fewer when the block would hold more than BLOCK_VALUES distances."""
    return max(1, min(most, BLOCK_VALUES // max(1, bank_rows)))
