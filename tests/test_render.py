"""Chat templates rendered without `apply_chat_template`'s wrapper (`data/render.py`) give its exact text."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from trinity_dpo.data import render as render_module
from trinity_dpo.data.render import render

QWEN3_LIKE = (  # a keyword argument (enable_thinking) and the special tokens are template variables
    "{{ bos_token or '' }}{% for m in messages %}<|im_start|>{{ m['role'] }}"
    "{% if m.name is defined %} ({{ m.name }}){% endif %}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    "{{ eos_token }}")

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " lead\nand trail "},
     {"role": "assistant", "content": "ok <|im_end|> 🙂"}],
    [{"role": "user", "content": "a", "name": "ann"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "b"}],
]


@pytest.mark.parametrize("fixture", ["qwen_dir", "llama3_dir", "space_dir", "qwen3_like"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_same_text_as_apply_chat_template(request, tmp_path, fixture, generation_prompt):
    """ChatML, Llama 3 (bos_token in the template), a template whose prompt ends in a space, and one that reads
    enable_thinking, eos_token and a message's name: every conversation renders to apply_chat_template's text."""
    folder = request.getfixturevalue("qwen_dir" if fixture == "qwen3_like" else fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    kwargs = [{}]
    if fixture == "qwen3_like":
        tok.chat_template = QWEN3_LIKE
        kwargs = [{}, {"enable_thinking": False}, {"enable_thinking": True}]
    for extra in kwargs:
        for messages in CONVERSATIONS:
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                               **extra)
            assert render(tok, messages, generation_prompt, **extra) == expected
    assert tok.__dict__[render_module._STATE][3] == {"checked": True, "off": False}  # the fast path was taken


def test_other_messages_go_through_apply_chat_template(qwen_dir, monkeypatch):
    """Messages with other keys (reasoning, tool calls), values that are not strings (None, content blocks) or tools
    are rendered by transformers' own wrapper, which normalises them (it drops a None content)."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    tok.chat_template = QWEN3_LIKE.replace("{{ m['content'] }}", "{{ m.content | default('-') }}"
                                           "{{ m.reasoning_content | default('') }}")
    cases = [[{"role": "user", "content": None}], [{"role": "assistant", "content": "x", "reasoning_content": "r"}],
             [{"role": "user", "content": [{"type": "text", "text": "t"}]}]]
    calls = []
    real = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for messages in cases:
        assert render(tok, messages, True) == real(tok, messages, tokenize=False, add_generation_prompt=True)
    assert render(tok, CONVERSATIONS[0], True, tools=[{"type": "function", "function": {"name": "f"}}]) == real(
        tok, CONVERSATIONS[0], tools=[{"type": "function", "function": {"name": "f"}}], tokenize=False,
        add_generation_prompt=True)
    assert len(calls) == len(cases) + 1
    assert "<think>" not in render(tok, [{"role": "user", "content": None}], True)


def test_a_wrapper_that_passes_more_turns_the_fast_path_off(qwen_dir, monkeypatch):
    """If transformers' wrapper gives the template a variable this module does not (here `date_string`), the first
    rendering differs from apply_chat_template's: that and every later one are apply_chat_template's."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    tok.chat_template = "{{ date_string | default('none') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    real = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template",
                        lambda self, *a, **k: real(self, *a, **{"date_string": "today", **k}))
    assert render(tok, CONVERSATIONS[0], False) == "today|hi"
    assert render(tok, CONVERSATIONS[1], False).startswith("today|")
    assert tok.__dict__[render_module._STATE][3]["off"]


def test_a_new_template_is_compiled_and_checked_again(qwen_dir):
    """Setting another chat template on the same tokenizer (model.custom_chat_template) renders with it."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    first = render(tok, CONVERSATIONS[0], True)
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert render(tok, CONVERSATIONS[0], True) == "[hi]" != first
