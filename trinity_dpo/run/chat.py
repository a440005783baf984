"""`trinity chat`: a terminal conversation with a model through its chat template.

    trinity chat --model RUN/global_step_N        (a checkpoint, a LoRA adapter folder, a hub id or builtin:NAME)
    trinity chat --run RUN                        (the run's newest checkpoint that holds weights)

The history is kept and rendered whole at each turn, as a chat server would; the reply is printed as it is
generated. Greedy by default, so a reply can be reproduced (`--temperature` above 0 samples, with `--seed`).
Commands: `/reset` forgets the conversation, `/system TEXT` starts a new one under that system message, `/exit`
(or end of input) leaves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

HELP = "commands: /reset (new conversation), /system TEXT (new conversation with that system message), /exit"


@dataclass
class Sampling:
    """How replies are drawn: greedy at temperature 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Conversation:
    """The messages so far, after an optional system message."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns


def checkpoint_of(run_dir: str) -> str:
    """The newest checkpoint of a run folder that a model can be read from (its HF weights or its adapter)."""
    from .checkpoint import _complete

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--run: {run_dir} is not a folder")
    usable = [p for p in _complete(run) if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()]
    if not usable:
        raise ConfigError(f"--run: {run_dir} has no checkpoint with model weights (global_step_<N> holding "
                          "config.json or a LoRA adapter)")
    return str(usable[-1])


def load(model: str, device: str = "auto"):
    """(model, tokenizer, device) for chatting: `model` resolved like `trinity eval --model` (a LoRA adapter is
    merged into its base in memory), in fp32, with a chat template."""
    from ..config.schema import Config
    from ..engine.modeling import load_model
    from transformers import AutoTokenizer

    from ..engine.lora import base_of
    from ..engine.score_head import language_model_folder
    from ..sources.local import is_adapter

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu (or auto)")
    folder = language_model_folder(model, "--model", "trinity chat")
    tokens = folder
    if is_adapter(folder):  # its base must be there (one line if not); a checkpoint keeps the tokenizer beside it
        base = base_of(folder)
        tokens = folder if (Path(folder) / "tokenizer_config.json").is_file() else base
    cfg = Config()
    cfg.model.model_path = folder
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokens, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot load the tokenizer from {tokens}: {e}".splitlines()[0]) from None
    if not tokenizer.chat_template:
        raise ConfigError(f"--model: {tokens} has no chat template (tokenizer_config.json or chat_template.jinja); "
                          "chat needs one")
    net, _ = load_model(cfg, dev, folder)
    net.eval()
    net.config.use_cache = True
    return net, tokenizer, dev


def reply(model, tokenizer, device, conversation: Conversation, sampling: Sampling, stream=None) -> str:
    """The model's answer to the conversation (the user's turn last), printed to `stream` as it comes."""
    from .evaluate import answer_text

    text = tokenizer.apply_chat_template(conversation.messages(), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    streamer = _Printer(tokenizer, stream) if stream is not None else None
    kwargs = {"do_sample": False} if sampling.temperature <= 0 else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, streamer=streamer,
                             use_cache=True, **kwargs)
    return answer_text(tokenizer, out[0, ids.shape[1]:].tolist())


class _Printer:
    """Prints the reply's new text as tokens arrive (a token can end inside a character: held until whole)."""

    def __init__(self, tokenizer, stream):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._inner.on_finalized_text = self._write
        self.stream = stream

    def _write(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()

    def put(self, value):
        self._inner.put(value)

    def end(self):
        self._inner.end()


def session(model, tokenizer, device, sampling: Sampling, system: str | None = None, read=None,
            out=sys.stdout) -> None:
    """The conversation loop: a line from `read` (stdin), the reply to `out`; commands as the module docstring
    says. The prompt goes to `out` (input() would put it on stderr when readline is not loaded)."""
    read = read or sys.stdin.readline
    conversation = Conversation(system)
    out.write(f"{HELP}\n")
    while True:
        out.write("you> ")
        out.flush()
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, as /exit does (exit 0, no traceback)
            out.write("\n")
            return
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset" or text.startswith("/system"):
            conversation = Conversation(text[len("/system"):].strip() or None if text.startswith("/system")
                                        else conversation.system)
            out.write("(new conversation" + (f" with system message: {conversation.system})\n"
                                              if conversation.system else ")\n"))
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        conversation.turns.append({"role": "user", "content": text})
        out.write("model> ")
        try:
            answer = reply(model, tokenizer, device, conversation, sampling, stream=out)
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it, back to the prompt; the turn is dropped
            conversation.turns.pop()
            out.write("\n(reply stopped)\n")
            continue
        conversation.turns.append({"role": "assistant", "content": answer})
