"""SFT (algorithm_type: sft): rows in Trinity's shapes, the trained-token masks, bad and long rows, and runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from conftest import _deep_update
from trinity_dpo.run import train
from trinity_dpo.config.schema import FormatConfig, StorageConfig
from trinity_dpo.errors import ConfigError
from trinity_dpo.config.loader import load_config
from trinity_dpo.data.conversations import BadRow, DataReport
from trinity_dpo.errors import DataError
from trinity_dpo.data.sft import Dialogue, build_examples, to_dialogue

TALK = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend!"},
        {"role": "user", "content": "what about pizza?"}, {"role": "assistant", "content": "pizza is great!"}]


def sft_rows(n=12):
    return [{"messages": [{"role": "user", "content": f"hi there {i}"},
                          {"role": "assistant", "content": "hello friend " * (i % 3 + 1)},
                          {"role": "user", "content": "what about pizza?"},
                          {"role": "assistant", "content": "pizza is great!" + " yes" * (i % 4)}]} for i in range(n)]


@pytest.fixture()
def sft_config(make_config, tmp_path):
    """An SFT config: Trinity's example's keys (messages_key: messages) with a tiny model and file."""

    def make(fmt=None, main=None, verl=None, rows=None):
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in (rows or sft_rows())))
        base = {"algorithm": {"algorithm_type": "sft"},
                "buffer": {"batch_size": 4, "total_epochs": 1, "trainer_input": {"experience_buffer": {
                    "path": str(data), "format": {"prompt_type": "messages", "messages_key": "messages",
                                                  **(fmt or {})}}}},
                "trainer": {"actor_kl_loss_coef": None}}
        _deep_update(base, main or {})
        return make_config(main=base, verl=verl)

    return make


# ----------------------------------------------------------------------------- rows


def test_row_shapes():
    """Messages (a list, or its JSON text), plaintext with prompt_key/response_key, a system message, tools."""
    fmt = FormatConfig(prompt_type="messages", messages_key="messages")
    assert to_dialogue({"messages": TALK}, 1, fmt).messages == TALK
    assert to_dialogue({"messages": json.dumps(TALK)}, 1, fmt).messages == TALK
    # Trinity's default column for messages is `message`.
    assert to_dialogue({"message": TALK}, 1, FormatConfig(prompt_type="messages")).messages == TALK
    fmt = FormatConfig(prompt_type="plaintext", prompt_key="question", response_key="answer", system_prompt="be nice")
    d = to_dialogue({"question": "2+2?", "answer": "4"}, 1, fmt)
    assert d.messages == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    d = to_dialogue({"messages": TALK, "tools": json.dumps(tools)}, 1, FormatConfig(messages_key="messages",
                                                                                     prompt_type="messages"))
    assert d.tools == tools and d.prompt == TALK[:3]


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    (TALK[:3], "last message not from the assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty message"),
    ([{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "yo"}], "unknown role"),
    ("not json", "'messages' not JSON"),
])
def test_bad_rows_have_reasons(messages, reason):
    with pytest.raises(BadRow) as err:
        to_dialogue({"messages": messages}, 1, FormatConfig(prompt_type="messages", messages_key="messages"))
    assert err.value.reason == reason


def _trained_text(tokenizer, example) -> list[str]:
    """The trained tokens of an example, decoded run by run (consecutive trained tokens joined)."""
    runs, current = [], []
    for token, m in zip(example.response_ids, example.response_mask):
        if m:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


def test_masks_last_message_or_every_assistant_turn(qwen_dir):
    """ChatML: the last message trains `pizza is great!<|im_end|>\\n` (what the whole rendering adds after the
    rendering of the first three messages with `<|im_start|>assistant\\n`); with enable_concatenated_multi_turn both
    assistant turns train, the user turn between them does not."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    d = Dialogue(1, TALK)
    for every, expected in ((False, ["pizza is great!<|im_end|>\n"]),
                            (True, ["hello friend!<|im_end|>\n", "pizza is great!<|im_end|>\n"])):
        fmt = FormatConfig(prompt_type="messages", enable_concatenated_multi_turn=every)
        [ex] = build_examples([d], tok, fmt, None, None, DataReport("x"))
        assert _trained_text(tok, ex) == expected
        assert tok.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
        assert ex.target_counts() == (sum(ex.response_mask),) and ex.response_mask[0] == 1


