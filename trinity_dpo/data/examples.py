"""A split's examples as a view of a token table: per example a few integers (its entry, its segments' lengths),
its token lists built only when a step (or the reference pass) asks for that example.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .pairs import Pair
from .sft import SftExample
from .token_cache import TokenTable


class Examples:
    """Examples `0..n-1` of one split: entries `entries` of `table` (all kept), as `Pair`s or `SftExample`s whose
    `index` is their position here. `n_tokens` [n]: each example's tokens as the micro-batch plan counts them."""

    def __init__(self, table: TokenTable, entries: np.ndarray, kind: str):
        self.table, self.entries, self.kind = table, np.asarray(entries, np.int64), kind
        lengths = np.asarray(table.spans[self.entries][:, :, 1]) if len(self.entries) else np.zeros((0, 3), np.int64)
        # A pair's two sequences each hold the prompt (chosen and rejected are separate rows).
        self.n_tokens = (2 * lengths[:, 0] + lengths[:, 1:].sum(1)) if kind == "pairs" else lengths.sum(1)
        self.rows = np.asarray(table.rows[self.entries])
        self._longest = int(lengths.sum(1).max()) if len(self.entries) else 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Pair | SftExample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        e, t = int(self.entries[i]), self.table
        if self.kind == "pairs":
            return Pair(i, int(self.rows[i]), t.segment(e, 0), t.segment(e, 1), t.segment(e, 2))
        return SftExample(i, int(self.rows[i]), t.segment(e, 0), t.segment(e, 1), t.segment_mask(e, 1))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """What these examples hold: the table's key and checksums, and which of its entries, in order."""
        h = hashlib.blake2b(self.table.folder.name.encode(), digest_size=16)
        h.update(json.dumps(self.table.meta["checksums"], sort_keys=True).encode())
        h.update(self.entries.tobytes())
        return h.hexdigest()

    def longest(self) -> int:
        """The most tokens of one example, a shared prompt counted once (the memory check's bound)."""
        return self._longest
