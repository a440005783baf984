"""The tokenized-data cache (data/prepare.py, data/token_cache.py, data/examples.py): the cached path gives exactly
the examples of the direct path for every data shape, a table is built once and reused, and a damaged, stale or
half-built table is never used."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from trinity_dpo.config.schema import FormatConfig, StorageConfig
from trinity_dpo.data import prepare, token_cache
from trinity_dpo.data.conversations import DataReport, load_conversations
from trinity_dpo.data.examples import Examples
from trinity_dpo.data.pairs import Limits, build_pairs
from trinity_dpo.data.sft import build_examples, load_dialogues
from trinity_dpo.errors import DataError

from conftest import REPO

SYSTEM = {"role": "system", "content": "Be brief."}


def _rows(shape: str) -> tuple[list[dict], FormatConfig, str]:
    """Rows of one public data shape, with a few bad rows among them, its format settings and its kind."""
    def say(i):
        return f"Tell me about the number {i} and why it matters" + " please" * (i % 5)

    if shape == "plaintext":
        rows = [{"prompt": say(i), "chosen": f"It is {i}! Great.", "rejected": f"{i}."} for i in range(30)]
        rows[4]["chosen"] = None
        rows[9]["rejected"] = rows[9]["chosen"]
        return rows, FormatConfig(prompt_type="plaintext", system_prompt="Be kind."), "pairs"
    if shape == "messages":
        rows = [{"prompt": [SYSTEM, {"role": "user", "content": say(i)}],
                 "chosen": [{"role": "assistant", "content": f"Sure: {i}!"}], "rejected": f"no {i}"} for i in range(30)]
        rows[7]["prompt"] = "plain text"
        return rows, FormatConfig(prompt_type="messages"), "pairs"
    if shape == "chatpair":
        rows = [{"chosen": [{"role": "user", "content": say(i)}, {"role": "assistant", "content": f"Yes {i}"}],
                 "rejected": [{"role": "user", "content": say(i)}, {"role": "assistant", "content": f"No {i}"}]}
                for i in range(30)]
        return rows, FormatConfig(prompt_type="chatpair"), "pairs"
    if shape == "hh":
        rows = [{"chosen": f"\n\nHuman: {say(i)}\n\nAssistant: Happy to help, {i}.",
                 "rejected": f"\n\nHuman: {say(i)}\n\nAssistant: Go away {i}."} for i in range(30)]
        return rows, FormatConfig(prompt_type="chatpair"), "pairs"
    if shape == "texts":
        rows = [{"chosen": f"{say(i)} yes indeed", "rejected": f"{say(i)} not at all"} for i in range(30)]
        return rows, FormatConfig(prompt_type="chatpair"), "pairs"
    if shape == "openai":
        rows = [{"input": {"messages": [{"role": "user", "content": say(i)}]},
                 "preferred_output": [{"role": "assistant", "content": f"Good {i}"}],
                 "non_preferred_output": [{"role": "assistant", "content": f"Bad {i}"}]} for i in range(30)]
        return rows, FormatConfig(prompt_type="messages", prompt_key="input.messages", chosen_key="preferred_output",
                                  rejected_key="non_preferred_output"), "pairs"
    if shape == "sft_messages":
        rows = [{"message": [SYSTEM, {"role": "user", "content": say(i)}, {"role": "assistant", "content": f"A {i}"},
                             {"role": "user", "content": "more"}, {"role": "assistant", "content": f"B {i}" * 3}]}
                for i in range(30)]
        rows[3]["message"] = rows[3]["message"][:2]  # no assistant message: counted and skipped
        return rows, FormatConfig(prompt_type="messages", enable_concatenated_multi_turn=True), "sft"
    rows = [{"prompt": say(i), "response": f"Answer {i} " * (1 + i % 7)} for i in range(30)]  # sft_plaintext
    return rows, FormatConfig(prompt_type="plaintext"), "sft"


SHAPES = ["plaintext", "messages", "chatpair", "hh", "texts", "openai", "sft_messages", "sft_plaintext"]


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(kind: str) -> prepare.Recipe:
    # Short limits, so that truncation and its counts are part of what is compared.
    if kind == "pairs":
        return prepare.Recipe("pairs", limits=Limits(max_prompt=24, max_response=6, count_prompt=20))
    return prepare.Recipe("sft", max_len=40, truncation="left")


def _direct(storage: StorageConfig, tokenizer, recipe: prepare.Recipe):
    """Today's path: every row read and converted, then tokenized in one process."""
    if recipe.kind == "pairs":
        convs, report = load_conversations(storage)
        return build_pairs(convs, tokenizer, recipe.limits, report), report
    dialogues, report = load_dialogues(storage, "x")
    return build_examples(dialogues, tokenizer, storage.format, recipe.max_len, recipe.truncation, report), report