def test_rows_over_max_model_len_follow_truncation(qwen_dir):
    """Unset (verl's `error`): refused and counted. `right` keeps the start, `left` the end (and its trained tokens),
    `middle` both ends; each cut is counted. A cut that leaves no trained token refuses the row."""
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    d = Dialogue(1, TALK)
    fmt = FormatConfig(prompt_type="messages")
    [whole] = build_examples([d], tok, fmt, None, None, DataReport("x"))
    n = whole.n_tokens
    report = DataReport("x")
    assert build_examples([d], tok, fmt, n - 1, None, report) == [] and report.dropped["over model.max_model_len"] == 1
    report = DataReport("x")
    [left] = build_examples([d], tok, fmt, n - 5, "left", report)
    assert left.n_tokens == n - 5 and left.response_ids == whole.response_ids
    assert report.truncated["conversation (left)"] == 1
    [middle] = build_examples([d], tok, fmt, n - 5, "middle", DataReport("x"))
    assert middle.n_tokens == n - 5 and middle.response_ids[-3:] == whole.response_ids[-3:]
    report = DataReport("x")
    assert build_examples([d], tok, fmt, len(whole.prompt_ids) - 2, "right", report) == []
    assert report.dropped["no assistant tokens after truncation"] == 1
    with pytest.raises(DataError, match="row 1: 75 tokens, over model.max_model_len=3"):  # on_bad_row: error
        build_examples([d], tok, fmt, 3, None, DataReport("x"), on_bad_row="error")


# ----------------------------------------------------------------------------- config


