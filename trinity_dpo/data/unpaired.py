"""Unpaired feedback (KTO): single completions, each labelled desirable or undesirable.

Rows in TRL's unpaired shape: a prompt, a completion and a boolean label (true: desirable), in the columns
`format.prompt_key`, `completion_key` and `label_key` (TRL's names by default). `prompt_type: plaintext` reads a
prompt text (a user message) and a completion text (the assistant's answer), both rendered by the chat template as
for pairs; `prompt_type: messages` reads prompt messages and a completion given as text, a message or messages.
A row without the completion column but with `chosen` and `rejected` (any shape pairs are read in, `chatpair`
included) is a pair: it becomes two examples, chosen desirable and rejected undesirable, as TRL's
`unpair_preference_dataset` unpairs it. A label that is not true or false is a bad row (counted and skipped, or
the run stops at it with `on_bad_row: error`).

File order, which KTO's KL baseline pairs examples by (`objective/kto.py`), is TRL's: the rows' order, where a
pair's two examples are placed as `unpair_preference_dataset` places them. Its batched map takes 1000 rows at a
time and writes the chosen completions of those rows, then their rejected ones.

In the token table an example is two segments (prompt, completion) and a `labels` byte: bit 0 the label, bit 1
set for a pair's rejected half (its place in file order).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import FormatConfig, StorageConfig
from ..errors import DataError
from .conversations import (BadRow, DataReport, Turns, _lookup, _messages, _response, _system, _text, has_text,
                            row_tools, to_conversation)
from .encode import continuation_encoder, encode, encode_continuations
from .examples import Examples
from .pairs import Limits, _response_ids, rendered
from .render import render_row
from .token_cache import TokenTable

log = logging.getLogger(__name__)

UNPAIR_BATCH = 1000  # rows per batch of TRL's `unpair_preference_dataset` (datasets' default map batch size)


@dataclass
class UnpairedRow:
    """One example before tokenizing: `row` its 1-based row, `part` 1 for a pair's rejected half, else 0."""

    row: int
    prompt: Turns
    completion: Turns
    label: bool
    part: int = 0
    tools: list[dict] | None = None  # the row's tool definitions, handed to the chat template

    @property
    def is_text(self) -> bool:
        return isinstance(self.prompt, str)


@dataclass
class Unpaired:
    """A tokenized example: `index` its position in file order, `label` True when desirable. `kl_ids`, where set,
    is another example's completion after this prompt: the KL sequence (`objective/kto.py`)."""

    index: int
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_ids: list[int] | None = None

    @property
    def n_tokens(self) -> int:
        kl = 0 if self.kl_ids is None else len(self.prompt_ids) + len(self.kl_ids)
        return len(self.prompt_ids) + len(self.completion_ids) + kl

    def sequences(self) -> list[tuple[list[int], list[int], list[int] | None]]:
        """The completion after the prompt, then the KL sequence where there is one."""
        out = [(self.prompt_ids, self.completion_ids, None)]
        return out if self.kl_ids is None else out + [(self.prompt_ids, self.kl_ids, None)]

    def target_counts(self) -> tuple[int, ...]:
        return (len(self.completion_ids),) + (() if self.kl_ids is None else (len(self.kl_ids),))

    # `batching.collate` computes a two-sequence example's prompt once under a pair's names.
    @property
    def chosen_ids(self) -> list[int]:
        return self.completion_ids

    @property
    def rejected_ids(self) -> list[int]:
        return self.kl_ids


def to_unpaired(row: dict[str, Any], index: int, fmt: FormatConfig) -> list[UnpairedRow]:
    """The examples of one row (two for a pair, see the module docstring); raise `BadRow` with a reason."""
    if fmt.prompt_type == "chatpair" or (not _has(row, fmt.completion_key) and _has(row, fmt.chosen_key)):
        conv = to_conversation(row, index, fmt)
        return [UnpairedRow(index, conv.prompt, conv.chosen, True, 0, conv.tools),
                UnpairedRow(index, conv.prompt, conv.rejected, False, 1, conv.tools)]
    if fmt.prompt_type == "plaintext":
        prompt = [{"role": "user", "content": _text(row, fmt.prompt_key, hint="messages")}]
    else:
        prompt = _messages(row, fmt.messages_key or fmt.prompt_key)
    system = _system(row, fmt)
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    completion = _response(row, fmt.completion_key)
    if not has_text(completion):
        raise BadRow("empty response", f"'{fmt.completion_key}' has an empty response")
    if completion[0]["role"] != "assistant":
        raise BadRow("response not from assistant", f"'{fmt.completion_key}': the completion must start with an "
                     f"assistant message, got role {completion[0]['role']!r}")
    return [UnpairedRow(index, prompt, completion, _label(row, fmt.label_key), 0, row_tools(row, fmt))]


