"""Preference rows, checked and turned into conversations, in the shapes public preference sets use.

`format.prompt_type` says where the prompt is:
- `plaintext`: a text prompt column, rendered as a user message through the chat template (Trinity's meaning);
- `messages`: the prompt column holds chat messages (`prompt_key: input.messages` reaches a nested field, as in
  OpenAI's preference fine-tuning files);
- `chatpair`: no prompt column; the prompt is what chosen and rejected begin with. Conversations (TRL's implicit
  prompt, ultrafeedback_binarized) share their leading messages; Anthropic HH texts (`\\n\\nHuman: ...
  \\n\\nAssistant: ...`) are split into turns first; other texts share their longest common prefix and are not
  chat-templated, as TRL's `extract_prompt` and tokenization treat them.

Each good row becomes a `Conversation`. Bad rows (a missing key, a null, a number where text belongs, an empty
response, chosen identical to rejected) are counted and skipped, or stop the run with their file and row when
`on_bad_row: error`.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

from ..config.schema import FormatConfig, StorageConfig
from ..errors import DataError
from ..sources.files import read_rows

log = logging.getLogger(__name__)

Message = dict[str, str]
Turns = Union[list[Message], str]  # chat messages, or raw text that is tokenized as it is
__all__ = ["Conversation", "DataError", "DataReport", "load_conversations", "read_rows", "to_conversation"]


@dataclass
class Conversation:
    """One preference pair; `row` is its 1-based row in the source. Either all three parts are chat messages,
    or all three are raw text (a chatpair of plain texts: no chat template, as in TRL)."""

    row: int
    prompt: Turns
    chosen: Turns
    rejected: Turns
    tools: list[dict] | None = None  # the row's tool definitions (`format.tools_key`), handed to the chat template

    @property
    def is_text(self) -> bool:
        return isinstance(self.prompt, str)


@dataclass
class DataReport:
    """What loading did: rows read, rows dropped by reason; filled further by pair building."""

    source: str
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    over_limit: Counter = field(default_factory=Counter)  # pairs over the trainer file's lengths, kept whole
    resplit: int = 0  # pairs whose prompt/response token boundary needed a separate tokenization
    prompts_in_train: int = 0  # held-out pairs whose prompt is also a training prompt
    unit: str = "pairs"  # what a row is: preference pairs, or SFT rows

    def refuse(self, storage: StorageConfig, row: int, e: "BadRow", seen: Counter | None = None) -> None:
        """Count and skip bad row `row` (a warning for the first three of a reason, counted in `seen`, by default
        these counts), or stop the run when `storage.on_bad_row` is `error`."""
        if storage.on_bad_row == "error":
            raise DataError(f"{storage.path}: row {row}: {e.detail}") from None
        self.dropped[e.reason] += 1
        seen = self.dropped if seen is None else seen
        if seen is not self.dropped:
            seen[e.reason] += 1
        if seen[e.reason] <= 3:
            log.warning("%s: row %d skipped: %s", storage.path, row, e.detail)

    def add(self, other: "DataReport") -> None:
        """Add the counts of `other` (what tokenizing some rows added) to these."""
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)
        self.over_limit.update(other.over_limit)
        self.resplit += other.resplit

    def counts(self) -> dict:
        """The counts tokenizing adds, as JSON (empty ones left out)."""
        out = {k: dict(getattr(self, k)) for k in ("dropped", "truncated", "over_limit") if getattr(self, k)}
        return {**out, "resplit": self.resplit} if self.resplit else out

    def add_counts(self, counts: dict, times: int = 1) -> None:
        """Add `counts` (`counts()` of another report) `times` times."""
        for key in ("dropped", "truncated", "over_limit"):
            for name, n in counts.get(key, {}).items():
                getattr(self, key)[name] += n * times
        self.resplit += counts.get("resplit", 0) * times

    def as_dict(self) -> dict:
        out = {"source": self.source, "read": self.read, "kept": self.read - sum(self.dropped.values()),
               "truncated": dict(self.truncated), "dropped": dict(self.dropped), "resplit": self.resplit}
        if self.over_limit:
            out["kept_whole"] = dict(self.over_limit)
        return {**out, "prompts_in_train": self.prompts_in_train} if self.prompts_in_train else out

    def summary(self) -> str:
        kept = self.read - sum(self.dropped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"
        cut = ", ".join(f"{n} {part}" for part, n in sorted(self.truncated.items())) or "none"
        extra = f"; {self.resplit} responses re-split at a BPE merge over the prompt boundary" if self.resplit else ""
        if self.over_limit:
            extra += "; kept whole, as Trinity's DPO reader did: " + ", ".join(
                f"{n} {what}" for what, n in sorted(self.over_limit.items()))
        return f"data: {self.read} {self.unit} read from {self.source}; {kept} kept; truncated: {cut}; dropped: {why}{extra}"


def load_conversations(storage: StorageConfig, key: str = "buffer.trainer_input.experience_buffer"
                       ) -> tuple[list[Conversation], DataReport]:
    """The conversations of `storage` (the config section `key`, named in errors) and what reading them did."""
    return convert_rows(storage, key, to_conversation)


def convert_rows(storage: StorageConfig, key: str, convert, unit: str = "pairs") -> tuple[list, DataReport]:
    """`convert(row, row_number, format)` of every row of `storage`, bad rows counted (or stopping the run) by
    `DataReport.refuse`, and the report."""
    rows = read_rows(storage.path, storage.split, storage.subset_name, key)
    report = DataReport(source=storage.path, read=len(rows), unit=unit)
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            out.append(convert(row, i, storage.format))
        except BadRow as e:
            report.refuse(storage, i, e)
    return out, report


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def to_conversation(row: dict[str, Any], index: int, fmt: FormatConfig) -> Conversation:
    """Turn one row into a `Conversation` following `fmt.prompt_type`; raise `BadRow` with a reason."""
    if fmt.prompt_type == "chatpair":
        conv = _chatpair(row, index, fmt)
        if conv.is_text:
            if fmt.system_prompt or fmt.system_prompt_key:
                raise DataError("format.system_prompt / system_prompt_key need chat messages; these rows are plain "
                                "texts, which are not chat-templated")
            return conv
        prompt, chosen, rejected = conv.prompt, conv.chosen, conv.rejected
    else:
        if fmt.prompt_type == "plaintext":
            prompt = [{"role": "user", "content": _text(row, fmt.prompt_key, hint="messages")}]
        else:
            prompt = _messages(row, fmt.messages_key or fmt.prompt_key)
        chosen = _response(row, fmt.chosen_key)
        rejected = _response(row, fmt.rejected_key)
    system = _system(row, fmt)
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    for key, msgs in ((fmt.chosen_key, chosen), (fmt.rejected_key, rejected)):
        if not msgs or not has_text(msgs):
            raise BadRow("empty response", f"'{key}' has an empty response")
        if msgs[0]["role"] != "assistant":
            raise BadRow("response not from assistant",
                         f"'{key}': the response must start with an assistant message, got role {msgs[0]['role']!r}")
    if chosen == rejected:
        raise BadRow("chosen identical to rejected", "chosen and rejected are identical")
    return Conversation(index, prompt, chosen, rejected, row_tools(row, fmt))


def _system(row: dict[str, Any], fmt: FormatConfig) -> str | None:
    """The system message, if any: an empty or null value means none (the row is kept)."""
    if fmt.system_prompt_key:
        value = _lookup(row, fmt.system_prompt_key)
        if value is not None and not isinstance(value, str):
            raise BadRow(f"'{fmt.system_prompt_key}' not text",
                         f"'{fmt.system_prompt_key}' must be text, got {type(value).__name__}")
    else:
        value = fmt.system_prompt
    return value if value and value.strip() else None


def _chatpair(row: dict[str, Any], index: int, fmt: FormatConfig) -> Conversation:
    chosen_all, rejected_all = _get(row, fmt.chosen_key, chatpair=True), _get(row, fmt.rejected_key, chatpair=True)
    if isinstance(chosen_all, str) and isinstance(rejected_all, str):
        if _is_hh(chosen_all) and _is_hh(rejected_all):
            chosen_all, rejected_all = _hh_turns(chosen_all, fmt.chosen_key), _hh_turns(rejected_all, fmt.rejected_key)
        else:
            return _text_pair(chosen_all, rejected_all, index, fmt)
    else:
        chosen_all, rejected_all = _messages(row, fmt.chosen_key), _messages(row, fmt.rejected_key)
    n = 0
    while n < min(len(chosen_all), len(rejected_all)) and chosen_all[n] == rejected_all[n]:
        n += 1
    if n == 0:
        raise BadRow("no common prompt", "chosen and rejected conversations share no first message")
    return Conversation(index, chosen_all[:n], chosen_all[n:], rejected_all[n:])


def _text_pair(chosen: str, rejected: str, index: int, fmt: FormatConfig) -> Conversation:
    """TRL's standard implicit prompt: the longest common prefix of the two texts, a space before the split going
    to the responses. A response that is all prefix is empty, hence a bad row."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise BadRow("no common prompt", "chosen and rejected texts share no common beginning (the prompt)")
    for key, text in ((fmt.chosen_key, chosen[n:]), (fmt.rejected_key, rejected[n:])):
        if not text.strip():
            raise BadRow("empty response", f"'{key}' has an empty response")
    if chosen == rejected:
        raise BadRow("chosen identical to rejected", "chosen and rejected are identical")
    return Conversation(index, chosen[:n], chosen[n:], rejected[n:])


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_hh(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _hh_turns(text: str, key: str) -> list[Message]:
    """Anthropic HH's `\\n\\nHuman: ...\\n\\nAssistant: ...` text as chat messages."""
    parts = _HH_TURN.split(text.lstrip("\n"))
    if parts[0].strip():
        raise BadRow(f"'{key}' not HH turns", f"'{key}': text before the first 'Human:' turn")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _lookup(row: dict[str, Any], key: str) -> Any:
    """`row[key]`, or for a dotted key with no such column, the nested field (`input.messages`); KeyError if none."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _get(row: dict[str, Any], key: str, chatpair: bool = False) -> Any:
    try:
        value = _lookup(row, key)
    except KeyError:
        hint = ""
        if not chatpair and "chosen" in row and "rejected" in row and key not in ("chosen", "rejected"):
            hint = "; rows with only chosen and rejected hold the prompt inside them: set format.prompt_type: chatpair"
        raise BadRow(f"missing key '{key}'", f"missing key '{key}' (row has: {', '.join(map(str, row))}){hint}")
    if value is None:
        raise BadRow(f"null '{key}'", f"'{key}' is null")
    return value


def _text(row: dict[str, Any], key: str, hint: str | None = None) -> str:
    value = _get(row, key)
    if isinstance(value, list) and hint and value and isinstance(value[0], dict):
        raise BadRow(f"'{key}' not text", f"'{key}' holds chat messages, not text: set format.prompt_type: {hint}")
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
    if isinstance(value, str):
        raise BadRow(f"'{key}' not messages", f"'{key}' is text, not a list of chat messages: set "
                                              "format.prompt_type: plaintext")
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' not messages", f"'{key}' must be a non-empty list of chat messages, "
                                              f"got {type(value).__name__}")
    return [_message(m, key) for m in value]


def _message(m: Any, key: str) -> Message:
    """A chat message as the template is to see it: its role, its text (None only beside tool calls) and its other
    fields (tool calls, reasoning, a name), which TRL hands to the template too."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRow(f"'{key}' not messages", f"'{key}': each message needs a text 'role', got {str(m)[:60]!r}")
    content = m.get("content")
    if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
        raise BadRow(f"'{key}' not messages",
                     f"'{key}': each message needs a text 'content' (or tool calls), got {str(m)[:60]!r}")
    return {k: v for k, v in m.items() if v is not None}


def has_text(msgs: list[Message]) -> bool:
    """Whether messages say anything: some text, or a tool call."""
    return any((m.get("content") or "").strip() or m.get("tool_calls") for m in msgs)


def json_text(text: str, key: str) -> Any:
    """A column's JSON text, parsed; text that is not JSON is a bad row."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise BadRow(f"'{key}' not JSON", f"'{key}' is text that is not JSON") from None


def row_tools(row: dict[str, Any], fmt: FormatConfig) -> list[dict] | None:
    """The row's tool definitions under `format.tools_key` (a list, or its JSON text), or None without them."""
    try:
        tools = _lookup(row, fmt.tools_key)
    except KeyError:
        return None
    if isinstance(tools, str):
        tools = json_text(tools, fmt.tools_key)
    if tools is not None and not isinstance(tools, list):
        raise BadRow(f"'{fmt.tools_key}' not a list", f"'{fmt.tools_key}' must be a list of tool definitions")
    return tools or None
