"""`trinity chat`, driven as a person would: through a pseudo-terminal."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from trinity_dpo import cli
from trinity_dpo.run import chat

PROMPT = "you> "


def _read_until(fd: int, marker: str, timeout: float = 180.0) -> str:
    buffer, end = b"", time.monotonic() + timeout
    while marker.encode() not in buffer:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} in: {buffer.decode(errors='replace')[-500:]}")
        buffer += os.read(fd, 4096)
    return buffer.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_a_scripted_conversation_in_a_terminal_equals_generate(llama_dir):
    """Two turns, a /system message that starts a new conversation, a /reset, then /exit: each printed reply
    equals `generate` on the same history (greedy), so the history is kept and rendered as the template says."""
    master, slave = pty_pair()
    proc = subprocess.Popen([sys.executable, "-m", "trinity_dpo.cli", "chat", "--model", str(llama_dir),
                             "--max-new-tokens", "12", "--device", "cpu"],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
    os.close(slave)
    try:
        assert "/reset" in _read_until(master, PROMPT)
        replies = []
        for line in ("hello there", "what about pizza?", "/system be brief", "hi", "/reset", "hi"):
            os.write(master, (line + "\n").encode())
            out = _read_until(master, PROMPT)
            found = re.search(r"model> (.*)\nyou> $", out, re.S)
            # as `answer_text` ends a reply: a character cut off at max_new_tokens is dropped
            replies.append(found.group(1).rstrip("\n").rstrip("\ufffd").strip() if found else None)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    model, tokenizer, device = chat.load(str(llama_dir), "cpu")
    sampling = chat.Sampling(max_new_tokens=12)

    def expected(system, turns):
        return chat.reply(model, tokenizer, device, chat.Conversation(system, turns), sampling)

    first = expected(None, [{"role": "user", "content": "hello there"}])
    second = expected(None, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                             {"role": "user", "content": "what about pizza?"}])
    brief = expected("be brief", [{"role": "user", "content": "hi"}])
    assert replies == [first, second, None, brief, None, brief]  # /reset keeps the system message
    assert first  # a non-empty reply: the comparison means something


def pty_pair() -> tuple[int, int]:
    import pty

    return pty.openpty()


@pytest.mark.parametrize("case", ["not a model", "adapter without its base", "no chat template", "empty run",
                                  "reward model", "reward model export", "no cuda", "top-p when greedy",
                                  "nan temperature", "huge seed"])
def test_bad_models_are_one_line_errors(case, qwen_dir, tmp_path, capsys, monkeypatch):
    """Each a one-line error, exit 2. A reward model (a score head, no LM head) loaded as a causal LM got a freshly
    random head: chat talked nonsense and export wrote it."""
    command = "chat"
    if case.startswith("reward model"):
        folder = tmp_path / "rm"
        shutil.copytree(qwen_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForSequenceClassification"]}))
        args, message = ["--model", str(folder)], f"{folder} is a reward model (a score head, no LM head); trinity "
        if case == "reward model export":
            command, args = "export", args + ["--gguf", str(tmp_path / "rm.gguf")]
        message += f"{command} needs a causal language model"
    elif case == "top-p when greedy":
        args, message = ["--model", str(qwen_dir), "--top-p", "0.9"], ("--top-p samples, and --temperature 0 answers "
                                                                       "greedily; give a --temperature above 0")
    elif case in ("nan temperature", "huge seed"):
        args = ["--model", str(qwen_dir), *(["--temperature", "nan"] if case == "nan temperature" else
                                           ["--temperature", "1", "--seed", str(2 ** 70)])]
        message = "--temperature a finite number at least 0, --top-p in (0, 1] and --seed in [0, 2^63)"
    elif case == "no cuda":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        args, message = ["--model", str(qwen_dir), "--device", "cuda"], "--device cuda: no CUDA device here"
    elif case == "not a model":
        (tmp_path / "notes.txt").write_text("hi")
        args, message = ["--model", str(tmp_path)], "has no config.json (not a model folder)"
    elif case == "adapter without its base":
        (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
        args, message = ["--model", str(tmp_path)], "a LoRA adapter whose base model '/nowhere/base' is not a local"
    elif case == "no chat template":
        folder = tmp_path / "plain"
        shutil.copytree(qwen_dir, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        for extra in ("chat_template.jinja", "chat_template.json"):
            (folder / extra).unlink(missing_ok=True)
        args, message = ["--model", str(folder)], "has no chat template"
    else:
        (tmp_path / "run").mkdir()
        args, message = ["--run", str(tmp_path / "run")], "has no checkpoint with model weights"
    assert cli.main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_a_lora_run_is_merged_in_memory(make_config, llama_dir):
    """`--run` of a LoRA run takes its newest checkpoint, an adapter folder: merged into its base in memory, it
    answers as the checkpoint's merged/ model does."""
    from trinity_dpo.config.loader import load_config
    from trinity_dpo.run import train

    run_dir = train.run(load_config(make_config(
        main={"name": "lora", "model": {"lora": {"rank": 4}}, "trainer": {"total_steps": 1, "eval_samples": 0}},
        model=llama_dir)))
    newest = chat.checkpoint_of(str(run_dir))
    assert newest.endswith("global_step_1") and (run_dir / "global_step_1" / "merged" / "config.json").is_file()
    turns = [{"role": "user", "content": "what do you think about pizza?"}]
    answers = []
    for folder in (newest, str(run_dir / "global_step_1" / "merged")):
        model, tokenizer, device = chat.load(folder, "cpu")
        answers.append(chat.reply(model, tokenizer, device, chat.Conversation(None, turns), chat.Sampling(10)))
    assert answers[0] == answers[1] and answers[0]


def test_ctrl_c_stops_a_reply_then_leaves_at_the_prompt(monkeypatch):
    """Ctrl-C during a reply stops it (the turn is dropped, the prompt comes back); at the prompt it leaves as /exit
    does: no traceback, the command's exit 0."""
    import io

    calls = []

    def reply(model, tokenizer, device, conversation, sampling, stream=None):
        calls.append([t["content"] for t in conversation.turns])
        if len(calls) == 1:
            raise KeyboardInterrupt
        return "fine"

    lines = iter(["first\n", "second\n"])

    def read():
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(chat, "reply", reply)
    out = io.StringIO()
    chat.session(None, None, "cpu", chat.Sampling(), read=read, out=out)
    assert calls == [["first"], ["second"]]  # the stopped turn is not in the history
    assert "model> \n(reply stopped)\nyou> " in out.getvalue() and out.getvalue().endswith("you> \n")
