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
        # int32 (a table holds far fewer than 2^31 entries and an example far fewer tokens): every process holds
        # these, 8 bytes an example for a million examples instead of 16; rows are read from the shared table.
        self.table, self.entries, self.kind = table, np.asarray(entries, np.int32), kind
        lengths = np.asarray(table.spans[self.entries][:, :, 1]) if len(self.entries) else np.zeros((0, 3), np.int64)
        # A pair's two sequences each hold the prompt (chosen and rejected are separate rows).
        n_tokens = (2 * lengths[:, 0] + lengths[:, 1:].sum(1)) if kind == "pairs" else lengths.sum(1)
        self.n_tokens = n_tokens.astype(np.int32)
        self._longest = int(lengths.sum(1).max()) if len(self.entries) else 0
        self.margins: np.ndarray | None = None  # float32 [n]: a reward model's margin column (`margins.attach`)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Pair | SftExample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        e, t = int(self.entries[i]), self.table
        if self.kind == "pairs":
            margin = 0.0 if self.margins is None else float(self.margins[i])
            return Pair(i, int(t.rows[e]), t.segment(e, 0), t.segment(e, 1), t.segment(e, 2), margin)
        return SftExample(i, int(t.rows[e]), t.segment(e, 0), t.segment(e, 1), t.segment_mask(e, 1))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """What these examples hold: the table's key and checksums, and which of its entries, in order."""
        h = hashlib.blake2b(self.table.folder.name.encode(), digest_size=16)
        h.update(json.dumps(self.table.meta["checksums"], sort_keys=True).encode())
        h.update(self.entries.astype(np.int64).tobytes())  # as int64, which earlier caches were keyed by
        return h.hexdigest()

    def target_counts(self) -> np.ndarray:
        """[n, sequences] trained tokens of each example's sequences: a pair's chosen and rejected response
        lengths; an SFT row's masked-in tokens (read from the mask array, row by row)."""
        spans = np.asarray(self.table.spans[self.entries])
        if self.kind == "pairs":
            return spans[:, 1:, 1].astype(np.int64)
        mask = self.table.mask
        return np.array([[int(mask[s:s + n].sum())] for s, n in spans[:, 1]], np.int64).reshape(-1, 1)

    def longest(self) -> int:
        """The most tokens of one example, a shared prompt counted once (the memory check's bound)."""
        return self._longest
