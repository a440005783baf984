"""Tiny random-weight chat models with real byte-level BPE tokenizers and chat templates, built offline."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The generation prompt ends in a space, so " Sure" in a whole conversation is one BPE token while the prompt
# alone ends on a lone " ": the boundary case of pair building.
SPACE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

WORDS = ("hello hi hey sure yes no maybe great awesome fun cool meme movie song karaoke jam rock pizza cat dog "
         "weather sunny rain friend today tomorrow weekend love like think know feel really totally oh wow haha "
         "language model assist provide information however personal experiences opinions professional as an ai "
         "I you we they it what how why when where is are do does have has can could would should the a to of "
         "and in on for with about my your favorite go-to day week best time ever").split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", " 😂", "!!"]))
    return lines


def make_tokenizer(template: str = CHATML_TEMPLATE, style: str = "chatml") -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if style == "llama3":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       pad_token="<|endoftext|>")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = template
    return fast


def make_model_dir(path: str | Path, arch: str = "llama", template: str | None = None, style: str = "chatml",
                   seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny random `arch` ('llama' or 'qwen2') model plus tokenizer into `path` and return it."""
    path = Path(path)
    tok = make_tokenizer(template or (LLAMA3_TEMPLATE if style == "llama3" else CHATML_TEMPLATE), style)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        config = LlamaConfig(**common, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_pairs(path: str | Path, n: int = 24, seed: int = 0, fmt: str = "json") -> Path:
    """Write `n` plaintext preference rows (prompt, chosen, rejected) as .json or .jsonl."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(WORDS[:40])
        rows.append({
            "prompt": f"what do you think about {topic} {i}?",
            "chosen": f"oh {topic} is totally awesome! {' '.join(rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 9)))}",
            "rejected": "as an ai language model I do not have personal opinions. " * rng.randint(1, 2),
        })
    path = Path(path)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path
