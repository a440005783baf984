"""Texts to token ids, as `tokenizer(texts)["input_ids"]` gives them, faster where the tokenizer allows.

A fast (Rust) tokenizer's `encode_batch_fast` skips the character offsets that `__call__` computes and this tool
never reads: a quarter of the encoding time of a pair file. The Python wrapper first sets the backend's
truncation, padding and special-token splitting for the call, so an empty text through the wrapper puts the
backend in the state a full call would, and the backend's ids are then the wrapper's ids.

A pair's two conversations both begin with its prompt, and `encode_continuations` encodes that beginning once. It
rests on how a Rust tokenizer encodes: the text is first cut at every added token (`<|im_start|>`, ...), and each
piece between them is normalised, pre-tokenized and merged on its own. So for a text `A + B` where A ends with an
added token, the ids are A's ids followed by B's, provided no piece's result depends on where the piece sits or on
its neighbours: pre-tokenizers that act on each piece alike (byte-level, regex splits; not Metaspace, which marks
the first piece of a text), no added token that strips whitespace or matches only whole words, and no added token
inside another (the match at A's end could otherwise be part of a longer one in A + B). A normaliser (Qwen's NFC)
is applied to each piece on its own, so it changes nothing here. `continuation_encoder` checks exactly that and returns None
otherwise; the caller then encodes whole texts.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

_PIECEWISE = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"}
_CHECKED = "_trinity_continuations"  # the answer, kept on the tokenizer object (reading the spec costs ~50 ms)


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The token ids of each of `texts` (`tokenizer(texts, add_special_tokens=...)["input_ids"]`)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if not texts or fast is None or not getattr(tokenizer, "is_fast", False):
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []
    tokenizer([""], add_special_tokens=add_special_tokens)  # sets the backend's state for this call
    if backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]


def continuation_encoder(tokenizer):
    """The tokenizer's Rust backend when `encode_continuations` is exact for it (see the module docstring)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", 0):
        return None
    checked = tokenizer.__dict__.get(_CHECKED)
    if checked is None or checked[0] is not backend:
        spec = json.loads(backend.to_str())
        added = spec.get("added_tokens", [])
        contents = [t["content"] for t in added]
        ok = (_piecewise(spec.get("pre_tokenizer"))
              and spec["model"].get("type") == "BPE" and not spec["model"].get("dropout")
              and not any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in added)
              and not any(a != b and a in b for a in contents for b in contents))
        checked = tokenizer.__dict__[_CHECKED] = (backend, ok, _pieces_of(spec) if ok else None)
    return backend if checked[1] else None


def _piecewise(pre_tokenizer) -> bool:
    if pre_tokenizer is None:
        return True
    if pre_tokenizer["type"] == "Sequence":
        return all(_piecewise(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer["type"] in _PIECEWISE


def encode_continuations(tokenizer, backend, heads: list[str], texts: list[list[str]]
                         ) -> tuple[list[list[int]], list[list["Continuation"]]]:
    """(ids of each head, ids of each of its texts as a `Continuation` of the head's) without a template: texts[i]
    are texts that may begin with heads[i]. Each text that does is encoded from the head's last added token on,
    after the head's ids up to it; the others whole (keep 0). Exact for a `continuation_encoder` backend, as
    `encode` of the whole texts would give."""
    tokenizer([""], add_special_tokens=False)  # the backend's state for a plain call (see `encode`)
    if backend.truncation is not None or backend.padding is not None:
        return encode(tokenizer, heads, False), [[Continuation(0, ids) for ids in encode(tokenizer, t, False)]
                                                 for t in texts]
    head_ids, cuts, rests = [], [], []
    for head, (ids, last, cut), group in zip(heads, _encode_heads(tokenizer, backend, heads), texts):
        head_ids.append(ids)
        for text in group:
            keep = last + 1 if cut and text.startswith(head[:cut]) else 0
            cuts.append(keep)
            rests.append(text[cut:] if keep else text)
    encoded = [e.ids for e in backend.encode_batch_fast(rests, add_special_tokens=False)]
    out, n = [], 0
    for group in texts:
        out.append([Continuation(cuts[n + j], encoded[n + j]) for j in range(len(group))])
        n += len(group)
    return head_ids, out


def _encode_heads(tokenizer, backend, heads: list[str]) -> list[tuple[list[int], int, int]]:
    """(ids, index of the last added token in them or -1, the character where the text after it starts) of each
    head. Where added tokens are matched on the raw text (no normaliser, or none of them normalised), a head is cut
    at them here as the backend cuts it, and each piece between them is encoded once per process: a template's
    fixed parts (a default system message, role headers) recur in every prompt. Otherwise the backend's offsets."""
    pieces = _pieces(tokenizer, backend)
    if pieces is None:
        added, out = set(backend.get_added_tokens_decoder()), []
        for encoding in backend.encode_batch(heads, add_special_tokens=False):
            last = max((k for k, t in enumerate(encoding.ids) if t in added), default=-1)
            out.append((encoding.ids, last, encoding.offsets[last][1] if last >= 0 else 0))
        return out
    split, token_ids, memo = pieces
    parts = [split(head) for head in heads]  # text, token, text, ..., text
    new = list(dict.fromkeys(p for ps in parts for p in ps[::2] if p and p not in memo))
    if len(memo) + len(new) > _MEMO_PIECES:  # start again from this batch's pieces
        memo.clear()
        new = list(dict.fromkeys(p for ps in parts for p in ps[::2] if p))
    memo.update(zip(new, (e.ids for e in backend.encode_batch_fast(new, add_special_tokens=False))))
    out = []
    for head, ps in zip(heads, parts):
        ids = []
        for k, p in enumerate(ps):
            if k % 2:
                ids.append(token_ids[p])
                last = len(ids) - 1
            elif p:
                ids += memo[p]
        out.append((ids, last, len(head) - len(ps[-1])) if len(ps) > 1 else (ids, -1, 0))
    return out


_MEMO_PIECES = 10_000  # distinct head pieces kept per process (a prompt's own text is one, met once)


def _pieces(tokenizer, backend):
    """(a splitter at the added tokens, their ids by text, the memo of pieces' ids) when heads may be cut at added
    tokens found in the raw text; None otherwise. Read from the spec `continuation_encoder` parsed and kept."""
    checked = tokenizer.__dict__.get(_CHECKED)
    return checked[2] if checked is not None and checked[0] is backend else None


def _pieces_of(spec: dict):
    added = spec.get("added_tokens", [])
    if not added or (spec.get("normalizer") is not None and any(t["normalized"] for t in added)):
        return None
    split = re.compile("(" + "|".join(re.escape(t["content"]) for t in added) + ")").split
    return split, {t["content"]: t["id"] for t in added}, {}


class Continuation(NamedTuple):
    """A text's ids as its head's first `keep` ids followed by `rest`, not joined: a caller after the ids that
    follow the whole head slices `rest` (`pairs._response_ids`) instead of copying both."""

    keep: int
    rest: list[int]

    def ids(self, head_ids: list[int]) -> list[int]:
        return head_ids[:self.keep] + self.rest
