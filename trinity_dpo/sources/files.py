"""Rows from where the user keeps them: a .json/.jsonl file (gzip-compressed too), a .parquet file, a Hugging Face
dataset folder (a card with `configs`, or data files the `datasets` library recognises, compressed or not), or a
hub dataset id resolved through the Hugging Face cache (`hub.py`). Rows come back as dicts, in file order, a chunk
at a time (`iter_rows`): a file of a million rows is never held whole (a JSON array file is parsed whole, being one
JSON value).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, one_line

_SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CHUNK_ROWS = 2048  # rows per chunk: large enough to batch the tokenizer, small enough to hold in any process
# ... and at most about this many bytes of source text: a chunk becomes Python lists of token ids in a tokenizing
# worker (~40 bytes a token), so 2048 long reasoning traces (5k tokens each) would be 400 MB in every worker.
CHUNK_BYTES = 8 << 20


def _suffix(path: Path) -> str:
    """'.jsonl' for rows.jsonl and rows.jsonl.gz alike."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


_DEFAULT_SPLITS = ("train", "test")  # the training and held-out buffers' defaults: a single file is either


def _single_file(path: Path, split: str, subset: str | None, key: str) -> None:
    """A single file has no configs and no splits: one given is refused, where it was read whole regardless."""
    if subset:
        raise DataError(f"{key}.subset_name: {path} is a single file, which has no configs ({subset!r} given)")
    if split not in _DEFAULT_SPLITS:
        raise DataError(f"{key}.split: {path} is a single file, which has no splits ({split!r} given); remove it")


def read_rows(path: str, split: str = "train", subset: str | None = None,
              key: str = "buffer.trainer_input.experience_buffer") -> list[dict[str, Any]]:
    """All rows of the file or folder at `path`, in one list (`iter_rows` reads them a chunk at a time)."""
    return [row for chunk in iter_rows(path, split, subset, key) for row in chunk]


def iter_rows(path: str, split: str = "train", subset: str | None = None,
              key: str = "buffer.trainer_input.experience_buffer", chunk_rows: int = CHUNK_ROWS
              ) -> Iterator[list[dict[str, Any]]]:
    """The rows of the file or folder at `path` in file order, `chunk_rows` at a time; `key` names the config
    section in errors. A malformed line stops the read with its file and line number, wherever it is.

    JSON files are parsed here rather than by `datasets`: Arrow would fill a missing key with null and refuse a
    column that mixes text and numbers, hiding exactly the rows a user needs named.
    """
    for block in iter_blocks(path, split, subset, key, chunk_rows):
        yield block if isinstance(block, list) else block.rows()


def iter_blocks(path: str, split: str = "train", subset: str | None = None,
                key: str = "buffer.trainer_input.experience_buffer", chunk_rows: int = CHUNK_ROWS
                ) -> Iterator[list[dict[str, Any]] | LineBlock]:
    """`iter_rows`'s chunks, where a JSON lines file gives `LineBlock`s, parsed by whoever calls `rows()`."""
    p = Path(path)
    if p.is_file():
        _single_file(p, split, subset, key)
    if _suffix(p) in (".json", ".jsonl") and p.is_file():
        yield from _json_chunks(p, chunk_rows)
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local folder must never reach for a hub
    import datasets

    datasets.disable_progress_bars()
    if p.is_dir():
        dataset = _open_folder(p, split, subset, key)
    elif _suffix(p) not in _SUFFIX_BUILDERS:
        raise DataError(f"{path}: unsupported data file type {''.join(p.suffixes)!r}; use .json, .jsonl (either "
                        "may be .gz), .parquet or a dataset folder")
    else:
        try:  # Arrow tables on disk, memory-mapped: rows are taken a chunk at a time
            dataset = datasets.load_dataset(_SUFFIX_BUILDERS[_suffix(p)], data_files=str(p), split="train")
        except Exception as e:  # datasets raises many types for unreadable files
            raise DataError(f"{path}: cannot read data: {one_line(e)}") from None
    per_row = dataset.data.nbytes / max(len(dataset), 1)  # Arrow's bytes: the text the rows hold
    chunk_rows = max(1, min(chunk_rows, int(CHUNK_BYTES / max(per_row, 1.0))))
    for start in range(0, len(dataset), chunk_rows):
        columns = dataset[start:start + chunk_rows]
        names = list(columns)
        yield [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def _open_folder(p: Path, split: str, subset: str | None, key: str):
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
    _no_file_left_out(p, subset, key)
    try:
        return datasets.load_dataset(str(p), name=subset, split=split)
    except Exception as e:
        raise DataError(f"{key}.path: {p}: cannot read data: {one_line(e)}") from None


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def _no_file_left_out(p: Path, subset: str | None, key: str) -> None:
    """A folder whose card declares no `configs` is split by `datasets`' file-name rules, which take one format per
    split and skip files whose names say no split: refuse a folder where some data file would be read by no split
    (its rows silently left out), naming them. A card's own `configs` are the user's choice and kept."""
    import datasets

    card = p / "README.md"
    if card.is_file() and "\nconfigs:" in "\n" + card.read_text(encoding="utf-8", errors="replace"):
        return
    try:
        data_files = datasets.load_dataset_builder(str(p), name=subset).config.data_files or {}
    except Exception:  # the load that follows names what is wrong
        return
    taken = {str(Path(f).resolve()) for files in data_files.values() for f in files}
    found = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(part.startswith(".") for part in
             f.relative_to(p).parts) and Path(f.name.removesuffix(".gz")).suffix in _DATA_SUFFIXES]
    left = [str(f.relative_to(p)) for f in found if str(f.resolve()) not in taken]
    if left:
        raise DataError(f"{key}.path: the dataset folder {p} would be read without {', '.join(left[:5])}"
                        f"{' ...' if len(left) > 5 else ''} (datasets' file-name rules give them no split); name the "
                        "files of each split in a README.md card's `configs`, or move them out")