def _cached(storage, tokenizer, folder, recipe, tmp_path, workers=1):
    table, report = prepare.load_table(storage, "x", tokenizer, str(folder), recipe, tmp_path / "cache", workers)
    entries = np.flatnonzero(np.asarray(table.kept))
    for k, n in zip(*np.unique(np.asarray(table.events), return_counts=True)):
        report.add_counts(table.meta["events"][k], int(n))
    return Examples(table, entries, recipe.kind), report, table


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_examples_equal_the_direct_path(shape, tmp_path, qwen_dir, monkeypatch):
    """Ids, masks, rows, order and every report count are those of tokenizing in one pass, for each data shape
    (with bad rows, truncation and, for pairs, trainer-file lengths that only count). Chunks are cut at 2 kB of
    source text, so the rows go through several chunks and both worker processes."""
    from trinity_dpo.sources import files

    monkeypatch.setattr(files, "CHUNK_BYTES", 2000)
    rows, fmt, kind = _rows(shape)
    storage = StorageConfig(path=str(_write(tmp_path, rows)), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    expected, want = _direct(storage, tok, _recipe(kind))
    examples, got, _ = _cached(storage, tok, qwen_dir, _recipe(kind), tmp_path, workers=2)
    assert [vars(e) for e in examples] == [vars(e) for e in expected] and len(expected) > 20
    assert got.as_dict() == want.as_dict()
    assert examples.n_tokens.tolist() == [e.n_tokens for e in expected]
    chunks = list(files.iter_rows(storage.path, storage.split, storage.subset_name))
    assert len(chunks) > 1 and sum(map(len, chunks)) == len(rows)


def test_second_load_reuses_the_table_and_any_change_makes_a_new_one(tmp_path, qwen_dir, monkeypatch):
    rows, fmt, _ = _rows("plaintext")
    path = _write(tmp_path, rows)
    storage = StorageConfig(path=str(path), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    first = _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)[2]
    builds = []
    monkeypatch.setattr(prepare, "_build", lambda *a: builds.append(1) or pytest.fail("tokenized again"))
    assert _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)[2].folder == first.folder
    monkeypatch.undo()
    rows[5]["chosen"] += " (edited)"  # one edited row: a new key, so a new table
    _write(tmp_path, rows)
    edited = _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)[2]
    assert edited.folder != first.folder
    longer = prepare.Recipe("pairs", limits=Limits(max_prompt=25, max_response=6, count_prompt=20))
    assert _cached(storage, tok, qwen_dir, longer, tmp_path)[2].folder not in (first.folder, edited.folder)


def test_dataset_folders_under_a_cache_folder_are_told_apart(tmp_path, qwen_dir):
    """Two hub datasets live under ~/.cache/huggingface/hub; a folder's own `.cache` (a download tool's) is what is
    left out, not every file of a folder whose path has one: both sets hashed as empty and shared one table."""
    rows, fmt, _ = _rows("plaintext")
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    folders = []
    for name, edit in (("datasets--org--a", ""), ("datasets--org--b", " (b)")):
        folder = tmp_path / ".cache" / "hub" / name
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_text("".join(json.dumps({**r, "prompt": r["prompt"] + edit}) + "\n"
                                                    for r in rows))
        (folder / ".cache").mkdir()
        (folder / ".cache" / "train.jsonl.lock").write_text(name)  # a download tool's, not data
        assert token_cache.source_files(folder) == [folder / "train.jsonl"]
        folders.append(_cached(StorageConfig(path=str(folder), format=fmt), tok, qwen_dir, _recipe("pairs"),
                               tmp_path)[2].folder)
    assert folders[0] != folders[1]