def test_trinity_sft_example_config(sft_config):
    """Trinity's examples/sft_mot keys: algorithm_type sft gets policy_loss_fn sft; loss_agg_mode token-mean;
    the older use_token_level_loss spelling; SFT-only and DPO-only settings refused in one line."""
    cfg = load_config(sft_config(main={"trainer": {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": 22000}}))
    assert (cfg.algorithm.policy_loss_fn, cfg.algorithm.loss_agg_mode) == ("sft", "token-mean")
    cfg = load_config(sft_config(main={"algorithm": {"algorithm_type": "sft", "use_token_level_loss": False}}))
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-mean"
    errors = [
        (dict(main={"algorithm": {"algorithm_type": "sft", "policy_loss_fn": "dpo"}}),
         "algorithm.policy_loss_fn: 'dpo' does not go with algorithm_type 'sft'"),
        (dict(fmt={"prompt_type": "chatpair"}), "format.prompt_type: chatpair is for preference pairs"),
        (dict(main={"algorithm": {"algorithm_type": "dpo"}}, fmt={"enable_concatenated_multi_turn": True}),
         "format.enable_concatenated_multi_turn applies to SFT rows"),
        (dict(main={"algorithm": {"algorithm_type": "sft", "loss_agg_mode": "seq-mean-token-mean",
                                  "use_token_level_loss": True}}),
         "conflicting values for one setting: algorithm.loss_agg_mode='seq-mean-token-mean'"),
    ]
    for kwargs, message in errors:
        with pytest.raises(ConfigError) as err:
            load_config(sft_config(**kwargs))
        assert message in str(err.value)


# ----------------------------------------------------------------------------- runs


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_run_logs_loss_ppl_and_held_out(sft_config):
    """A run on every assistant turn: no reference pass, TRL's SFT metrics plus perplexity, held-out loss and
    perplexity before and after, a loadable checkpoint and the report."""
    path = sft_config(fmt={"enable_concatenated_multi_turn": True},
                      main={"buffer": {"batch_size": 4, "total_epochs": 2, "trainer_input": {"eval_fraction": 0.25}},
                            "trainer": {"eval_samples": 1, "eval_max_new_tokens": 4}})
    run_dir = train.run(load_config(path))
    rows = [r for r in metrics(run_dir) if "loss" in r]
    evals = [r for r in metrics(run_dir) if "eval/loss" in r]
    assert len(rows) == 6 and not (run_dir / "ref_cache").exists()
    for r in rows:
        assert {"loss", "ppl", "tokens", "tokens_per_s", "grad_norm", "lr", "rows", "entropy",
                "mean_token_accuracy"} <= r.keys()
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-6)  # token-mean: the loss is the mean NLL
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [e["step"] for e in evals] == [0, 6] and evals[1]["eval/ppl"] < evals[0]["eval/ppl"]
    assert (run_dir / "global_step_6" / "model.safetensors").is_file() and (run_dir / "report.html").is_file()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sft_micro_batched_step_equals_full_batch_step(sft_config, agg):
    """The loss is normalised by the step's global counts (tokens, or rows), so micro-batches of 1 give the step
    of one full batch."""
    runs = {}
    for micro in (4, 1):
        path = sft_config(main={"name": f"m{micro}", "algorithm": {"algorithm_type": "sft", "loss_agg_mode": agg},
                                "trainer": {"total_steps": 2}},
                          verl={"actor_rollout_ref": {"actor": {"ppo_micro_batch_size_per_gpu": micro}}})
        runs[micro] = metrics(train.run(load_config(path)))
    for a, b in zip(runs[4], runs[1]):
        for key in ("loss", "ppl", "grad_norm", "entropy", "mean_token_accuracy"):
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), key


TRINITY_SFT_MOT = """
mode: train
project: "Trinity-RFT-example"
name: "sft_mot"
checkpoint_root_dir: {root}
algorithm:
  algorithm_type: sft
  optimizer:
    lr: 1e-5
model:
  model_path: {model}
  max_response_tokens: 10240
  max_model_len: 10752
cluster:
  node_num: 1
  gpu_per_node: 1
buffer:
  total_epochs: 1
  train_batch_size: 4
  trainer_input:
    experience_buffer:
      name: MoT
      storage_type: file
      path: {data}
      subset_name: math
      format:
        prompt_type: messages
        messages_key: messages
synchronizer:
  sync_method: 'checkpoint'
  sync_interval: 10
trainer:
  save_interval: 10
  grad_clip: 1.0
  use_dynamic_bsz: true
  ppo_max_token_len_per_gpu: 22000
  ulysses_sequence_parallel_size: 1
"""


def test_trinity_sft_mot_example_runs_with_only_paths_changed(tmp_path, qwen_dir):
    """Trinity's examples/sft_mot/sft.yaml (gpu_per_node 1 and batch 4 for a CPU test) on a dataset folder with a
    `math` config in Mixture-of-Thoughts' shape (`messages`)."""
    folder = tmp_path / "mot"
    (folder / "math").mkdir(parents=True)
    (folder / "math" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8)))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: math\n  data_files:\n  - split: train\n"
                                      "    path: math/train.jsonl\n---\n")
    path = tmp_path / "sft.yaml"
    path.write_text(TRINITY_SFT_MOT.format(root=tmp_path / "ckpt", model=qwen_dir, data=folder))
    cfg = load_config(path, ["trainer.precision=fp32"])
    assert (cfg.algorithm.optimizer.lr, cfg.model.max_model_len, cfg.trainer.grad_clip) == (1e-5, 10752, 1.0)
    run_dir = train.run(cfg)
    assert [r["rows"] for r in metrics(run_dir) if "loss" in r] == [4, 4]


def test_builtin_sft_demo_set():
    from trinity_dpo.sources import builtin
    from trinity_dpo.sources.files import read_rows

    folder = builtin.data_path("builtin:human-like-sft-demo")
    train_rows, test_rows = read_rows(folder, "train"), read_rows(folder, "test")
    fmt = FormatConfig(prompt_type="messages", messages_key="messages")
    dialogues = [to_dialogue(r, i, fmt) for i, r in enumerate(train_rows + test_rows, 1)]
    assert len(train_rows) > 200 and len(test_rows) > 20
    assert any(sum(m["role"] == "assistant" for m in d.messages) == 2 for d in dialogues)
    assert not {d.prompt[0]["content"] for d in dialogues[:len(train_rows)]} & {
        d.prompt[0]["content"] for d in dialogues[len(train_rows):]}


