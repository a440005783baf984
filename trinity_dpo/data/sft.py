"""SFT rows (Trinity's `algorithm_type: sft`): conversations whose assistant tokens are trained.

`format.prompt_type` says where the conversation is:
- `messages`: the `messages_key` column (Trinity's default name: `message`) holds chat messages, or their JSON text;
- `plaintext`: the `prompt_key` and `response_key` texts become a user and an assistant message.
`system_prompt` / `system_prompt_key` put a system message first; `tools_key` (a list of tool definitions, or its
JSON text) is handed to the chat template, and so is `enable_thinking` when set.

Which tokens train, as Trinity's SFT formatter chooses them:
- by default the last message: the tokens that the rendering of the whole conversation adds after the rendering of
  the messages before it with the generation header (TRL's `completion_only_loss` on that prompt/completion);
- with `enable_concatenated_multi_turn`, every assistant message: for message i, the tokens that the rendering of
  messages[:i+1] adds after the rendering of messages[:i] with the generation header (TRL's `assistant_only_loss`
  with a template whose generation block opens after the assistant header).

Bad rows (no assistant message, a last message not from the assistant, empty content, an unknown role) are counted
by reason and skipped, or stop the run with their row when `on_bad_row: error`. Rows over `model.max_model_len`
follow the trainer file's `data.truncation`: `error` (the default, as verl's) refuses the row, counted like a bad
row; `right` keeps the start, `left` the end, `middle` both ends.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..config.schema import FormatConfig, StorageConfig
from ..errors import DataError
from .conversations import BadRow, DataReport, _get, _system, _text, convert_rows, json_text, row_tools
from .encode import encode
from .render import render_row as render_chat, template_kwargs

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Dialogue:
    """One SFT row: its chat messages and tool definitions; `row` is its 1-based row in the source."""

    row: int
    messages: list[dict[str, Any]]
    tools: list[dict] | None = None

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """The messages before the last assistant message: what a model answers when asked."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]


@dataclass
class SftExample:
    """A tokenized SFT row: `prompt_ids` up to the first trained token, `response_ids` the rest, and
    `response_mask` (1: trained) over `response_ids`; `index` is its position in the dataset."""

    index: int
    row: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def sequences(self) -> list[tuple[list[int], list[int], list[int] | None]]:
        """The example's one sequence: (prompt, response, which response tokens train)."""
        return [(self.prompt_ids, self.response_ids, self.response_mask)]

    def target_counts(self) -> tuple[int, ...]:
        return (sum(self.response_mask),)


def load_dialogues(storage: StorageConfig, key: str) -> tuple[list[Dialogue], DataReport]:
    """The SFT rows of `storage` (the config section `key`, named in errors) and what reading them did."""
    return convert_rows(storage, key, to_dialogue, unit="rows")


def to_dialogue(row: dict[str, Any], index: int, fmt: FormatConfig) -> Dialogue:
    """Turn one row into a `Dialogue` following `fmt.prompt_type`; raise `BadRow` with a reason."""
    if fmt.prompt_type == "plaintext":
        messages = [{"role": "user", "content": _text(row, fmt.prompt_key, hint="messages")},
                    {"role": "assistant", "content": _text(row, fmt.response_key, hint="messages")}]
    elif fmt.prompt_type == "messages":
        key = fmt.messages_key or "message"
        messages = [_message(m, key) for m in _list(row, key, "messages")]
    else:
        raise DataError(f"format.prompt_type: {fmt.prompt_type!r} is for preference pairs; SFT rows are 'messages' "
                        "or 'plaintext'")
    system = _system(row, fmt)
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message", "the conversation has no assistant message to train on")
    if messages[-1]["role"] != "assistant":
        raise BadRow("last message not from the assistant",
                     f"the last message is from {messages[-1]['role']!r}; SFT trains the assistant's turns")
    return Dialogue(index, messages, row_tools(row, fmt))


def _list(row: dict[str, Any], key: str, what: str) -> list:
    value = _get(row, key)
    if isinstance(value, str):
        value = json_text(value, key)
    if not isinstance(value, list) or not value:
        hint = "; set format.prompt_type: plaintext" if isinstance(value, str) else ""
        raise BadRow(f"'{key}' not {what}", f"'{key}' must be a non-empty list of chat {what}{hint}")
    return value


def _message(m: Any, key: str) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRow(f"'{key}' not messages", f"'{key}': each message needs a 'role', got {str(m)[:60]!r}")
    if m["role"] not in ROLES:
        raise BadRow("unknown role", f"'{key}': unknown role {m['role']!r} (known: {', '.join(ROLES)})")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise BadRow(f"'{key}' not messages", f"'{key}': a message's content must be text")
    if not (content or "").strip() and not m.get("tool_calls"):
        raise BadRow("empty message", f"'{key}': a {m['role']} message is empty")
    return {k: v for k, v in m.items() if v is not None}


