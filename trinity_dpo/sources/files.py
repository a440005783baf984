"""Rows from where the user keeps them: a .json/.jsonl file (gzip-compressed too), a .parquet file, a Hugging Face
dataset folder (a card with `configs`, or data files the `datasets` library recognises, compressed or not), or a
hub dataset id resolved through the Hugging Face cache (`hub.py`). Rows come back as dicts, in file order.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, one_line

_SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _suffix(path: Path) -> str:
    """'.jsonl' for rows.jsonl and rows.jsonl.gz alike."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_rows(path: str, split: str = "train", subset: str | None = None,
              key: str = "buffer.trainer_input.experience_buffer") -> list[dict[str, Any]]:
    """All rows of the file or folder at `path`; `key` names the config section in errors.

    JSON files are parsed here rather than by `datasets`: Arrow would fill a missing key with null and refuse a
    column that mixes text and numbers, hiding exactly the rows a user needs named.
    """
    p = Path(path)
    if _suffix(p) in (".json", ".jsonl") and p.is_file():
        return _read_json(p)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local folder must never reach for a hub
    import datasets

    datasets.disable_progress_bars()
    if p.is_dir():
        return _read_folder(p, split, subset, key)
    if _suffix(p) not in _SUFFIX_BUILDERS:
        raise DataError(f"{path}: unsupported data file type {''.join(p.suffixes)!r}; use .json, .jsonl (either "
                        "may be .gz), .parquet or a dataset folder")
    try:
        return datasets.load_dataset(_SUFFIX_BUILDERS[_suffix(p)], data_files=str(p), split="train").to_list()
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read data: {one_line(e)}") from None


def _read_folder(p: Path, split: str, subset: str | None, key: str) -> list[dict[str, Any]]:
    import datasets

    try:
        configs = datasets.get_dataset_config_names(str(p))
    except Exception as e:
        raise DataError(f"{key}.path: {p}: cannot read the dataset folder: {one_line(e)}") from None
    if subset is None and len(configs) > 1:
        raise DataError(f"{key}.subset_name is needed: the dataset folder {p} has several configs "
                        f"({', '.join(configs)}); name one")
    if subset is not None and subset not in configs:
        raise DataError(f"{key}.subset_name: {subset!r} is not a config of {p} (it has: {', '.join(configs)})")
    try:
        splits = datasets.get_dataset_split_names(str(p), subset)
    except Exception as e:
        raise DataError(f"{key}.path: {p}: cannot read the dataset folder: {one_line(e)}") from None
    if split not in splits:
        raise DataError(f"{key}.split: the dataset folder {p} has no split {split!r} (it has: {', '.join(splits)})")
    try:
        return datasets.load_dataset(str(p), name=subset, split=split).to_list()
    except Exception as e:
        raise DataError(f"{key}.path: {p}: cannot read data: {one_line(e)}") from None


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {one_line(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8") from None
    if _suffix(path) == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON: {e.msg}") from None
    else:  # JSON lines, also when a .json file holds one object per line
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: malformed JSON: {e.msg}") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n}: expected an object with keys, got {type(row).__name__}")
    return rows
