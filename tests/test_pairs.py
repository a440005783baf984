"""Token-exact pair building: shared prompt tokens, end-of-turn kept, BPE boundary, truncation rules."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from trinity_dpo.data.conversations import Conversation, DataReport
from trinity_dpo.errors import DataError
from trinity_dpo.data.pairs import Limits, build_pairs, render

LOOSE = Limits(max_prompt=10_000, max_response=10_000)


def conv(prompt="what do you think about pizza?", chosen="oh pizza is totally awesome!",
         rejected="as an ai language model I do not have opinions.", row=1) -> Conversation:
    return Conversation(row, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                        [{"role": "assistant", "content": rejected}])


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fixture,end_of_turn", [("qwen_dir", "<|im_end|>"), ("llama3_dir", "<|eot_id|>")])
def test_pairs_are_the_rendered_conversation_tokens(request, fixture, end_of_turn):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    c = conv()
    [pair] = build_pairs([c], tok, LOOSE, DataReport("x"))
    assert pair.prompt_ids == encode(tok, render(tok, c.prompt, True))
    assert pair.prompt_ids + pair.chosen_ids == encode(tok, render(tok, c.prompt + c.chosen, False))
    assert pair.prompt_ids + pair.rejected_ids == encode(tok, render(tok, c.prompt + c.rejected, False))
    assert tok.convert_tokens_to_ids(end_of_turn) in pair.chosen_ids[-2:]
    assert tok.decode(pair.chosen_ids).startswith("oh pizza")


def test_bpe_merge_across_the_boundary(space_dir):
    """The template's generation prompt ends in a space; the whole conversation merges it into ' oh'."""
    tok = AutoTokenizer.from_pretrained(space_dir)
    c = conv()
    prompt_text = render(tok, c.prompt, True)
    full_text = render(tok, c.prompt + c.chosen, False)
    p_ids, full_ids = encode(tok, prompt_text), encode(tok, full_text)
    assert prompt_text.endswith(": ") and full_ids[:len(p_ids)] != p_ids  # the merge really happens
    report = DataReport("x")
    [pair] = build_pairs([c], tok, LOOSE, report)
    assert pair.prompt_ids == p_ids  # exactly what generation would be conditioned on
    assert pair.chosen_ids == encode(tok, full_text[len(prompt_text):])
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == full_text
    assert report.resplit == 2


