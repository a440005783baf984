"""`trinity export`: every file is read back with transformers' GGUF loader (the reader the built-in model takes) and
must compute what the checkpoint computes: f32 within 1e-5; f16, bf16 and q8_0 within 1e-5 of the checkpoint with
its matrices rounded the same way (an independent rounding for f16 and bf16), and within a stated distance of the
unrounded checkpoint. Its tokenizer gives the checkpoint's ids, and the Modelfile's template renders what the chat
template renders."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trinity_dpo import cli
from trinity_dpo.run.export import export

TEXTS = ["hello there, how are you?", "what do you think about karaoke tomorrow?",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhey!<|im_end|>\n<|endoftext|>",
         "  odd   spacing\n\nand 12345 numbers 😂 ünïcode",
         "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "what is your favorite movie?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hi, what is up?"}, {"role": "user", "content": "pizza or karaoke tonight?"}],
]


def write(folder, tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    export(str(folder), str(path), kind)
    return path


def read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def checkpoint(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def logits(model, tokenizer) -> list[torch.Tensor]:
    """Next-token logits at every position of the conversations, rendered by the checkpoint's template."""
    with torch.no_grad():
        return [model(torch.tensor([tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)])).logits[0]
                for c in CONVERSATIONS]


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_computes_the_checkpoint_and_keeps_its_tokenizer(arch, llama_dir, qwen_dir, tmp_path):
    folder = {"llama": llama_dir, "qwen2": qwen_dir}[arch]
    model, tokenizer = checkpoint(folder)
    path = write(folder, tmp_path, "f32")
    back, back_tokenizer = read_back(path)
    assert max_gap(logits(back, tokenizer), logits(model, tokenizer)) <= 1e-5
    # Qwen2's output head is its embedding: the file has no output.weight, and the reader ties them again
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (arch == "llama") and back.config.tie_word_embeddings == (arch == "qwen2")
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert back_tokenizer.chat_template == tokenizer.chat_template
    for c in CONVERSATIONS:  # the template read back renders the same tokens
        assert (back_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                == tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert (back_tokenizer.bos_token, back_tokenizer.eos_token, back_tokenizer.pad_token) == (
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)


def _rounded(model, kind: str):
    """The checkpoint with every matrix rounded as `kind` stores it (vectors stay f32 in every type)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() < 2:
                continue
            if kind == "q8_0":  # gguf's Q8_0 is bit-exact with ggml's reference; the reader dequantizes with it too
                blocks = gguf.quants.quantize(param.numpy(), q8)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, q8)).reshape(param.shape))
            else:
                param.copy_(param.to(torch.float16 if kind == "f16" else torch.bfloat16).float())
    return model


# max |logit gap| to the unrounded checkpoint, as a share of its largest |logit|: measured at most 4e-4 (f16), 3e-3
# (bf16) and 9e-3 (q8_0) on these tiny random models; to the rounded checkpoint the gap measured 0.0
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


@pytest.mark.parametrize("arch, kind", [("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("qwen2", "q8_0")])
def test_rounded_types_compute_the_rounded_checkpoint(arch, kind, llama_dir, qwen_dir, tmp_path):
    folder = {"llama": llama_dir, "qwen2": qwen_dir}[arch]
    model, tokenizer = checkpoint(folder)
    path = write(folder, tmp_path, kind)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {name for name, t in stored.items() if t != kind.upper()} == {
        n for n in stored if n.endswith(("norm.weight", ".bias"))}  # vectors: F32
    assert set(stored[n] for n in stored if n.endswith(("norm.weight", ".bias"))) == {"F32"}
    back, _ = read_back(path)
    exact = logits(model, tokenizer)
    got = logits(back, tokenizer)
    assert max_gap(got, logits(_rounded(model, kind), tokenizer)) <= 1e-5
    scale = max(x.abs().max().item() for x in exact)
    # (no top-1 count here: a random tiny model's logits are near ties everywhere; SmolLM2's test counts them)
    assert max_gap(got, exact) <= TOLERANCE[kind] * scale


def test_a_lora_run_exports_as_its_merged_model(make_config, llama_dir, tmp_path):
    """`--run` of a LoRA run: its newest checkpoint is an adapter, merged into its base in memory; the file computes
    what the run's merged/ folder computes, and equals the file exported from merged/."""
    from trinity_dpo.config.loader import load_config
    from trinity_dpo.run import train

    run_dir = train.run(load_config(make_config(
        main={"name": "lora", "model": {"lora": {"rank": 4}}, "trainer": {"total_steps": 1, "eval_samples": 0}},
        model=llama_dir)))
    assert cli.main(["export", "--run", str(run_dir), "--gguf", str(tmp_path / "run.gguf"), "--type", "f32"]) == 0
    merged = run_dir / "global_step_1" / "merged"
    from_merged = write(merged, tmp_path, "f32")
    model, tokenizer = checkpoint(merged)
    expected = logits(model, tokenizer)
    assert max_gap(logits(checkpoint(llama_dir)[0], tokenizer), expected) > 1e-2  # the adapter changes the model
    assert max_gap(logits(read_back(tmp_path / "run.gguf")[0], tokenizer), expected) <= 1e-5
    assert max_gap(logits(read_back(from_merged)[0], tokenizer), expected) <= 1e-5
    assert (tmp_path / "run.Modelfile").is_file()


@pytest.mark.parametrize("name", ["qwen2", "smollm"])
def test_a_split_pre_tokenizer_is_written_under_llama_cpps_name(name, llama_dir, qwen_dir, tmp_path):
    """Qwen2's tokenizer (transformers' Qwen2Tokenizer, whatever tokenizer.json says) splits text with Qwen2's regex
    first and normalizes to NFC; the hub's SmolLM2 splits digits one by one. Each is written under llama.cpp's name
    for it, and reads back giving the same ids (transformers' reader has no digit split for `smollm`; this tiny
    vocabulary has no digit merges, so the ids agree anyway)."""
    from tokenizers import Tokenizer, pre_tokenizers

    folder = qwen_dir
    if name == "smollm":
        folder = tmp_path / name
        shutil.copytree(llama_dir, folder)
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.save(str(folder / "tokenizer.json"))
    path = write(folder, tmp_path, "f16")
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.pre").contents() == name
    _, tokenizer = checkpoint(folder)
    back_tokenizer = read_back(path)[1]
    # text in NFC only: a decomposed "e\u0301" is composed by Qwen2's tokenizer, by neither llama.cpp nor this reader
    for text in TEXTS + ["it's 2024: 1234567 digits, don't split", "caf\u00e9"]:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text


def _ollama_render(modelfile: str, messages: list[dict]) -> str:
    """What Ollama renders for `messages` under the Modelfile: SYSTEM in front of a conversation without a system
    message, then the Go template's one loop over the messages (the only constructs the export writes)."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}] + messages
    head, turn, tail = re.fullmatch(r"(.*)\{\{ range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S).groups()
    return head + "".join(turn.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                          for m in messages) + tail


@pytest.mark.parametrize("fixture, form, stops", [
    ("llama_dir", "ChatML", ["<|im_end|>", "<|im_start|>"]),
    ("llama3_dir", "Llama 3", ["<|eot_id|>", "<|start_header_id|>"]),
    ("space_dir", None, ["<|im_end|>"])])
def test_the_modelfile_template_renders_the_chat_template(fixture, form, stops, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    path = tmp_path / "model.gguf"
    line = export(str(folder), str(path), "q8_0")
    modelfile = (tmp_path / "model.Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and str(tmp_path / "model.Modelfile") in line
    assert re.findall(r'PARAMETER stop "(.*)"', modelfile) == stops
    if form is None:  # a template it does not know: said so, no TEMPLATE
        assert "TEMPLATE" not in modelfile.replace("write a TEMPLATE", "") and "not one it translates" in line
        return
    assert f"({form} template)" in line
    tokenizer = AutoTokenizer.from_pretrained(folder)
    longer = CONVERSATIONS[0] + [{"role": "assistant", "content": "sunny!"}, {"role": "user", "content": "great"}]
    for messages in CONVERSATIONS + [longer]:
        assert _ollama_render(modelfile, messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_a_tokenizer_that_adds_bos_keeps_it_out_of_the_template(llama3_dir, tmp_path):
    """Llama 3's tokenizer puts BOS in front of every text, and its template writes one too (Hugging Face renders
    the template without encoding's specials). The GGUF says add_bos_token, so llama.cpp adds it: the Modelfile's
    template leaves it out, or every prompt would start with two."""
    from tokenizers import Tokenizer, processors

    folder = tmp_path / "bos"
    shutil.copytree(llama3_dir, folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    backend.save(str(folder / "tokenizer.json"))
    _, tokenizer = checkpoint(folder)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    path = write(folder, tmp_path, "f16")
    assert gguf.GGUFReader(path).get_field("tokenizer.ggml.add_bos_token").contents() is True
    back_tokenizer = read_back(path)[1]
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    modelfile = path.with_suffix(".Modelfile").read_text()
    for messages in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith(bos) and _ollama_render(modelfile, messages) == rendered[len(bos):]


def _unsupported(tmp_path: Path) -> Path:
    from transformers import MistralConfig

    MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  vocab_size=100).save_pretrained(tmp_path / "mistral")
    return tmp_path / "mistral"


def _edited(tmp_path: Path, llama_dir: Path, name: str, edit) -> Path:
    folder = tmp_path / name
    shutil.copytree(llama_dir, folder)
    file = folder / ("config.json" if name == "rope" else "tokenizer.json")
    spec = json.loads(file.read_text())
    edit(spec)
    file.write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("case, message", [
    ("architecture", "is a mistral model; export writes llama (Llama, SmolLM2) and qwen2 (Qwen2, Qwen2.5)"),
    ("not a model", "has no config.json (not a model folder)"),
    ("type", "--type: 'q4_k' is not one of f32, f16, bf16, q8_0"),
    ("file name", "is not a file name ending in .gguf"),
    ("rope", "has rope scaling 'linear', which this export does not write"),
    ("pre-tokenizer", "the tokenizer's pre-tokenizer (Whitespace) is not one llama.cpp knows by name")])
def test_what_it_cannot_write_is_a_one_line_error(case, message, llama_dir, tmp_path, capsys):
    model, target, kind = llama_dir, tmp_path / "out.gguf", "f16"
    if case == "architecture":
        model = _unsupported(tmp_path)
    elif case == "not a model":
        (tmp_path / "empty").mkdir()
        model = tmp_path / "empty"
    elif case == "type":
        kind = "q4_k"
    elif case == "file name":
        target = tmp_path / "out.bin"
    elif case == "rope":
        model = _edited(tmp_path, llama_dir, "rope", lambda c: c["rope_parameters"].update(rope_type="linear",
                                                                                            factor=2.0))
    else:
        model = _edited(tmp_path, llama_dir, "pre", lambda t: t.update(pre_tokenizer={"type": "Whitespace"}))
    assert cli.main(["export", "--model", str(model), "--gguf", str(target), "--type", kind]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn leaves falling.",
             "How do I make a cup of tea?", "Explain photosynthesis to a child.",
             "Give me three tips for learning to code.", "What's your favourite movie and why?",
             "Tell me a joke about cats.", "How far is the moon from the earth?",
             "Summarize the plot of Romeo and Juliet.", "What should I cook for dinner tonight?"]


@pytest.mark.slow
def test_the_built_in_smollm2_exports_for_llama_cpp(tmp_path):
    """The real model: SmolLM2-135M-Instruct (Llama, tied head, 9 query and 3 key heads), on its own greedy answers
    to ten questions (851 positions). f32 computes it within 1e-5 and tokenizes as it does. q8_0 keeps the top token
    wherever it leads the second by more than 0.25 logits, and at 97% of positions or more in all: measured 97.5%,
    every change at a near tie (below 0.16 logits). That is Q8_0's rounding of this model, not the file: the
    checkpoint rounded in memory computes what the file does (the tiny models' test), so no writer of Q8_0 does
    better, and the issue's 99% is not reached on this model."""
    from trinity_dpo.sources import builtin

    folder = builtin.materialize("builtin:smollm2-135m-instruct")
    model, tokenizer = checkpoint(folder)
    with torch.no_grad():
        answers = [model.generate(torch.tensor([tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)]),
            max_new_tokens=60, do_sample=False) for q in QUESTIONS]

    def scores(net):
        with torch.no_grad():
            return [net(ids).logits[0] for ids in answers]

    exact = scores(model)
    back, back_tokenizer = read_back(write(folder, tmp_path, "f32"))
    assert max_gap(scores(back), exact) <= 1e-5
    for text in TEXTS + ["Hello world 123 456789"]:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    del back
    got = scores(read_back(write(folder, tmp_path, "q8_0"))[0])
    same = torch.cat([x.argmax(-1) == y.argmax(-1) for x, y in zip(got, exact)])
    top2 = torch.cat([x.topk(2, -1).values for x in exact])
    assert same.float().mean().item() >= 0.97
    assert bool(same[(top2[:, 0] - top2[:, 1]) > 0.25].all())
