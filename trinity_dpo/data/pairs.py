"""Token-exact preference pairs: one prompt token sequence shared by chosen and rejected, and each response's tokens.

The prompt is the chat template's rendering of the prompt messages with the generation header; a response is
what the rendering of prompt + response adds after it, end-of-turn included. Tokens are cut at that text boundary
by construction: when the whole conversation's tokens begin with the prompt's tokens (the usual case) the response
is the rest; when a BPE merge crosses the boundary (the prompt ends in a space, say) the response text is
tokenized on its own, which is what the model sees at inference when it continues the prompt, and the split is
checked to decode to the same text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import DataError
from ..config.schema import StorageConfig
from .conversations import BadRow, Conversation, DataReport, Turns
from .encode import Continuation, continuation_encoder, encode, encode_continuations
from .render import render, render_row

log = logging.getLogger(__name__)


@dataclass
class Pair:
    """A tokenized preference pair; `index` is its position in the dataset, `row` its 1-based row in the file."""

    index: int
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0  # a reward model's `margin` column (data/margins.py): 0 without one, TRL's loss then

    @property
    def n_tokens(self) -> int:
        """Tokens of both sequences (the prompt counts twice: chosen and rejected are separate rows)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def sequences(self) -> list[tuple[list[int], list[int], list[int] | None]]:
        """The pair's two sequences, (prompt, response, None: every response token trains): chosen, rejected."""
        return [(self.prompt_ids, self.chosen_ids, None), (self.prompt_ids, self.rejected_ids, None)]

    def target_counts(self) -> tuple[int, ...]:
        return len(self.chosen_ids), len(self.rejected_ids)


@dataclass
class Limits:
    """Length rules: prompts over `max_prompt` keep their end, responses over `max_response` their start (None:
    no cut, as Trinity's DPO reader). Pairs over the `count_*` lengths (the trainer file's, which Trinity never
    applied to DPO data) are only counted."""

    max_prompt: int | None = None
    max_response: int | None = None
    max_total: int | None = None
    count_prompt: int | None = None
    count_response: int | None = None


def prompt_ids(tokenizer, prompt: Turns, template: dict | None = None) -> list[int]:
    """The token ids a model is given for `prompt`: chat messages rendered with the generation header (and the
    template's switches `template`, `render.template_kwargs`), or raw text as it is (with the tokenizer's own
    special tokens, as TRL tokenizes texts)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(render(tokenizer, prompt, True, **(template or {})), add_special_tokens=False)["input_ids"]


def prompt_text(prompt: Turns) -> str:
    """What to show of a prompt: raw text, or its last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _texts(tokenizer, conv: Conversation, template: dict) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text. Raw texts end their responses with the EOS token, as
    TRL's DPOTrainer adds it to non-conversational data; the chat template ends a turn by itself."""
    if conv.is_text:
        eos = tokenizer.eos_token or ""
        end = lambda r: r if r.endswith(eos) else r + eos  # noqa: E731
        return conv.prompt, conv.prompt + end(conv.chosen), conv.prompt + end(conv.rejected)
    tools = conv.tools
    return (render_row(tokenizer, conv.prompt, True, tools, **template),
            render_row(tokenizer, conv.prompt + conv.chosen, False, tools, **template),
            render_row(tokenizer, conv.prompt + conv.rejected, False, tools, **template))


def build_pairs(convs: list[Conversation], tokenizer, limits: Limits, report: DataReport) -> list[Pair]:
    """Tokenize every conversation into a `Pair`, truncating by `limits` and counting into `report`."""
    pairs = []
    for pair, counts in tokenize_pairs(convs, tokenizer, limits):
        report.add(counts)
        if pair is not None:
            pair.index = len(pairs)
            pairs.append(pair)
    return pairs