def test_a_source_copied_with_its_old_modification_time_is_read_again(tmp_path, qwen_dir):
    """The digest of a source's bytes is kept under its size and times: an edit of the same size whose copy kept
    the old modification time (cp -p, rsync -t) is still seen (its change time and inode moved)."""
    rows, fmt, _ = _rows("plaintext")
    path = _write(tmp_path, rows)
    storage = StorageConfig(path=str(path), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    first = _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)[2]
    times = path.stat()
    rows[0]["chosen"], rows[0]["rejected"] = rows[0]["rejected"], rows[0]["chosen"]  # same bytes, other order
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert edited.stat().st_size == times.st_size
    os.replace(edited, path)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)[2].folder != first.folder


def test_builders_without_a_lock_keep_each_others_work(tmp_path):
    """Where the file system takes no locks, two processes may build one table at once: neither deletes the
    other's live temporary folder, and the one that finishes second keeps the first's published table."""
    final = tmp_path / "table"
    other = final.with_name(f".{final.name}.tmp{os.getppid()}")  # a live process's build (the test's parent)
    other.mkdir()
    dead = final.with_name(f".{final.name}.tmp999999999")
    dead.mkdir()
    writer = token_cache.Writer(final, 3)
    assert other.is_dir() and not dead.exists()
    writer.abort()


@pytest.mark.parametrize("damage", ["cut", "flip", "meta"])
def test_a_damaged_table_is_rebuilt_with_a_warning(tmp_path, qwen_dir, damage, caplog):
    rows, fmt, _ = _rows("plaintext")
    storage = StorageConfig(path=str(_write(tmp_path, rows)), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    good, _, table = _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)
    expected = [vars(e) for e in good]
    tokens = table.folder / "tokens.raw"
    if damage == "cut":
        tokens.write_bytes(tokens.read_bytes()[:-4])
    elif damage == "flip":
        data = bytearray(tokens.read_bytes())
        data[len(data) // 2] ^= 1
        tokens.write_bytes(bytes(data))
    else:
        (table.folder / "meta.json").write_text("{")
    again, _, _ = _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)
    assert [vars(e) for e in again] == expected
    assert "is damaged" in caplog.text and "tokenizing again" in caplog.text


def test_a_bad_row_with_on_bad_row_error_names_its_line_and_writes_nothing(tmp_path, qwen_dir):
    rows, fmt, _ = _rows("plaintext")
    storage = StorageConfig(path=str(_write(tmp_path, rows)), format=fmt, on_bad_row="error")
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    with pytest.raises(DataError, match=r"rows.jsonl: row 5: "):
        _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path, workers=2)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock") and p.name != "sources"]


BUILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from transformers import AutoTokenizer
from trinity_dpo.config.schema import FormatConfig, StorageConfig
from trinity_dpo.data import prepare, token_cache
from trinity_dpo.data.pairs import Limits
real = token_cache.Writer.add
def slow(self, chunk):
    real(self, chunk)
    print("chunk", flush=True)
    while not __import__("os").path.exists(sys.argv[4]):  # hold the build here until the test says go
        time.sleep(0.05)
token_cache.Writer.add = slow
import trinity_dpo.sources.files as files
files.CHUNK_ROWS = 5
tok = AutoTokenizer.from_pretrained(sys.argv[2])
storage = StorageConfig(path=sys.argv[1], format=FormatConfig(prompt_type="plaintext"))
table, _ = prepare.load_table(storage, "x", tok, sys.argv[2], prepare.Recipe("pairs", limits=Limits()),
                              __import__("pathlib").Path(sys.argv[3]), 1)
