"""A checkpoint's tokenizer as GGUF metadata: llama.cpp's `gpt2` (byte-level BPE) vocabulary, its merges, token
types, special token ids, whether BOS/EOS are added, and the chat template.

llama.cpp does not read `tokenizer.json`: it rebuilds the tokenizer from the token list, the merges and one name
(`tokenizer.ggml.pre`) that selects the regex splitting text before the merges apply. That name must describe the
checkpoint's own pre-tokenizer, or the same text gives other ids there than in training; so it is derived from the
pre-tokenizer's structure, and a structure without a name llama.cpp and transformers' GGUF reader both know is
refused rather than guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ConfigError

# llama.cpp's token types (gguf.TokenType): kept as numbers here so that this module needs no gguf import to plan
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Split regexes by the `tokenizer.ggml.pre` name llama.cpp gives them, in the order they are tried. Each name is
# one transformers' GGUF reader maps back to the same regex (checked at export, so a reader that changes its table
# makes the export refuse, not drift).
SPLIT_NAMES = ("qwen2", "llama-bpe")


@dataclass
class Vocab:
    """What goes under `tokenizer.*` in the GGUF file."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad: only those the tokenizer has
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict] | None = None


def vocab_of(tokenizer, n_vocab: int, where: str) -> Vocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer for a model with `n_vocab` embedding rows."""
    spec = _backend_spec(tokenizer, where)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise ConfigError(f"{where}: the tokenizer is not a byte-level BPE ({model.get('type')}); export writes "
                          "llama.cpp's gpt2 vocabulary only (SmolLM2, Qwen2, Llama 3 style tokenizers)")
    _check_normalizer(spec.get("normalizer"), where)
    tokens, types = _tokens(tokenizer, n_vocab, where)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab(pre=_pre_name(spec.get("pre_tokenizer"), where), tokens=tokens, types=types, merges=merges,
                 special_ids=_special_ids(tokenizer), **_added_ends(tokenizer),
                 chat_template=_template(tokenizer.chat_template))


def add_to(writer, vocab: Vocab) -> None:
    """Write `vocab` into a GGUFWriter (before its key-value data is written)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    # Written even when false: llama.cpp otherwise picks a default by pre-tokenizer (true for Llama 3), which would
    # put a BOS the checkpoint never saw in front of every prompt.
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _backend_spec(tokenizer, where: str) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{where}: the tokenizer has no tokenizer.json (a slow tokenizer); export needs a fast one")
    return json.loads(backend.to_str())


def _check_normalizer(normalizer: dict | None, where: str) -> None:
    # NFC (Qwen2's) is let through: llama.cpp has no normalizer at all, and text already in NFC, nearly all text,
    # tokenizes the same without it. Anything else would change ids silently.
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ConfigError(f"{where}: the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp's "
                          "gpt2 vocabulary cannot do; export refuses rather than change token ids")


def _pre_name(pre: dict | None, where: str) -> str:
    """llama.cpp's name for the pre-tokenizer `pre` (tokenizer.json's object)."""
    parts = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" and not parts[-1].get("add_prefix_space") else None
    if byte_level is not None and byte_level.get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2"  # GPT-2's regex, which ByteLevel applies itself
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's regex
    elif byte_level is not None and kinds == ["Split", "ByteLevel"] and _isolated(parts[0]):
        name = _split_name(parts[0]["pattern"].get("Regex"))
        if name:
            return name
    raise ConfigError(f"{where}: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not "
                      "one llama.cpp knows by name; export writes GPT-2's, SmolLM's, Qwen2's and Llama 3's")


def _isolated(split: dict) -> bool:
    return split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in (split.get("pattern") or {})


def _split_name(regex: str | None) -> str | None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return next((name for name in SPLIT_NAMES if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex), None)


def _tokens(tokenizer, n_vocab: int, where: str) -> tuple[list[str], list[int]]:
    """Every id's token and type, as llama.cpp's converter lists them: ids the tokenizer lacks up to the embedding's
    size become unused `[PADi]` placeholders; added tokens are control tokens when special (or spelled like
    `<|...|>`), user-defined otherwise."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise ConfigError(f"{where}: the tokenizer has ids up to {max(by_id)} but the model's embedding only "
                          f"{n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return {kind: int(i) for kind, i in ids.items() if i is not None}


def _added_ends(tokenizer) -> dict[str, bool]:
    """Whether encoding a text adds BOS in front or EOS behind, as this tokenizer does it (its post-processor)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"add_bos": bos is not None and ids[:1] == [bos], "add_eos": eos is not None and ids[-1:] == [eos]}


def _template(template) -> str | list[dict] | None:
    """The chat template in the form GGUFWriter.add_chat_template takes (named templates: a list of them)."""
    if isinstance(template, dict):
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None