def tokenize_pairs(convs: list[Conversation], tokenizer, limits: Limits, template: dict | None = None,
                   storage: StorageConfig | None = None) -> list[tuple[Pair | None, DataReport]]:
    """Each conversation's `Pair` (None: dropped, e.g. identical after truncation) and what tokenizing it added to
    the data report; the tokenizer runs once per batch of texts. `template`: the chat template's switches; a row
    the template refuses is counted (or stops the run) as `storage.on_bad_row` says (no `storage`: it stops)."""
    if not tokenizer.chat_template and not all(c.is_text for c in convs):
        raise DataError("the tokenizer has no chat template; set model.custom_chat_template to a Jinja template")
    texts, refused = rendered(convs, lambda c: _texts(tokenizer, c, template or {}))
    ids: list[tuple[list[int], ...]] = [()] * len(convs)
    backend = continuation_encoder(tokenizer)
    for is_text in (False, True):  # raw text takes the tokenizer's special tokens (BOS); a template writes its own
        group = [i for i, c in enumerate(convs) if c.is_text == is_text and i not in refused]
        if group and backend is not None and not is_text:  # the prompt's ids once, for both conversations
            heads, fulls = encode_continuations(tokenizer, backend, [texts[i][0] for i in group],
                                                [[texts[i][1], texts[i][2]] for i in group])
            for n, i in enumerate(group):
                ids[i] = (heads[n], *fulls[n])
        elif group:
            encoded = [encode(tokenizer, [texts[i][k] for i in group], is_text) for k in range(3)]
            for n, i in enumerate(group):
                ids[i] = (encoded[0][n], encoded[1][n], encoded[2][n])
    out = []
    for i, conv in enumerate(convs):
        counts = DataReport("")
        if i in refused:
            counts.refuse(storage or StorageConfig(on_bad_row="error"), conv.row, refused[i])
            out.append((None, counts))
            continue
        (prompt, full_c, full_r), (p_ids, c_ids, r_ids) = texts[i], ids[i]
        chosen = _response_ids(tokenizer, prompt, p_ids, full_c, c_ids, conv, counts)
        rejected = _response_ids(tokenizer, prompt, p_ids, full_r, r_ids, conv, counts)
        out.append((_truncate(Pair(i, conv.row, p_ids, chosen, rejected), limits, counts), counts))
    return out


def rendered(items: list, texts) -> tuple[list, dict]:
    """`texts(item)` of each item, and the items the chat template refused (index -> `BadRow`), whose text is None."""
    out, refused = [], {}
    for i, item in enumerate(items):
        try:
            out.append(texts(item))
        except BadRow as e:
            out.append(None)
            refused[i] = e
    return out, refused


def _response_ids(tokenizer, prompt: str, prompt_ids: list[int], full: str, full_ids: list[int] | Continuation,
                  conv: Conversation, report: DataReport) -> list[int]:
    if not full.startswith(prompt):
        raise DataError(
            f"row {conv.row}: the chat template renders the prompt with its generation header differently from the "
            "start of the whole conversation, so prompt and response cannot be split; set "
            "model.custom_chat_template to a template that renders both alike")
    n = len(prompt_ids)
    if isinstance(full_ids, Continuation):  # the prompt's ids are the head's: slice what follows them in the rest
        if full_ids.rest[:n - full_ids.keep] == prompt_ids[full_ids.keep:]:
            return full_ids.rest[n - full_ids.keep:]
        full_ids = full_ids.ids(prompt_ids)
    if full_ids[:n] == prompt_ids:
        return full_ids[n:]
    # A merge across the boundary: the response on its own is what inference would continue the prompt with.
    response = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if tokenizer.decode(prompt_ids + response) != tokenizer.decode(full_ids):
        raise DataError(f"row {conv.row}: the prompt/response token split does not decode to the conversation's "
                        "text; the tokenizer does not round-trip this text")
    report.resplit += 1
    return response


def _truncate(pair: Pair, limits: Limits, report: DataReport) -> Pair | None:
    if limits.count_prompt is not None and len(pair.prompt_ids) > limits.count_prompt:
        report.over_limit["prompt over data.max_prompt_length"] += 1
    if limits.count_response is not None and max(len(pair.chosen_ids), len(pair.rejected_ids)) > limits.count_response:
        report.over_limit["response over data.max_response_length"] += 1
    max_prompt = limits.max_prompt
    if limits.max_total is not None:
        max_prompt = min(max_prompt or limits.max_total, limits.max_total - 1)
    if max_prompt is not None and len(pair.prompt_ids) > max_prompt:
        pair.prompt_ids = pair.prompt_ids[-max_prompt:]  # keep the end: the generation header must survive
        report.truncated["prompt"] += 1
    max_response = limits.max_response
    if limits.max_total is not None:
        max_response = min(max_response or limits.max_total, limits.max_total - len(pair.prompt_ids))
    for name in ("chosen", "rejected"):
        ids = getattr(pair, f"{name}_ids")
        if max_response is not None and len(ids) > max_response:
            setattr(pair, f"{name}_ids", ids[:max_response])
            report.truncated[name] += 1
    if pair.chosen_ids == pair.rejected_ids:
        report.dropped["identical after truncation"] += 1
        return None
    return pair