def build_examples(dialogues: list[Dialogue], tokenizer, fmt: FormatConfig, max_len: int | None,
                   truncation: str | None, report: DataReport, on_bad_row: str = "skip") -> list[SftExample]:
    """Tokenize every dialogue into an `SftExample` (see the module docstring for which tokens train), applying
    `max_len` as `truncation` says and counting into `report`."""
    examples = []
    for example, counts in tokenize_dialogues(dialogues, tokenizer, fmt, max_len, truncation, on_bad_row,
                                              report.source):
        report.add(counts)
        if example is not None:
            example.index = len(examples)
            examples.append(example)
    return examples


def tokenize_dialogues(dialogues: list[Dialogue], tokenizer, fmt: FormatConfig, max_len: int | None,
                       truncation: str | None, on_bad_row: str = "skip", source: str = ""
                       ) -> list[tuple[SftExample | None, DataReport]]:
    """Each dialogue's `SftExample` (None: refused, counted by reason) and what tokenizing it added to the data
    report; with `on_bad_row: error` a refused row stops the run with its row in `source`."""
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; set model.custom_chat_template to a Jinja template")
    kwargs = template_kwargs(fmt)
    out, seen = [], Counter()
    for d in dialogues:
        render = lambda msgs, gen: render_chat(tokenizer, msgs, gen, tools=d.tools, **kwargs)  # noqa: E731
        counts = DataReport("")
        try:
            ids, mask = _masked_ids(tokenizer, d, render, fmt.enable_concatenated_multi_turn)
            ids, mask = _fit(ids, mask, max_len, truncation or "error", counts)
        except BadRow as e:
            counts.refuse(StorageConfig(path=source, on_bad_row=on_bad_row), d.row, e, seen)
            out.append((None, counts))
            continue
        start = mask.index(1)
        out.append((SftExample(len(out), d.row, ids[:start], ids[start:], mask[start:]), counts))
    return out


def _masked_ids(tokenizer, d: Dialogue, render, every_assistant: bool) -> tuple[list[int], list[int]]:
    """Token ids of the whole rendered conversation and the trained-token mask over them."""
    full = render(d.messages, False)
    ids = _ids(tokenizer, full)
    known = {full: ids}  # the last turn's rendering is the whole conversation: tokenized once, not three times

    def ids_of(text: str) -> list[int]:
        if text not in known:
            known[text] = _ids(tokenizer, text)
        return known[text]

    mask = [0] * len(ids)
    turns = [i for i, m in enumerate(d.messages) if m["role"] == "assistant"] if every_assistant else [
        len(d.messages) - 1]
    turns = [i for i in turns if i > 0]  # an assistant message that opens the conversation answers nothing
    if not turns:
        raise BadRow("assistant message first", "the assistant's message has no message before it to answer")
    for i in turns:
        before, upto = render(d.messages[:i], True), render(d.messages[:i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(f"row {d.row}: the chat template does not render the conversation's turns as prefixes "
                            "of each other, so the assistant's tokens cannot be found; set "
                            "model.custom_chat_template to a template that does")
        upto_ids, head = ids_of(upto), ids_of(before)
        # Where a BPE merge crosses the end of the generation header, the header alone tokenizes otherwise: the
        # answer's tokens start where the two tokenizations part (TRL's common prefix), not at the header's length.
        a, b = next((n for n, (x, y) in enumerate(zip(head, upto_ids)) if x != y), min(len(head), len(upto_ids))), \
            len(upto_ids)
        if upto_ids != ids[:b]:
            raise DataError(f"row {d.row}: the tokens of the conversation's first {i + 1} messages are not a prefix "
                            "of the whole conversation's tokens")
        mask[a:b] = [1] * (b - a)
    if not any(mask[1:]):
        raise BadRow("no assistant tokens", "the assistant's messages render to no tokens")
    mask[0] = 0  # nothing predicts the first token
    return ids, mask


def _ids(tokenizer, text: str) -> list[int]:
    return encode(tokenizer, [text], False)[0]


def _fit(ids: list[int], mask: list[int], max_len: int | None, truncation: str,
         report: DataReport) -> tuple[list[int], list[int]]:
    """`ids` and `mask` cut to `max_len` tokens as `truncation` says, or the row refused (`error`)."""
    if max_len is None or len(ids) <= max_len:
        return ids, mask
    if truncation == "error":
        raise BadRow("over model.max_model_len", f"{len(ids)} tokens, over model.max_model_len={max_len} (set "
                     "data.truncation in the trainer file to right, left or middle to cut such rows)")
    if truncation == "right":
        ids, mask = ids[:max_len], mask[:max_len]
    elif truncation == "left":
        ids, mask = ids[-max_len:], mask[-max_len:]
    else:
        head = max_len // 2
        ids, mask = ids[:head] + ids[len(ids) - (max_len - head):], mask[:head] + mask[len(mask) - (max_len - head):]
    report.truncated[f"conversation ({truncation})"] += 1
    if not any(mask[1:]):
        raise BadRow("no assistant tokens after truncation", f"cut to {max_len} tokens, no assistant token is left")
    mask[0] = 0
    return ids, mask