def _has(row: dict[str, Any], key: str) -> bool:
    try:
        _lookup(row, key)
    except KeyError:
        return False
    return True


def _label(row: dict[str, Any], key: str) -> bool:
    try:
        value = _lookup(row, key)
    except KeyError:
        raise BadRow(f"missing key '{key}'", f"missing key '{key}' (row has: {', '.join(map(str, row))}); an "
                     "unpaired row needs a label: true for a desirable completion, false for an undesirable one")
    if not isinstance(value, (bool, np.bool_)):  # 1, "yes" or null could be either; TRL's label column is boolean
        raise BadRow(f"'{key}' not true or false", f"'{key}' must be true (desirable) or false (undesirable), "
                     f"got {value!r}")
    return bool(value)


def _texts(tokenizer, item: UnpairedRow, template: dict) -> tuple[str, str]:
    """(prompt, prompt + completion) as text: raw texts end with the EOS token (TRL adds it to non-conversational
    completions), chat messages are rendered by the template."""
    if item.is_text:
        eos = tokenizer.eos_token or ""
        end = item.completion if item.completion.endswith(eos) else item.completion + eos
        return item.prompt, item.prompt + end
    return (render_row(tokenizer, item.prompt, True, item.tools, **template),
            render_row(tokenizer, item.prompt + item.completion, False, item.tools, **template))


def tokenize_unpaired(items: list[UnpairedRow], tokenizer, limits: Limits, template: dict | None = None,
                      storage: StorageConfig | None = None) -> list[tuple[Unpaired, DataReport]]:
    """Each item's `Unpaired` and what tokenizing it added to the data report, token-exact as pairs are
    (`pairs.py`); a pair's two halves encode their shared prompt once. `template`: the chat template's switches;
    an item the template refuses is counted (or stops the run) as `storage.on_bad_row` says."""
    if not tokenizer.chat_template and not all(i.is_text for i in items):
        raise DataError("the tokenizer has no chat template; set model.custom_chat_template to a Jinja template")
    texts, refused = rendered(items, lambda i: _texts(tokenizer, i, template or {}))
    ids: list[tuple[list[int], list[int]]] = [([], [])] * len(items)
    backend = continuation_encoder(tokenizer)
    for is_text in (False, True):  # raw text takes the tokenizer's special tokens (BOS); a template writes its own
        group = [k for k, item in enumerate(items) if item.is_text == is_text and k not in refused]
        if group and backend is not None and not is_text:
            runs = _prompt_runs(group, texts)
            heads, fulls = encode_continuations(tokenizer, backend, [texts[r[0]][0] for r in runs],
                                                [[texts[k][1] for k in r] for r in runs])
            for run, head, full in zip(runs, heads, fulls):
                for k, f in zip(run, full):
                    ids[k] = (head, f)
        elif group:
            heads, fulls = (encode(tokenizer, [texts[k][j] for k in group], is_text) for j in range(2))
            for n, k in enumerate(group):
                ids[k] = (heads[n], fulls[n])
    out = []
    for k, item in enumerate(items):
        counts = DataReport("")
        if k in refused:
            counts.refuse(storage or StorageConfig(on_bad_row="error"), item.row, refused[k])
            out.append((None, counts))
            continue
        (prompt, full), (p_ids, f_ids) = texts[k], ids[k]
        completion = _response_ids(tokenizer, prompt, p_ids, full, f_ids, item, counts)
        out.append((_truncate(Unpaired(k, item.row, list(p_ids), completion, item.label), limits, counts), counts))
    return out


