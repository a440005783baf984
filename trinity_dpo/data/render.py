"""Chat templates rendered to text as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` renders them,
with a third of the work per call.

Tokenizing a pair renders three conversations; through `apply_chat_template` two thirds of that time is the
wrapper, not the template: each call copies the messages twice (normalising message objects, rebuilding plain
JSON data for the sandbox), rebuilds the special-token map and looks the compiled template up. For messages that
are plain dicts of strings with only `role`, `content` and `name` those copies are the messages themselves, so
rendering the compiled template with the same variables (`messages`, `tools=None`, `documents=None`,
`add_generation_prompt`, the special tokens, then the caller's keyword arguments) gives the same text. Anything
else (tools, tool calls, reasoning fields, content blocks, another object type) goes through `apply_chat_template`.
The first fast rendering of each template in a process is compared with `apply_chat_template`'s; a difference (a
transformers version that passes the template something more) turns the fast path off for that tokenizer.
"""
from __future__ import annotations

_STATE = "_trinity_renderer"  # kept on the tokenizer: (chat_template object, compiled or None, variables, state)
_PLAIN_KEYS = frozenset({"role", "content", "name"})


def template_kwargs(fmt) -> dict:
    """The chat template's own switches a data format sets, for every rendering of its rows and prompts:
    `enable_thinking` (Qwen3's and others'), when given."""
    return {} if fmt.enable_thinking is None else {"enable_thinking": fmt.enable_thinking}


def render_row(tokenizer, messages: list[dict], generation_prompt: bool, tools=None, **kwargs) -> str:
    """`render` for a data row: a template that refuses the row (jinja's raise_exception, as Mistral's does for
    roles that do not alternate; transformers' own checks) makes it a bad row, counted or stopping the run as
    `on_bad_row` says, not a traceback."""
    from jinja2 import TemplateError

    from .conversations import BadRow

    try:
        return render(tokenizer, messages, generation_prompt, tools, **kwargs)
    except (TemplateError, ValueError, TypeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise BadRow("refused by the chat template", f"the chat template refused it: {text}") from None


def render(tokenizer, messages: list[dict], generation_prompt: bool, tools=None, **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...,
    **kwargs)`."""
    fast = None if tools is not None or not _plain(messages) else _renderer(tokenizer)
    if fast is None:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **kwargs)
    compiled, variables, state = fast
    try:  # Template.render less its copy of the template's globals into every context: `variables` holds them
        context = compiled.new_context({**variables, "messages": messages, "add_generation_prompt": generation_prompt,
                                        **kwargs}, shared=True)
        text = compiled.environment.concat(compiled.root_render_func(context))
    except Exception:  # noqa: BLE001 - the wrapper raises the template's error with jinja's traceback
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    if not state["checked"]:
        state["checked"] = True
        slow = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
        if slow != text:
            state["off"] = True
            return slow
    return text


def _plain(messages) -> bool:
    return type(messages) is list and all(
        type(m) is dict and m.keys() <= _PLAIN_KEYS and all(type(v) is str for v in m.values()) for m in messages)


def _renderer(tokenizer):
    """(compiled template, its globals and the wrapper's fixed variables, state) for the tokenizer's current
    template; None where the fast path cannot be taken."""
    template = getattr(tokenizer, "chat_template", None)
    cached = tokenizer.__dict__.get(_STATE)
    if cached is None or cached[0] is not template:
        cached = (template, *_compile(tokenizer), {"checked": False, "off": False})
        tokenizer.__dict__[_STATE] = cached
    _, compiled, variables, state = cached
    if compiled is None or state["off"]:
        return None
    return compiled, variables, state


def _compile(tokenizer) -> tuple:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = tokenizer.get_chat_template(None, None)
        special = {k: list(v) if type(v) is list else v for k, v in tokenizer.special_tokens_map.items()}
        if not isinstance(template, str) or not all(type(v) is str or (type(v) is list and all(
                type(x) is str for x in v)) for v in special.values()):
            return None, None
        compiled = _compile_jinja_template(template)
        return compiled, {**compiled.globals, "tools": None, "documents": None, **special}
    except Exception:  # noqa: BLE001 - any transformers without these internals renders through its own wrapper
        return None, None