def _json_chunks(path: Path, chunk_rows: int) -> Iterator[list[dict[str, Any]] | LineBlock]:
    """A JSON array file parsed whole; JSON lines (also a .json file of one object per line) as blocks of lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(4096).lstrip()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {one_line(e)}") from None
    if _suffix(path) == ".json" and head.startswith(b"["):
        rows = _json_array(path, opener)
        for start in range(0, len(rows), chunk_rows):
            yield rows[start:start + chunk_rows]
        return
    yield from json_line_blocks(path, chunk_rows)


@dataclasses.dataclass
class LineBlock:
    """Lines of a JSON lines file, not yet parsed: `rows()` parses them where the rows are used (in a tokenizing
    worker, so that the process reading the file only splits it into lines)."""

    path: Path
    first_line: int
    first_row: int
    lines: list[bytes]
    n_rows: int  # the lines that are not blank

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line, raw in enumerate(self.lines, start=self.first_line):
            out.extend(_json_line(self.path, raw, line, self.first_row + len(out)))
        return out


def json_line_blocks(path: Path, chunk_rows: int = 2048) -> Iterator[LineBlock]:
    """A JSON lines file as blocks of `chunk_rows` rows (or `CHUNK_BYTES` of text), in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    lines, first_line, first_row, rows, size = [], 1, 1, 0, 0
    try:
        with opener(path, "rb") as fh:
            for line, raw in enumerate(fh, start=1):
                lines.append(raw)
                rows += not _blank(raw)
                size += len(raw)
                if rows >= chunk_rows or (rows and size >= CHUNK_BYTES):
                    yield LineBlock(path, first_line, first_row, lines, rows)
                    lines, first_line, first_row, rows, size = [], line + 1, first_row + rows, 0, 0
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {one_line(e)}") from None
    if rows:
        yield LineBlock(path, first_line, first_row, lines, rows)


def _blank(raw: bytes) -> bool:
    """Whether `_json_line` reads no row from this line (only whitespace, Unicode's too)."""
    stripped = raw.strip()
    if not stripped:
        return True
    if stripped[:1] in b"{[\"0123456789-tfn":  # the first byte of any JSON value
        return False
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def _json_array(path: Path, opener) -> list[dict[str, Any]]:
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {one_line(e)}") from None
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: malformed JSON: {e.msg}") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n}: expected an object with keys, got {type(row).__name__}")
    return rows


def _json_line(path: Path, raw: bytes, line: int, row: int) -> list[dict[str, Any]]:
    """The row on one line of a JSON lines file ([] for a blank line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8") from None
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {line}: malformed JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: row {row}: expected an object with keys, got {type(value).__name__}")
    return [value]
