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

from .data import Conversation, DataError, DataReport

log = logging.getLogger(__name__)


@dataclass
class Pair:
    """A tokenized preference pair; `index` is its position in the dataset, `row` its 1-based row in the file."""

    index: int
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def n_tokens(self) -> int:
        """Tokens of both sequences (the prompt counts twice: chosen and rejected are separate rows)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class Limits:
    """Length rules: prompts keep their end, responses their start; `truncation='error'` refuses both cuts."""

    max_prompt: int
    max_response: int
    max_total: int | None = None
    truncation: str = "left"


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def build_pairs(convs: list[Conversation], tokenizer, limits: Limits, report: DataReport) -> list[Pair]:
    """Tokenize every conversation into a `Pair`, truncating by `limits` and counting into `report`."""
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; set model.custom_chat_template to a Jinja template")
    prompts = [render(tokenizer, c.prompt, True) for c in convs]
    fulls_c = [render(tokenizer, c.prompt + c.chosen, False) for c in convs]
    fulls_r = [render(tokenizer, c.prompt + c.rejected, False) for c in convs]
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    p_ids, c_ids, r_ids = encode(prompts), encode(fulls_c), encode(fulls_r)
    pairs = []
    for i, conv in enumerate(convs):
        chosen = _response_ids(tokenizer, prompts[i], p_ids[i], fulls_c[i], c_ids[i], conv, report)
        rejected = _response_ids(tokenizer, prompts[i], p_ids[i], fulls_r[i], r_ids[i], conv, report)
        pair = _truncate(Pair(len(pairs), conv.row, p_ids[i], chosen, rejected), limits, report)
        if pair is not None:
            pairs.append(pair)
    for i, pair in enumerate(pairs):
        pair.index = i
    return pairs


def _response_ids(tokenizer, prompt: str, prompt_ids: list[int], full: str, full_ids: list[int],
                  conv: Conversation, report: DataReport) -> list[int]:
    if not full.startswith(prompt):
        raise DataError(
            f"row {conv.row}: the chat template renders the prompt with its generation header differently from the "
            "start of the whole conversation, so prompt and response cannot be split; set "
            "model.custom_chat_template to a template that renders both alike")
    n = len(prompt_ids)
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
    max_prompt = limits.max_prompt
    if limits.max_total is not None:
        max_prompt = min(max_prompt, limits.max_total - 1)
    if len(pair.prompt_ids) > max_prompt:
        if limits.truncation == "error":
            raise DataError(f"row {pair.row}: prompt has {len(pair.prompt_ids)} tokens, over the limit of "
                            f"{max_prompt} (data.truncation: error)")
        pair.prompt_ids = pair.prompt_ids[-max_prompt:]  # keep the end: the generation header must survive
        report.truncated["prompt"] += 1
    max_response = limits.max_response
    if limits.max_total is not None:
        max_response = min(max_response, limits.max_total - len(pair.prompt_ids))
    for name in ("chosen", "rejected"):
        ids = getattr(pair, f"{name}_ids")
        if len(ids) > max_response:
            if limits.truncation == "error":
                raise DataError(f"row {pair.row}: {name} response has {len(ids)} tokens, over the limit of "
                                f"{max_response} (data.truncation: error)")
            setattr(pair, f"{name}_ids", ids[:max_response])
            report.truncated[name] += 1
    if pair.chosen_ids == pair.rejected_ids:
        report.dropped["identical after truncation"] += 1
        return None
    return pair
