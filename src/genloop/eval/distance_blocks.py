"""How a pairwise-distance computation is split into blocks, so that its memory stays bounded
whatever the size of the bank it is measured against."""

from __future__ import annotations

BLOCK_VALUES = 1 << 25  # distances in one block: 128 MB of float32
# Bank rows torch.cdist sees at once. Its matrix-multiply path builds a squared copy and a padded
# copy of the whole bank per call: against the 844k x 128 training features of a 1M corpus that
# was 0.71 GB on top of the 0.43 GB bank, for every block of query rows.
BANK_ROWS = 1 << 16


def block_rows(bank_rows: int, most: int) -> int:
    """Query rows per block against `bank_rows` others: `most` (the block size that was always used
    for small banks), fewer when the block would hold more than BLOCK_VALUES distances."""
    return max(1, min(most, BLOCK_VALUES // max(1, bank_rows)))
