"""An Ollama Modelfile for an exported GGUF: `FROM ./file.gguf`, the chat template as an Ollama (Go) TEMPLATE,
the template's default system message as SYSTEM, and stop tokens.

A Jinja chat template cannot be translated in general, so the template is recognised instead: it is rendered on
probe conversations and compared, character for character, with the turn formats below (ChatML, Llama 3). A match
gives the Go template that renders the same text for plain conversations (system, user and assistant turns; no
tools or images). No match: the Modelfile says so and gives no TEMPLATE; the Jinja template is still in the GGUF.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Probe texts: plain words that no template trims, escapes or rewrites.
PROBE_SYSTEM, PROBE_USER, PROBE_ANSWER, PROBE_AGAIN = "Be brief.", "Hello there", "Hi, how can I help?", "Tell me more"


@dataclass(frozen=True)
class TurnFormat:
    """A turn is `head_open + role + head_close + content + end`."""

    name: str
    head_open: str
    head_close: str
    end: str

    def head(self, role: str) -> str:
        return f"{self.head_open}{role}{self.head_close}"

    def turn(self, role: str, content: str) -> str:
        return f"{self.head(role)}{content}{self.end}"


FORMATS = (
    TurnFormat("ChatML", "<|im_start|>", "\n", "<|im_end|>\n"),
    TurnFormat("Llama 3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>"),
)


@dataclass(frozen=True)
class Recognised:
    form: TurnFormat
    prefix: str  # rendered before the first turn (a BOS written by the template itself)
    default_system: str | None  # the system message the template adds when a conversation has none


def recognise(tokenizer) -> Recognised | None:
    """The turn format the tokenizer's chat template renders, or None."""
    if not tokenizer.chat_template:
        return None
    full = [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": PROBE_USER},
            {"role": "assistant", "content": PROBE_ANSWER}, {"role": "user", "content": PROBE_AGAIN}]
    try:
        with_system = _render(tokenizer, full)
        without = _render(tokenizer, full[1:2])
    except Exception:  # a template that needs more than plain turns (tools, strict role order): not recognised
        return None
    for form in FORMATS:
        body = "".join(form.turn(m["role"], m["content"]) for m in full) + form.head("assistant")
        if not with_system.endswith(body):
            continue
        prefix = with_system[:-len(body)]
        plain = prefix + form.turn("user", PROBE_USER) + form.head("assistant")
        system = None if without == plain else _default_system(form, prefix, without, plain)
        if without == plain or system is not None:
            return Recognised(form, _own_prefix(tokenizer, prefix), system)
    return None


def write(gguf_path: Path, tokenizer, recognised: Recognised | None) -> Path:
    """Write `<stem>.Modelfile` beside the GGUF; its path."""
    lines = [f"FROM ./{gguf_path.name}", ""]
    if recognised is None:
        lines += ["# The checkpoint's chat template is in the GGUF (tokenizer.chat_template) but is not one this",
                  "# tool translates (ChatML, Llama 3): write a TEMPLATE for it here.", ""]
    else:
        lines += [f"# {recognised.form.name}, translated from the checkpoint's chat template", "",
                  f'TEMPLATE """{go_template(recognised)}"""', ""]
        if recognised.default_system is not None:
            lines += [f'SYSTEM """{recognised.default_system}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops(tokenizer, recognised)]
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def go_template(recognised: Recognised) -> str:
    """The Ollama template: every message of the conversation (Ollama puts SYSTEM in front as a system message
    when the conversation has none), then the assistant's open turn."""
    form = recognised.form
    return (f"{recognised.prefix}{{{{ range .Messages }}}}{form.head_open}{{{{ .Role }}}}{form.head_close}"
            f"{{{{ .Content }}}}{form.end}{{{{ end }}}}{form.head('assistant')}")


def stops(tokenizer, recognised: Recognised | None) -> list[str]:
    """Texts that end a reply: the turn's end token, a new turn's opening, and the tokenizer's EOS."""
    found = [recognised.form.end.strip(), recognised.form.head_open] if recognised else []
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    return list(dict.fromkeys(s for s in found if s and '"' not in s))


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _own_prefix(tokenizer, prefix: str) -> str:
    """The template's text before the first turn, less a BOS that encoding adds anyway (llama.cpp adds it too, from
    the GGUF's add_bos_token: a second one in the template would double it)."""
    bos = tokenizer.bos_token
    if bos and prefix.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prefix[len(bos):]
    return prefix


def _default_system(form: TurnFormat, prefix: str, rendered: str, plain: str) -> str | None:
    """The system message a template puts in front of a conversation without one, if that is all it adds."""
    head = prefix + form.head("system")
    rest = plain[len(prefix):]
    if not (rendered.startswith(head) and rendered.endswith(rest)):
        return None
    middle = rendered[len(head):len(rendered) - len(rest)]
    if not middle.endswith(form.end):
        return None
    system = middle[:-len(form.end)]
    return system if '"""' not in system and form.end.strip() not in system else None