print("table", table.folder, flush=True)
"""


def _builder(path, model, cache, pause):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", BUILD, str(path), str(model), str(cache), str(pause)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # subprocesses
def test_a_build_killed_midway_leaves_nothing_a_later_run_uses(tmp_path, qwen_dir):
    """SIGKILL after some chunks are written: only a temporary folder is left, which the next build neither
    reads nor trips over; the next build's table equals an uninterrupted one."""
    rows, _, _ = _rows("plaintext")
    path = _write(tmp_path, rows)
    cache = tmp_path / "cache"
    killed = _builder(path, qwen_dir, cache, tmp_path / "never")
    assert killed.stdout.readline().strip() == "chunk"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == ["sources"]  # no table
    (tmp_path / "go").touch()
    done = _builder(path, qwen_dir, cache, tmp_path / "go")
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err[-2000:]
    folder = Path(out.split("table ")[1].strip())
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    storage = StorageConfig(path=str(path), format=FormatConfig(prompt_type="plaintext"))
    expected = build_pairs(load_conversations(storage)[0], tok, Limits(), DataReport("x"))
    table = token_cache.open_table(folder, verify=True)
    assert [vars(e) for e in Examples(table, np.flatnonzero(table.kept), "pairs")] == [vars(p) for p in expected]
    assert [p.name for p in cache.iterdir() if ".tmp" in p.name] == []  # the killed build's leftovers are gone


@pytest.mark.slow  # subprocesses
def test_two_processes_at_once_build_one_table(tmp_path, qwen_dir):
    """The second process waits on the first one's lock file and maps the table it built: one build."""
    rows, _, _ = _rows("plaintext")
    path = _write(tmp_path, rows)
    go = tmp_path / "go"
    first = _builder(path, qwen_dir, tmp_path / "cache", go)
    assert first.stdout.readline().strip() == "chunk"  # the first holds the lock, its build under way
    second = _builder(path, qwen_dir, tmp_path / "cache", go)
    while "waiting for it" not in second.stderr.readline():
        assert second.poll() is None, "the second process ended without waiting"
    go.touch()
    out2, _ = second.communicate(timeout=120)
    out1, _ = first.communicate(timeout=120)
    assert "chunk" not in out2.splitlines()  # it built nothing
    assert out1.split("table ")[1] == out2.split("table ")[1]


def test_parallel_and_single_process_builds_are_identical(tmp_path, qwen_dir):
    rows, fmt, _ = _rows("sft_messages")
    storage = StorageConfig(path=str(_write(tmp_path, rows * 3)), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    one = _cached(storage, tok, qwen_dir, _recipe("sft"), tmp_path / "one", workers=1)[2]
    two = _cached(storage, tok, qwen_dir, _recipe("sft"), tmp_path / "two", workers=2)[2]
    for name in token_cache.ARRAYS:
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.meta["events"] == two.meta["events"]


def test_a_source_is_hashed_once_per_version(tmp_path, qwen_dir, monkeypatch):
    """The source's digest is kept under its (path, size, mtime): a second load, by another process or run,
    does not read the whole file again; an edit (new size or mtime) hashes it anew."""
    rows, fmt, _ = _rows("plaintext")
    path = _write(tmp_path, rows)
    storage = StorageConfig(path=str(path), format=fmt)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    hashed, real = [], token_cache.file_digest
    monkeypatch.setattr(token_cache, "file_digest", lambda p: hashed.append(p) or real(p))
    _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)
    _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)
    assert len(hashed) == 1
    rows[0]["chosen"] += "!"
    _write(tmp_path, rows)
    _cached(storage, tok, qwen_dir, _recipe("pairs"), tmp_path)
    assert len(hashed) == 2


@pytest.mark.parametrize("special", [False, True])
def test_fast_encoding_gives_the_tokenizers_own_ids(qwen_dir, special):
    """`encode` (the Rust backend's `encode_batch_fast`, no offsets) gives `tokenizer(texts)["input_ids"]`:
    special tokens inside the text, an empty text, unicode; and a backend left with truncation on (a
    tokenizer.json may ship one) is reset by the wrapper first, as a plain call would be."""
    from trinity_dpo.data.encode import encode

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    texts = ["<|im_start|>user\nhi  there<|im_end|>\n", "", "naïve café — 東京 \n\n\nx", "a" * 700]
    assert tok.is_fast and encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    tok.backend_tokenizer.enable_truncation(3)
    assert encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    assert len(encode(tok, texts, special)[3]) > 3



def test_tokenizing_workers_take_signals_as_fresh_processes():
    """The pool forks after the run's stop handler is installed: a worker that kept it caught the SIGTERM the pool
    closes it with, and the close waited forever."""
    import signal

    from trinity_dpo.run.train import Stop

    stop = Stop()
    try:
        with prepare._pool(2) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        stop.restore()
