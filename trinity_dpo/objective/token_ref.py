"""The reference's log-prob of every response token, for a KL term that is not linear in the log-probs (Trinity's
k2, k3, low_var_kl, abs): one float32 file per plan in the run folder's `ref_cache/`, memory-mapped, so a million
pairs' tokens stay on disk and each step reads its own.

Every example's sequences have their place in the file, in example order: `offsets[index, slot]`, for
`counts[index, slot]` tokens. The processes of a run score their own micro-batches and write their examples'
places in the one file (rank 0 sizes it first, under a temporary name; it is renamed when every process is done),
so the values never pass through a collective. Its checksum is kept with the per-sequence tables, which a
damaged file fails: it is then scored again.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.token_cache import checksum  # noqa: F401  (the table's own: one xxh3 reader for both)
from ..errors import RunFolderError


def target_counts(examples, sequences: int) -> np.ndarray:
    """[n, sequences] response tokens of each example's sequences (the token table's arrays where there)."""
    if hasattr(examples, "target_counts"):
        return examples.target_counts()
    return np.array([ex.target_counts() for ex in examples], np.int64).reshape(len(examples), sequences)


class TokenStore:
    """Per-token values of a plan's examples at `path` (see the module docstring), float32."""

    def __init__(self, path: Path, counts: np.ndarray, mode: str = "r"):
        self.path, self.counts = Path(path), np.asarray(counts, np.int64)
        flat = self.counts.reshape(-1)
        self.offsets = (np.cumsum(flat) - flat).reshape(self.counts.shape)
        total = int(flat.sum())
        self.values = np.memmap(self.path, np.float32, mode, shape=(total,)) if total else np.zeros(0, np.float32)

    @classmethod
    def create(cls, path: Path, counts: np.ndarray) -> "TokenStore":
        """A new file of the right size, every value NaN until scored (a use of an unscored place shows)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # The file's blocks reserved first: a mapped file the disk cannot fill kills the process (SIGBUS) with no
        # word, where the reservation fails with the OS's reason.
        with open(path, "wb") as f:
            size = int(np.asarray(counts, np.int64).sum()) * 4
            if size:
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError as e:
                    raise RunFolderError(f"{path}: cannot reserve {size} bytes for the reference's per-token "
                                         f"values ({e.strerror}); free space and run again") from None
        store = cls(path, counts, "r+")
        store.values[:] = np.nan
        store.flush()
        return store

    def _places(self, index: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
        """The file positions of a micro-batch's tokens, in its order: sequence s (slot s // n of example
        `index[s % n]`) in turn, each sequence's tokens in order; `counts` [k * n] its sequences' tokens."""
        index, counts = index.cpu().numpy(), counts.cpu().numpy().astype(np.int64)
        slots = len(counts) // max(len(index), 1)
        rows, cols = np.tile(index, slots), np.repeat(np.arange(slots), len(index))
        if not np.array_equal(counts, self.counts[rows, cols]):
            raise ValueError("a micro-batch's response tokens differ from those the reference scored")
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(self.offsets[rows, cols], counts) + within

    def write(self, index: torch.Tensor, counts: torch.Tensor, values: torch.Tensor) -> None:
        self.values[self._places(index, counts)] = values.detach().float().cpu().numpy()

    def read(self, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The values of a micro-batch's response tokens [N], in `MicroBatch.target_ids` order."""
        return torch.from_numpy(np.asarray(self.values[self._places(index, counts)]))

    def flush(self) -> None:
        if isinstance(self.values, np.memmap):
            self.values.flush()


def tmp_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def publish(path: Path) -> str:
    """Rename the finished temporary file to `path` (a reader never sees a half-written one); its checksum."""
    os.replace(tmp_name(path), path)
    return checksum(path)
