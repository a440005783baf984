"""SFT equals TRL 1.16's `SFTTrainer` on the same rows: the trained tokens first (TRL's tokenized `input_ids` and
loss mask against ours), then three AdamW steps of `train.run` against `SFTTrainer.train()` (CPU, fp32, the tiny
Qwen2 model): the logged loss, entropy, mean_token_accuracy and gradient norm of each step.
- every assistant turn (`enable_concatenated_multi_turn`) vs TRL's `assistant_only_loss` on `messages` rows, with
  a ChatML template whose `{% generation %}` block wraps the assistant's content and `<|im_end|>\\n`;
- the last message (`plaintext` rows, the default) vs TRL's `completion_only_loss` on conversational
  prompt/completion rows.
All rows form one optimizer step (batch 4 = the data; two micro-batches of 2 on our side), so the per-epoch
shuffling on either side cannot matter to a token-mean loss. The rows train very different numbers of tokens, so
the token mean (TRL's, ours) and the mean of per-row means (`seq-mean-token-mean`) visibly differ."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import need_extra

trl = need_extra("trl")

from test_sft import metrics, sft_config  # noqa: E402,F401  (sft_config: the fixture)
from tiny import CHATML_TEMPLATE  # noqa: E402
from trinity_dpo.run import train  # noqa: E402
from trinity_dpo.config.schema import FormatConfig  # noqa: E402
from trinity_dpo.config.loader import load_config  # noqa: E402
from trinity_dpo.data.conversations import DataReport  # noqa: E402
from trinity_dpo.data.sft import build_examples, to_dialogue  # noqa: E402

LR, STEPS, TOL = 1e-3, 3, 1e-5
# The tiny model's ChatML template with generation markers: the assistant's content and `<|im_end|>\n`, after the
# `<|im_start|>assistant\n` header, are the assistant's tokens.
GEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def talk(*turns, system=None):
    roles = ("user", "assistant")
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


CONVERSATIONS = [
    talk("hi there", "hello friend! " * 8 + "how is your day going today?"),
    talk("what about pizza?", "yes!"),
    talk("hey", "hi! what do you like?", "I love karaoke and rock songs", "cool, me too! karaoke is so fun"),
    talk("do you like cats?", "oh totally", "and dogs?", "no", system="be short"),
]
QA = [("hi there", "hello friend! " * 10 + "what a great day"), ("2+2?", "4"),
      ("your favorite movie?", "oh I think the best movie ever is the one with the cat and the dog"),
      ("weather today?", "sunny")]
PLAIN_ROWS = [{"question": q, "answer": a} for q, a in QA]
PROMPT_COMPLETION = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                     for q, a in QA]
MULTI_TURN = {"prompt_type": "messages", "messages_key": "messages", "enable_concatenated_multi_turn": True}
PLAINTEXT = {"prompt_type": "plaintext", "prompt_key": "question", "response_key": "answer"}


@pytest.fixture(scope="module")
def warm_dir(qwen_dir, tmp_path_factory):
    """The tiny model after a few full-sequence LM steps on these rows: peaked predictions, so that the token
    accuracy is not 0, the entropy varies and per-row NLLs differ (a random init predicts every token at ~ln 500)."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in CONVERSATIONS] + [
        tok.apply_chat_template([*r["prompt"], *r["completion"]], tokenize=False) for r in PROMPT_COMPLETION]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(12):
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("warm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def trl_trainer(model_dir, tmp_path, rows, template=None, **kwargs):
    tok = AutoTokenizer.from_pretrained(model_dir)
    if template:
        tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1e9, seed=0, packing=False, padding_free=False, **kwargs)
    return trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def our_examples(model_dir, rows, fmt):
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == CHATML_TEMPLATE  # ours renders with the model's own template, without markers
    fmt = FormatConfig(**fmt)
    return build_examples([to_dialogue(r, i, fmt) for i, r in enumerate(rows, 1)], tok, fmt, None, None,
                          DataReport("x"))


def our_run(sft_config, model_dir, rows, fmt, name, agg="token-mean"):  # noqa: F811
    path = sft_config(fmt=fmt, rows=rows,
                      main={"name": name, "model": {"model_path": str(model_dir)},
                            "algorithm": {"algorithm_type": "sft", "loss_agg_mode": agg},
                            "buffer": {"batch_size": 4, "total_epochs": STEPS}, "trainer": {"grad_clip": 0}},
                      verl={"actor_rollout_ref": {"actor": {"optim": {"lr": LR, "weight_decay": 0.0},
                                                            "ppo_micro_batch_size_per_gpu": 2}}})
    cfg = load_config(path)
    assert cfg.trainer.grad_clip == 0 and cfg.algorithm.optimizer.lr == LR  # 0: no clipping (train.py: inf)
    return [r for r in metrics(train.run(cfg)) if "loss" in r]