def _prompt_runs(group: list[int], texts: list[tuple[str, str]]) -> list[list[int]]:
    """`group` cut into runs of neighbours with the same prompt text (a pair's two halves)."""
    runs: list[list[int]] = []
    for k in group:
        if runs and texts[runs[-1][-1]][0] == texts[k][0]:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _truncate(example: Unpaired, limits: Limits, report: DataReport) -> Unpaired:
    """`limits` as pairs apply them: a long prompt keeps its end, a long completion its start."""
    if limits.count_prompt is not None and len(example.prompt_ids) > limits.count_prompt:
        report.over_limit["prompt over data.max_prompt_length"] += 1
    if limits.count_response is not None and len(example.completion_ids) > limits.count_response:
        report.over_limit["response over data.max_response_length"] += 1
    max_prompt = limits.max_prompt
    if limits.max_total is not None:
        max_prompt = min(max_prompt or limits.max_total, limits.max_total - 1)
    if max_prompt is not None and len(example.prompt_ids) > max_prompt:
        example.prompt_ids = example.prompt_ids[-max_prompt:]
        report.truncated["prompt"] += 1
    max_response = limits.max_response
    if limits.max_total is not None:
        max_response = min(max_response or limits.max_total, limits.max_total - len(example.prompt_ids))
    if max_response is not None and len(example.completion_ids) > max_response:
        example.completion_ids = example.completion_ids[:max_response]
        report.truncated["completion"] += 1
    return example


def label_codes(items: list[UnpairedRow]) -> np.ndarray:
    """The table's `labels` bytes of `items` (see the module docstring)."""
    return np.array([int(i.label) | (i.part << 1) for i in items], np.uint8)


def file_order(table: TokenTable, entries: np.ndarray) -> np.ndarray:
    """`entries` of `table` in file order (see the module docstring)."""
    entries = np.asarray(entries)
    rows = np.asarray(table.rows)[entries] - 1
    part = (np.asarray(table.labels)[entries] >> 1) & 1
    return entries[np.lexsort((rows % UNPAIR_BATCH, part, rows // UNPAIR_BATCH))]


def split_by_rows(table: TokenTable, fraction: float, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(training entries, held-out entries, held-out rows): `fraction` of the source rows held out, taken in
    `order` (a seeded permutation of the rows), so that a pair's two halves stay on one side."""
    rows = np.asarray(table.rows)
    unique = np.unique(rows)
    n_eval = max(1, round(fraction * len(unique)))
    held = np.isin(rows, unique[np.asarray(order)[:n_eval]])
    return np.flatnonzero(~held), np.flatnonzero(held), n_eval


class UnpairedExamples(Examples):
    """A split's unpaired examples (entries of `table`, already in file order) as `Unpaired`s. With `kl`, example i
    also holds the KL sequence of a held-out set, which is one batch: example i-1's completion (example 0 takes
    the last one's), TRL's rotation by one."""

    def __init__(self, table: TokenTable, entries: np.ndarray, kl: bool = False):
        super().__init__(table, entries, "unpaired")
        self.kl = kl
        self.labels = (np.asarray(table.labels)[self.entries] & 1).astype(bool)
        lengths = np.asarray(table.spans[self.entries][:, :, 1]) if len(self.entries) else np.zeros((0, 2), np.int64)
        if kl and len(self.entries):
            self.n_tokens = (self.n_tokens + lengths[:, 0] + np.roll(lengths[:, 1], 1)).astype(np.int32)
        # Any prompt with any completion: a KL sequence (training's are made per step) is bounded by this.
        most = lengths.max(0) if len(self.entries) else np.zeros(2, np.int64)
        self._longest = int(most[0] + most[1] * (2 if kl else 1))

    def __getitem__(self, i: int) -> Unpaired:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        e, t = int(self.entries[i]), self.table
        kl = t.segment(int(self.entries[i - 1]), 1) if self.kl else None
        return Unpaired(i, int(t.rows[e]), t.segment(e, 0), t.segment(e, 1), bool(self.labels[i]), kl)

    def digest(self) -> str:
        return super().digest() + ("-kl" if self.kl else "")

    def target_counts(self) -> np.ndarray:
        """[n, 1] completion tokens, with `kl` [n, 2] (the KL sequence's second)."""
        lengths = np.asarray(self.table.spans[self.entries])[:, 1, 1].astype(np.int64)
        return np.stack([lengths, np.roll(lengths, 1)], 1) if self.kl else lengths.reshape(-1, 1)


def unpaired_examples(table: TokenTable, entries: np.ndarray, kl: bool) -> UnpairedExamples:
    """The kept `entries` of `table` as examples in file order (`kl`: a held-out set's, with KL sequences)."""
    examples = UnpairedExamples(table, file_order(table, entries), kl)
    desirable = int(examples.labels.sum())
    log.info("%d unpaired examples: %d desirable, %d undesirable", len(examples), desirable,
             len(examples) - desirable)
    return examples