def test_long_prompt_keeps_its_end_and_response_its_start(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    c = conv(prompt="pizza " * 60, chosen="wow " * 40, rejected="as an ai " * 20)
    [full] = build_pairs([c], tok, LOOSE, DataReport("x"))
    report = DataReport("x")
    [cut] = build_pairs([c], tok, Limits(max_prompt=20, max_response=15), report)
    assert cut.prompt_ids == full.prompt_ids[-20:]
    assert tok.decode(cut.prompt_ids).endswith("<|im_start|>assistant\n")  # the generation header survives
    assert cut.chosen_ids == full.chosen_ids[:15]
    assert cut.rejected_ids == full.rejected_ids[:15]
    assert report.truncated == {"prompt": 1, "chosen": 1, "rejected": 1}
    assert "truncated: 1 chosen, 1 prompt, 1 rejected" in report.summary()


def test_max_model_len_caps_the_whole_sequence(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    [pair] = build_pairs([conv(chosen="wow " * 40)], tok, Limits(1000, 1000, max_total=40), DataReport("x"))
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 40
    assert len(pair.prompt_ids) + len(pair.rejected_ids) <= 40


def test_trainer_file_lengths_count_but_never_cut_or_refuse(qwen_dir):
    """Trinity's DPO reader never cut rows by verl's data.max_prompt_length/max_response_length (nor refused them
    under data.truncation: error): such pairs are kept whole and counted; no limits at all means no cut."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    [whole] = build_pairs([conv(row=7)], tok, Limits(), DataReport("x"))
    report = DataReport("x")
    [pair] = build_pairs([conv(row=7)], tok, Limits(count_prompt=5, count_response=3), report)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (whole.prompt_ids, whole.chosen_ids,
                                                                     whole.rejected_ids)
    assert report.truncated == {}
    assert report.over_limit == {"prompt over data.max_prompt_length": 1, "response over data.max_response_length": 1}
    assert "kept whole, as Trinity's DPO reader did: 1 prompt over data.max_prompt_length" in report.summary()
    assert report.as_dict()["kept_whole"] == dict(report.over_limit)


def test_identical_after_truncation_is_dropped(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    report = DataReport("x", read=2)
    pairs = build_pairs([conv(chosen="same start one", rejected="same start two"), conv(row=2)], tok,
                        Limits(1000, 2), report)
    assert [p.row for p in pairs] == [2] and pairs[0].index == 0
    assert report.dropped == {"identical after truncation": 1}


def test_template_errors(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template; set model.custom_chat_template"):
        build_pairs([conv()], tok, LOOSE, DataReport("x"))
    # A template that renders the prompt alone differently from the conversation's start.
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    with pytest.raises(DataError, match="renders the prompt with its generation header differently"):
        build_pairs([conv()], tok, LOOSE, DataReport("x"))


EDGE_TEXTS = ["Sure.", " Sure", "\n\nSure", "  \n x", "", "naïve 東京 😂", "a<|im_end|>b", "<|im_start|>user", "\t",
              "ends with space ", "ends with newline\n", "x" * 300, "oh wow!! haha", "I\n\n\n\nthink"]


def _edge_conversations() -> list[Conversation]:
    convs = []
    for i, text in enumerate(EDGE_TEXTS):
        other = EDGE_TEXTS[(i + 3) % len(EDGE_TEXTS)] + "."
        prompt = [{"role": "user", "content": EDGE_TEXTS[(i + 5) % len(EDGE_TEXTS)] or "hi"}]
        if i % 3 == 0:  # a multi-turn prompt, with a system message
            prompt = [{"role": "system", "content": "be brief "}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": text + "?"}, *prompt]
        convs.append(Conversation(i + 1, prompt, [{"role": "assistant", "content": text}],
                                  [{"role": "assistant", "content": other}]))
    return convs


@pytest.mark.parametrize("pieces", [True, False])
@pytest.mark.parametrize("fixture", ["qwen_dir", "llama3_dir", "space_dir", "smollm2"])
def test_prompt_encoded_once_gives_the_ids_of_whole_conversations(request, fixture, pieces, monkeypatch):
    """Each conversation encoded from its prompt's last added token on, after the prompt's ids (`encode.py`),
    gives the ids of encoding the whole conversation: responses that begin with spaces or newlines, special-token
    text inside the content, unicode, multi-turn prompts, empty responses; for ChatML, Llama 3, a template whose
    prompt ends in a space (a merge across the boundary) and SmolLM2's real tokenizer. Prompts are cut at their
    added tokens with each piece encoded once per process (`pieces`, run twice so the second run reads the memo)
    or encoded whole with offsets."""
    from trinity_dpo.data import encode, pairs as pairs_module

    if fixture == "smollm2":
        from trinity_dpo.sources import builtin

        folder = builtin.materialize("builtin:smollm2-135m-instruct")
    else:
        folder = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    assert encode.continuation_encoder(tok) is not None
    if not pieces:
        monkeypatch.setattr(encode, "_pieces", lambda tokenizer, backend: None)
    else:
        assert encode._pieces(tok, tok.backend_tokenizer) is not None
    convs = _edge_conversations()
    if pieces:
        build_pairs(convs, tok, Limits(), DataReport("x"))
        assert len(encode._pieces(tok, tok.backend_tokenizer)[2]) > 0  # pieces memoized, read by the next build
        monkeypatch.setattr(encode, "_MEMO_PIECES", 5)  # and the memo full: emptied, then this batch's pieces
    fast = build_pairs(convs, tok, Limits(), report := DataReport("x"))
    monkeypatch.setattr(pairs_module, "continuation_encoder", lambda tokenizer: None)
    whole = build_pairs(convs, tok, Limits(), again := DataReport("x"))
    assert [vars(p) for p in fast] == [vars(p) for p in whole] and len(fast) == len(convs)
    assert report.as_dict() == again.as_dict()


def test_tokenizers_whose_pieces_are_not_independent_encode_whole_texts(qwen_dir):
    """A position-dependent pre-tokenizer (Metaspace prepends its marker to the first piece only) or an added token
    that strips whitespace: no continuation encoding. A normaliser acts on each piece alone: continuations stay,
    and give the whole texts' ids."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    from trinity_dpo.data.encode import continuation_encoder

    variants = []
    for change in ("metaspace", "rstrip", "normalizer"):
        tok = AutoTokenizer.from_pretrained(qwen_dir)
        backend = tok.backend_tokenizer
        if change == "normalizer":
            backend.normalizer = normalizers.NFKC()
        elif change == "metaspace":
            backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        else:
            backend.add_special_tokens([AddedToken("<|extra|>", rstrip=True, special=True)])
        variants.append(continuation_encoder(tok))
    assert variants[:2] == [None, None] and variants[2] is not None
    convs = _edge_conversations()
    with_nfkc = build_pairs(convs, tok, Limits(), DataReport("x"))
    texts = [render(tok, c.prompt + c.chosen, False) for c in convs]
    assert [p.prompt_ids + p.chosen_ids for p in with_nfkc] == tok(texts, add_special_tokens=False)["input_ids"]


_NO_THINKING = "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
THINKING_TEMPLATE = (  # Qwen3's switch, reduced: `enable_thinking: false` writes an empty think block after the header
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}" + _NO_THINKING +
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n" + _NO_THINKING + "{% endif %}")


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_enable_thinking_reaches_the_template_for_pairs_and_unpaired_rows(make_config, algorithm):
    """`model.enable_thinking: false` is handed to the chat template for every prompt a preference pair or a KTO
    example is rendered with, and for the prompts answered before and after training (it was read for SFT only)."""
    from trinity_dpo.config.loader import load_config
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.data.pairs import prompt_ids
    from trinity_dpo.engine.modeling import load_tokenizer

    kl = {"kl_loss_fn": "none"} if algorithm == "kto" else {}
    texts = {}
    for thinking in (None, False):
        model = {"custom_chat_template": THINKING_TEMPLATE, **({} if thinking is None else {"enable_thinking": thinking})}
        cfg = load_config(make_config(main={"model": model, "algorithm": {"algorithm_type": algorithm, **kl},
                                            "buffer": {"batch_size": 4, "trainer_input": {"eval_fraction": 0.25}}}))
        tokenizer = load_tokenizer(cfg)
        data = load_data(cfg, tokenizer)
        texts[thinking] = (tokenizer.decode(data.train[0].prompt_ids),
                           tokenizer.decode(prompt_ids(tokenizer, data.sample_prompts[0], data.template)))
    assert all(t.endswith("<|im_start|>assistant\n") for t in texts[None])
    assert all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in texts[False])


def test_tool_calls_reasoning_and_tools_reach_the_template(make_config, qwen_dir, tmp_path):
    """A prompt with an assistant tool call (no text) and the tool's answer, a chosen answer with its reasoning, and a
    `tools` column: the pair is rendered from all of it, as TRL hands messages and tools to the template (only role
    and content were kept, and the tools were dropped)."""
    from transformers import AutoTokenizer

    from trinity_dpo.config.loader import load_config
    from trinity_dpo.data.dataset import load_data
    from trinity_dpo.engine.modeling import load_tokenizer

    template = ("{% if tools %}<tools>{{ tools | map(attribute='name') | join(',') }}</tools>{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
                "{% if m.tool_calls is defined %}<call>{{ m.tool_calls[0].name }}</call>{% endif %}"
                "{{ m['content'] or '' }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    prompt = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None,
                                                          "tool_calls": [{"name": "get_weather"}]},
              {"role": "tool", "content": "sunny"}]
    rows = [{"prompt": prompt, "tools": [{"name": "get_weather"}],
             "chosen": [{"role": "assistant", "content": "It is sunny.", "reasoning_content": "the tool said so"}],
             "rejected": [{"role": "assistant", "content": f"No idea {i}."}]} for i in range(4)]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(make_config(data=data, main={"model": {"custom_chat_template": template}, "buffer": {
        "batch_size": 4, "trainer_input": {"experience_buffer": {"format": {"prompt_type": "messages"}}}}}))
    tokenizer = load_tokenizer(cfg)
    pair = load_data(cfg, tokenizer).train[0]
    reference = AutoTokenizer.from_pretrained(qwen_dir)
    reference.chat_template = template
    full = reference.apply_chat_template(prompt + rows[0]["chosen"], tools=rows[0]["tools"], tokenize=False)
    assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids) == full
    assert "<tools>get_weather</tools>" in full and "<call>get_weather</call>" in full and "<think>" in full