def nll_means(model_dir, examples) -> tuple[float, float]:
    """The model's NLL of the trained tokens: the token mean over all rows, and the mean of row means."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sums, counts = [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(ex.prompt_ids + ex.response_ids)
            mask = torch.tensor([0] * len(ex.prompt_ids) + ex.response_mask, dtype=torch.bool)[1:]
            logp = model(ids[None]).logits[0, :-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
            sums.append(-logp[mask].sum().item())
            counts.append(int(mask.sum()))
    assert len(set(counts)) == len(counts)  # every row trains a different number of tokens
    return sum(sums) / sum(counts), sum(s / c for s, c in zip(sums, counts)) / len(sums)


def check_tokens(trainer, examples, trained_runs):
    """TRL's input ids and loss mask (its `labels`) equal ours, row by row; `trained_runs`: the assistant spans."""
    tok = trainer.processing_class
    assert len(trainer.train_dataset) == len(examples) == 4
    for row, ex, runs in zip(trainer.train_dataset, examples, trained_runs):
        ids = ex.prompt_ids + ex.response_ids
        mask = [0] * len(ex.prompt_ids) + ex.response_mask
        assert row["input_ids"] == ids
        assert [int(label != -100) for label in row["labels"]] == mask
        assert all(label in (-100, i) for label, i in zip(row["labels"], ids))
        assert tok.decode(ids[-2:]) == "<|im_end|>\n"  # the template's ending: TRL appended no EOS
        spans, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                spans, current = spans + [tok.decode(current)], []
        assert spans + ([tok.decode(current)] if current else []) == [a + "<|im_end|>\n" for a in runs]


def compare(trl_logs, ours, token_mean, row_mean, seq_mean_run=None):
    assert len(trl_logs) == len(ours) == STEPS
    trl_loss = [h["loss"] for h in trl_logs]
    assert abs(trl_loss[0] - token_mean) < TOL, (trl_loss[0], token_mean)  # TRL's loss is the token mean
    assert abs(token_mean - row_mean) > 1e-4, (token_mean, row_mean)  # and that differs from the row mean
    for step, (theirs, mine) in enumerate(zip(trl_logs, ours), 1):
        assert mine["lr"] == LR and mine["rows"] == 4
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert abs(mine[key] - theirs[key]) <= TOL * max(1.0, abs(theirs[key])), (step, key, mine, theirs)
        assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-4 * theirs["grad_norm"], (step, mine, theirs)
    assert trl_loss[-1] < trl_loss[0] - 1e-2  # it trained
    if seq_mean_run is not None:
        assert abs(seq_mean_run[0]["loss"] - row_mean) < TOL
        for a, b in zip(seq_mean_run, trl_loss):
            assert abs(a["loss"] - b) > 1e-4, (seq_mean_run, trl_loss)


def test_every_assistant_turn_equals_trl_assistant_only_loss(tmp_path, warm_dir, sft_config):  # noqa: F811
    trainer = trl_trainer(warm_dir, tmp_path, CONVERSATIONS, template=GEN_TEMPLATE, assistant_only_loss=True)
    examples = our_examples(warm_dir, CONVERSATIONS, MULTI_TURN)
    runs = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in CONVERSATIONS]
    check_tokens(trainer, examples, runs)
    token_mean, row_mean = nll_means(warm_dir, examples)
    trainer.train()
    trl_logs = [h for h in trainer.state.log_history if "loss" in h]
    ours = our_run(sft_config, warm_dir, CONVERSATIONS, MULTI_TURN, "multi")
    seq_mean = our_run(sft_config, warm_dir, CONVERSATIONS, MULTI_TURN, "multi_seq", agg="seq-mean-token-mean")
    compare(trl_logs, ours, token_mean, row_mean, seq_mean)


def test_last_message_equals_trl_completion_only_loss(tmp_path, warm_dir, sft_config):  # noqa: F811
    trainer = trl_trainer(warm_dir, tmp_path, PROMPT_COMPLETION, completion_only_loss=True)
    assert not trainer.args.assistant_only_loss
    examples = our_examples(warm_dir, PLAIN_ROWS, PLAINTEXT)
    check_tokens(trainer, examples, [[a] for _, a in QA])
    token_mean, row_mean = nll_means(warm_dir, examples)
    trainer.train()
    trl_logs = [h for h in trainer.state.log_history if "loss" in h]
    compare(trl_logs, our_run(sft_config, warm_dir, PLAIN_ROWS, PLAINTEXT, "last"), token_mean, row_mean)
