"""A reward model's optional `margin` column (TRL's name): how much the chosen answer should outscore the rejected
one, subtracted inside the loss (`objective/reward.py`).

The token table keeps token ids only, so the column is read from the source's rows on its own, by row number (the
numbering the table's `rows` use), and kept beside the table as a float32 file that later runs read instead; without
the column every margin is 0, which is TRL's loss without a margin exactly. Either every kept pair has a number
there or none has the column: a pair without one would silently train without its margin.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np

from ..config.schema import StorageConfig
from ..errors import DataError
from ..sources.files import iter_rows
from .examples import Examples

log = logging.getLogger(__name__)

COLUMN = "margin"


def attach(examples: Examples, storage: StorageConfig, key: str) -> None:
    """Give `examples` (read from `storage`, the config section `key`) their margins: `examples.margins`, float32
    [n], or None where the source has no margin column."""
    if not len(examples):
        return
    by_row = _by_row(examples.table.folder, storage, key)
    if by_row is None:
        return
    rows = np.asarray(examples.table.rows)[examples.entries]
    values = by_row[rows - 1]
    missing = np.flatnonzero(np.isnan(values))
    if len(missing):
        raise DataError(f"{storage.path}: row {int(rows[missing[0]])} has no '{COLUMN}' while other rows have one "
                        f"({len(missing)} of {len(rows)} pairs lack it); give every row a margin, or none")
    examples.margins = values.astype(np.float32)
    log.info("%s: the '%s' column read for %d pairs (mean %.4g)", storage.path, COLUMN, len(values),
             float(values.mean()))


def _by_row(table_folder: Path, storage: StorageConfig, key: str) -> np.ndarray | None:
    """Every source row's margin (NaN: none), index row - 1; None when no row has the column. Kept as
    `<token cache>/margins/<table>.npy` (an empty array: no column), a function of the table's key."""
    memo = table_folder.parent / "margins" / f"{table_folder.name}.npy"
    if memo.is_file():
        found = np.load(memo)
        return found if len(found) else None
    chunks, n = [], 0  # a float64 array per chunk of rows: no Python float per row held for the whole source
    for rows in iter_rows(storage.path, storage.split, storage.subset_name, key):
        chunks.append(np.fromiter((_value(row, n + k, storage.path) for k, row in enumerate(rows, 1)), np.float64,
                                  count=len(rows)))
        n += len(rows)
    found = np.concatenate(chunks) if chunks else np.zeros(0)
    if np.isnan(found).all():
        found = found[:0]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:  # a file object: np.save would add .npy to the temporary name
        np.save(fh, found)
    os.replace(tmp, memo)  # several processes may write it: the same bytes, each renamed whole
    return found if len(found) else None


def _value(row, number: int, path: str) -> float:
    value = row.get(COLUMN) if isinstance(row, dict) else None
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{path}: row {number}: '{COLUMN}' must be a finite number, got {value!r}")
    return float(value)