def test_sft_crash_then_resume_equals_uninterrupted(sft_config, monkeypatch):
    """Killed inside step 3 of 6 (newest checkpoint: step 2), the same command finishes bitwise like a run never
    interrupted."""
    from test_resume import assert_same_run, run_killed_in_step

    def config(name):
        return sft_config(main={"name": name, "buffer": {"total_epochs": 2}, "trainer": {"save_interval": 2}})

    whole = train.run(load_config(config("whole")))
    run_killed_in_step(config("crashed"), 3, monkeypatch)
    train.run(load_config(config("crashed")))
    assert_same_run(whole, whole.parent / "crashed", 6)


def test_trinity_eval_of_an_sft_checkpoint(sft_config):
    """`trinity eval --model CKPT --config sft.yaml`: the base model's and the checkpoint's held-out perplexity
    side by side, on one-sequence rows."""
    from trinity_dpo.config.loader import config_for_eval
    from trinity_dpo.run.evaluate import evaluate_checkpoint

    path = sft_config(main={"trainer": {"total_steps": 2, "save_interval": 2}})
    run_dir = train.run(load_config(path))
    text = evaluate_checkpoint(config_for_eval(str(path), None, None, []), str(run_dir / "global_step_2"), 1)
    assert "held-out evaluation (12 rows)" in text and "perplexity" in text and "base     model" in text
    assert "model:  " in text


def test_an_answer_whose_first_token_merges_with_the_header_is_trained_whole(space_dir):
    """The template's header ends 'assistant:' and the answer ' sure thing' tokenizes with its leading space as one
    token ' sure'; the header alone ends in its own tokens. The trained tokens start where the two tokenizations
    part (TRL's common prefix): ' sure' is trained (it was left out, as if it were the header's)."""
    from trinity_dpo.data.sft import tokenize_dialogues

    tok = AutoTokenizer.from_pretrained(space_dir)
    fmt = FormatConfig(prompt_type="messages", messages_key="messages")
    dialogue = to_dialogue({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "sure thing"}]}, 1, fmt)
    (example, _), = tokenize_dialogues([dialogue], tok, fmt, None, None)
    trained = tok.decode([i for i, m in zip(example.response_ids, example.response_mask) if m])
    assert trained.startswith(" sure thing"), trained


def test_rows_the_template_refuses_or_that_open_with_the_answer_are_bad_rows(tmp_path, qwen_dir, caplog):
    """A template that raises for the row (Mistral's alternation check) and an SFT row whose only assistant message
    comes first: counted and skipped with their reason under on_bad_row: skip (they were a traceback and a
    misleading template error), the run's one line under error."""
    from trinity_dpo.data.pairs import Limits
    from trinity_dpo.data.prepare import Recipe, load_table

    plain, tok = AutoTokenizer.from_pretrained(qwen_dir), AutoTokenizer.from_pretrained(qwen_dir)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [("sft", [good, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                          {"role": "assistant", "content": "c"}]}],
              FormatConfig(prompt_type="messages", messages_key="messages"),
              "row 2 skipped: the chat template refused it: Conversation roles must alternate user/assistant"),
             ("sft", [good, {"messages": [{"role": "assistant", "content": "I start"}]}],
              FormatConfig(prompt_type="messages", messages_key="messages"),
              "row 2 skipped: the assistant's message has no message before it to answer"),
             ("pairs", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"},
                        {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                         "chosen": "yes", "rejected": "no"}], FormatConfig(prompt_type="messages"),
              "row 2 skipped: the chat template refused it: Conversation roles must alternate user/assistant")]
    for n, (kind, rows, fmt, message) in enumerate(cases):
        path = tmp_path / f"rows{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        caplog.clear()
        recipe = Recipe(kind) if kind == "sft" else Recipe("pairs", limits=Limits())
        with caplog.at_level("WARNING"):
            table, _ = load_table(StorageConfig(path=str(path), format=fmt), "k", plain if n == 1 else tok, f"t{n}",
                                  recipe, tmp_path / "cache", 1)
        assert list(map(bool, table.kept)) == [True, False] and message in caplog.text
        with pytest.raises(DataError, match=f"rows{n}.jsonl: row 2: " + message.split("skipped: ")[1][:40]):
            load_table(StorageConfig(path=str(path), format=fmt, on_bad_row="error"), "k", plain if n == 1 else tok,
                       f"e{n}", recipe, tmp_path / "cache", 1)
