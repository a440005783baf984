"""Preference rows from a local file or dataset folder, checked and turned into chat conversations.

Each good row becomes a `Conversation`: the prompt messages and the chosen and rejected response messages.
Bad rows (a missing key, a null, a number where text belongs, an empty response, chosen identical to rejected)
are counted and skipped, or stop the run with their file and row when `on_bad_row: error`.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, FormatConfig, StorageConfig

log = logging.getLogger(__name__)

Message = dict[str, str]
_SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ConfigError):
    """A problem with the user's data: one line, exit code 2."""


@dataclass
class Conversation:
    """One preference pair as chat messages; `row` is its 1-based row in `source`."""

    row: int
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class DataReport:
    """What loading did: rows read, rows dropped by reason; filled further by pair building."""

    source: str
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    resplit: int = 0  # pairs whose prompt/response token boundary needed a separate tokenization


    def as_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.read - sum(self.dropped.values()),
                "truncated": dict(self.truncated), "dropped": dict(self.dropped), "resplit": self.resplit}

    def summary(self) -> str:
        kept = self.read - sum(self.dropped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"
        cut = ", ".join(f"{n} {part}" for part, n in sorted(self.truncated.items())) or "none"
        extra = f"; {self.resplit} responses re-split at a BPE merge over the prompt boundary" if self.resplit else ""
        return f"data: {self.read} pairs read from {self.source}; {kept} kept; truncated: {cut}; dropped: {why}{extra}"


def read_rows(path: str, split: str = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """All rows of a .json/.jsonl/.parquet file or a Hugging Face dataset folder, as dicts, in file order.

    JSON files are parsed here rather than by `datasets`: Arrow would fill a missing key with null and refuse a
    column that mixes text and numbers, hiding exactly the rows a user needs named.
    """
    p = Path(path)
    if p.suffix in (".json", ".jsonl") and p.is_file():
        return _read_json(p)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local folder must never reach for a hub
    import datasets

    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_dataset(str(p), name=subset, split=split)
        elif p.suffix in _SUFFIX_BUILDERS:
            ds = datasets.load_dataset(_SUFFIX_BUILDERS[p.suffix], data_files=str(p), split="train")
        else:
            raise DataError(f"{path}: unsupported data file type {p.suffix!r}; use .json, .jsonl, .parquet or a folder")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read data: {reason}") from None
    return ds.to_list()


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8") from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
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


def load_conversations(storage: StorageConfig) -> tuple[list[Conversation], DataReport]:
    rows = read_rows(storage.path, storage.split, storage.subset_name)
    report = DataReport(source=storage.path, read=len(rows))
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            out.append(to_conversation(row, i, storage.format))
        except BadRow as e:
            if storage.on_bad_row == "error":
                raise DataError(f"{storage.path}: row {i}: {e.detail}") from None
            report.dropped[e.reason] += 1
            if report.dropped[e.reason] <= 3:
                log.warning("%s: row %d skipped: %s", storage.path, i, e.detail)
    return out, report


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def to_conversation(row: dict[str, Any], index: int, fmt: FormatConfig) -> Conversation:
    """Turn one row into a `Conversation` following `fmt.prompt_type`; raise `BadRow` with a reason."""
    if fmt.prompt_type == "chatpair":
        chosen_all = _messages(row, fmt.chosen_key)
        rejected_all = _messages(row, fmt.rejected_key)
        n = 0
        while n < min(len(chosen_all), len(rejected_all)) and chosen_all[n] == rejected_all[n]:
            n += 1
        if n == 0:
            raise BadRow("no common prompt", "chosen and rejected conversations share no first message")
        prompt, chosen, rejected = chosen_all[:n], chosen_all[n:], rejected_all[n:]
    else:
        if fmt.prompt_type == "plaintext":
            prompt = [{"role": "user", "content": _text(row, fmt.prompt_key)}]
        else:
            prompt = _messages(row, fmt.messages_key or fmt.prompt_key)
        chosen = _response(row, fmt.chosen_key)
        rejected = _response(row, fmt.rejected_key)
    system = _text(row, fmt.system_prompt_key) if fmt.system_prompt_key else fmt.system_prompt
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    for key, msgs in ((fmt.chosen_key, chosen), (fmt.rejected_key, rejected)):
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise BadRow("empty response", f"'{key}' has an empty response")
        if msgs[0]["role"] != "assistant":
            raise BadRow("response not from assistant",
                         f"'{key}': the response must start with an assistant message, got role {msgs[0]['role']!r}")
    if chosen == rejected:
        raise BadRow("chosen identical to rejected", "chosen and rejected are identical")
    return Conversation(index, prompt, chosen, rejected)


def _get(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise BadRow(f"missing key '{key}'", f"missing key '{key}' (row has: {', '.join(map(str, row))})")
    value = row[key]
    if value is None:
        raise BadRow(f"null '{key}'", f"'{key}' is null")
    return value


def _text(row: dict[str, Any], key: str) -> str:
    value = _get(row, key)
    if not isinstance(value, str):
        raise BadRow(f"'{key}' not text", f"'{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"empty '{key}'", f"'{key}' is empty")
    return value


def _response(row: dict[str, Any], key: str) -> list[Message]:
    value = _get(row, key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_message(value, key)]
    return _messages(row, key)


def _messages(row: dict[str, Any], key: str) -> list[Message]:
    value = _get(row, key)
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' not messages", f"'{key}' must be a non-empty list of chat messages, "
                                              f"got {type(value).__name__}")
    return [_message(m, key) for m in value]


def _message(m: Any, key: str) -> Message:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise BadRow(f"'{key}' not messages",
                     f"'{key}': each message needs a text 'role' and 'content', got {str(m)[:60]!r}")
    return {"role": m["role"], "content": m["content"]}
