"""Reading rows in every layout and prompt_type, and every bad-row rule with its row number."""
from __future__ import annotations

import json

import pytest

from trinity_dpo.config.schema import FormatConfig, StorageConfig
from trinity_dpo.data.conversations import load_conversations, read_rows, to_conversation
from trinity_dpo.errors import ConfigError, DataError
from trinity_dpo.config.loader import load_config

from conftest import SHARED_DATA

ROWS = [{"prompt": "hi?", "chosen": "hey!", "rejected": "Greetings."},
        {"prompt": "sup?", "chosen": "chilling", "rejected": "I am an AI."}]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_file_types(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(str(path)) == ROWS


def test_dataset_folder_with_card(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data.json\n---\n# card\n")
    (folder / "data.json").write_text(json.dumps(ROWS))
    assert read_rows(str(folder)) == ROWS


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared Human-Like data not present")
def test_real_human_like_folder():
    convs, report = load_conversations(StorageConfig(path=str(SHARED_DATA)))
    assert report.read == 1528 and len(convs) == 1528 - sum(report.dropped.values())
    assert convs[0].prompt == [{"role": "user", "content": "Oh, I just saw the best meme - have you seen it?"}]
    assert convs[0].chosen[0]["role"] == "assistant"


def test_unsupported_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        read_rows(str(tmp_path / "rows.csv"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"prompt\": ")
    with pytest.raises(DataError, match="bad.json: line 1: malformed JSON"):
        read_rows(str(bad))
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="bad.jsonl: line 2: malformed JSON"):
        read_rows(str(lines))
    lines.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="bad.jsonl: line 2: bytes that are not UTF-8"):
        read_rows(str(lines))
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(DataError, match="row 1: expected an object with keys, got int"):
        read_rows(str(listing))
    parquet = tmp_path / "bad.parquet"
    parquet.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read data"):
        read_rows(str(parquet))


def test_plaintext_with_system_prompts():
    fmt = FormatConfig(system_prompt="Be casual.")
    conv = to_conversation(ROWS[0], 1, fmt)
    assert conv.prompt == [{"role": "system", "content": "Be casual."}, {"role": "user", "content": "hi?"}]
    assert conv.chosen == [{"role": "assistant", "content": "hey!"}]
    row = {**ROWS[0], "sys": "Per row."}
    assert to_conversation(row, 1, FormatConfig(system_prompt_key="sys")).prompt[0]["content"] == "Per row."


def test_messages_prompt_type():
    fmt = FormatConfig(prompt_type="messages")
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for chosen in ({"role": "assistant", "content": "a"}, [{"role": "assistant", "content": "a"}], "a"):
        conv = to_conversation({"prompt": prompt, "chosen": chosen, "rejected": "b"}, 1, fmt)
        assert conv.prompt == prompt and conv.chosen == [{"role": "assistant", "content": "a"}]
        assert conv.rejected == [{"role": "assistant", "content": "b"}]
    conv = to_conversation({"msgs": prompt, "chosen": "a", "rejected": "b"}, 1, FormatConfig(
        prompt_type="messages", messages_key="msgs"))
    assert conv.prompt == prompt


def test_chatpair_prompt_is_longest_common_prefix():
    u1, a1, u2 = ({"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "q2"})
    row = {"chosen": [u1, a1, u2, {"role": "assistant", "content": "good"}],
           "rejected": [u1, a1, u2, {"role": "assistant", "content": "bad"}]}
    conv = to_conversation(row, 1, FormatConfig(prompt_type="chatpair"))
    assert conv.prompt == [u1, a1, u2]
    assert conv.chosen == [{"role": "assistant", "content": "good"}]
    assert conv.rejected == [{"role": "assistant", "content": "bad"}]


BAD = [
    ({"chosen": "a", "rejected": "b"}, "missing key 'prompt'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' is null"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be text, got int"),
    ({"prompt": "q", "chosen": 7, "rejected": "b"}, "'chosen' must be a non-empty list of chat messages, got int"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' has an empty response"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_rows_skipped_and_counted_or_errors(tmp_path, row, message, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], row, ROWS[1]]))
    convs, report = load_conversations(StorageConfig(path=str(path)))
    assert [c.row for c in convs] == [1, 3]
    assert sum(report.dropped.values()) == 1
    assert f"row 2 skipped: {message}" in caplog.text
    with pytest.raises(DataError) as err:
        load_conversations(StorageConfig(path=str(path), on_bad_row="error"))
    assert str(err.value).startswith(f"{path}: row 2: {message}")


def test_chatpair_errors():
    fmt = FormatConfig(prompt_type="chatpair")
    u = {"role": "user", "content": "q"}
    with pytest.raises(Exception, match="share no first message"):
        to_conversation({"chosen": [u], "rejected": [{"role": "user", "content": "other"}]}, 1, fmt)
    with pytest.raises(Exception, match="must start with an assistant message"):
        to_conversation({"chosen": [u, {"role": "user", "content": "x"}],
                         "rejected": [u, {"role": "assistant", "content": "y"}]}, 1, fmt)
    with pytest.raises(Exception, match="each message needs a text 'content' \(or tool calls\)"):
        to_conversation({"chosen": [u, {"role": "assistant"}], "rejected": [u]}, 1, fmt)


# ----------------------------------------------------------------------------- the shapes of public preference sets


def test_implicit_prompt_texts_share_their_longest_common_prefix():
    """TRL's standard implicit-prompt rows: chosen = "The sky is blue.", rejected = "The sky is green."; the common
    prefix is "The sky is " and its trailing space goes to the responses (TRL's extract_prompt): prompt "The sky
    is", chosen " blue.", rejected " green.". Texts stay raw: no chat template."""
    conv = to_conversation({"chosen": "The sky is blue.", "rejected": "The sky is green."}, 1,
                           FormatConfig(prompt_type="chatpair"))
    assert (conv.prompt, conv.chosen, conv.rejected) == ("The sky is", " blue.", " green.")
    assert conv.is_text
    from trl.data_utils import extract_prompt

    assert extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == {
        "prompt": conv.prompt, "chosen": conv.chosen, "rejected": conv.rejected}
    with pytest.raises(Exception, match="'chosen' has an empty response"):
        to_conversation({"chosen": "abc", "rejected": "abcd"}, 1, FormatConfig(prompt_type="chatpair"))
    with pytest.raises(Exception, match="share no common beginning"):
        to_conversation({"chosen": "abc", "rejected": "xyz"}, 1, FormatConfig(prompt_type="chatpair"))
    with pytest.raises(DataError, match="need chat messages; these rows are plain texts"):
        to_conversation({"chosen": "ab", "rejected": "ac"}, 1, FormatConfig(prompt_type="chatpair", system_prompt="s"))


def test_anthropic_hh_texts_become_conversations():
    """HH rows: the shared turns up to the last Human turn are the prompt; the differing last Assistant turns are
    the responses."""
    chosen = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant: why did the cat sit?"
    rejected = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant: no."
    conv = to_conversation({"chosen": chosen, "rejected": rejected}, 1, FormatConfig(prompt_type="chatpair"))
    assert conv.prompt == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                           {"role": "user", "content": "tell me a joke"}]
    assert conv.chosen == [{"role": "assistant", "content": "why did the cat sit?"}]
    assert conv.rejected == [{"role": "assistant", "content": "no."}]
    with pytest.raises(Exception, match="'rejected' has an empty response"):
        to_conversation({"chosen": chosen, "rejected": rejected.replace(" no.", "")}, 1,
                        FormatConfig(prompt_type="chatpair"))


def test_openai_preference_jsonl_with_dotted_keys(tmp_path):
    """OpenAI's preference fine-tuning rows: input.messages (system and several turns), preferred_output and
    non_preferred_output as one-message lists."""
    row = {"input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}],
                     "tools": [], "parallel_tool_calls": True},
           "preferred_output": [{"role": "assistant", "content": "4"}],
           "non_preferred_output": [{"role": "assistant", "content": "Let me think about it at length."}]}
    path = tmp_path / "openai.jsonl"
    path.write_text(json.dumps(row) + "\n")
    fmt = FormatConfig(prompt_type="messages", prompt_key="input.messages", chosen_key="preferred_output",
                       rejected_key="non_preferred_output")
    [conv], _ = load_conversations(StorageConfig(path=str(path), format=fmt))
    assert conv.prompt == row["input"]["messages"] and conv.chosen == row["preferred_output"]
    assert conv.rejected == row["non_preferred_output"]
    # A column whose name has a dot is read as it is.
    flat = {"input.messages": row["input"]["messages"], "preferred_output": "4", "non_preferred_output": "5"}
    assert to_conversation(flat, 1, fmt).prompt == row["input"]["messages"]


def test_compressed_files_and_folders(tmp_path):
    import gzip

    (tmp_path / "rows.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert read_rows(str(tmp_path / "rows.json.gz")) == ROWS
    assert read_rows(str(tmp_path / "rows.jsonl.gz")) == ROWS
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl.gz").write_bytes((tmp_path / "rows.jsonl.gz").read_bytes())
    assert read_rows(str(folder)) == ROWS
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot read"):
        read_rows(str(tmp_path / "bad.jsonl.gz"))


def test_empty_system_value_means_no_system_message():
    fmt = FormatConfig(system_prompt_key="system")
    for empty in ("", "  ", None):
        conv = to_conversation({**ROWS[0], "system": empty}, 1, fmt)
        assert conv.prompt == [{"role": "user", "content": "hi?"}]
    assert to_conversation(ROWS[0], 1, FormatConfig(system_prompt="")).prompt == [{"role": "user", "content": "hi?"}]


def test_shape_mismatches_name_the_prompt_type_to_use():
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="'prompt' holds chat messages, not text: set format.prompt_type: messages"):
        to_conversation({"prompt": msgs, "chosen": "a", "rejected": "b"}, 1, FormatConfig())
    with pytest.raises(Exception, match="'prompt' is text, not a list of chat messages: set format.prompt_type: "
                                        "plaintext"):
        to_conversation({"prompt": "hi", "chosen": "a", "rejected": "b"}, 1, FormatConfig(prompt_type="messages"))
    with pytest.raises(Exception, match="hold the prompt inside them: set format.prompt_type: chatpair"):
        to_conversation({"chosen": "a", "rejected": "b"}, 1, FormatConfig())


def _card(folder, configs: dict[str, dict[str, str]]) -> None:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, file in splits.items():
            lines += [f"  - split: {split}", f"    path: {file}"]
            (folder / file).write_text(json.dumps(ROWS))
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_folder_errors_list_configs_and_splits(tmp_path):
    folder = tmp_path / "multi"
    folder.mkdir()
    _card(folder, {"alpha": {"train": "a.json"}, "beta": {"train": "b.json", "test": "bt.json"}})
    with pytest.raises(DataError, match=r"experience_buffer.subset_name is needed: .* has several configs \(alpha, "
                                        r"beta\); name one"):
        read_rows(str(folder))
    assert read_rows(str(folder), "test", "beta") == ROWS
    with pytest.raises(DataError, match=r"eval_buffer.split: the dataset folder .* has no split 'test' \(it has: "
                                        r"train\)"):
        read_rows(str(folder), "test", "alpha", key="buffer.trainer_input.eval_buffer")
    with pytest.raises(DataError, match=r"subset_name: 'gamma' is not a config of .* \(it has: alpha, beta\)"):
        read_rows(str(folder), "train", "gamma")


def test_rows_are_read_a_chunk_at_a_time_with_file_row_numbers(tmp_path):
    """A JSON lines file is read in chunks (never whole); blank lines are skipped, and a bad line deep in the file
    is named by its line in the file and a non-object by its row, as when the file was read whole."""
    from trinity_dpo.sources.files import iter_rows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" + ("\n" if i == 2 else "") for i in range(5)))
    assert [[r["i"] for r in chunk] for chunk in iter_rows(str(path), chunk_rows=2)] == [[0, 1], [2, 3], [4]]
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)) + "\n[1]\n")
    with pytest.raises(DataError, match=r"rows.jsonl: row 6: expected an object with keys, got list"):
        list(iter_rows(str(path), chunk_rows=2))
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)) + "{oops\n")
    chunks = iter_rows(str(path), chunk_rows=2)
    assert [r["i"] for r in next(chunks)] == [0, 1]  # rows before the bad line come while it is still unread
    with pytest.raises(DataError, match=r"rows.jsonl: line 6: malformed JSON"):
        list(chunks)


def test_line_blocks_number_rows_as_one_reading_does(tmp_path):
    """The reading process only splits a JSON lines file into blocks of lines; a tokenizing worker parses them. A
    block's first row number is counted from the lines alone, so a blank line and one of Unicode whitespace only
    (no-break space, U+2028: no row when parsed) must count as no row there too, or every later row is misnamed."""
    from trinity_dpo.sources.files import LineBlock, iter_blocks

    lines = []
    for i in range(7):
        lines += [json.dumps({"i": i})] + {1: [""], 2: ["\u00a0 "], 4: ["\u2028"]}.get(i, [])
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines + ["[1]"]) + "\n", encoding="utf-8")
    blocks = list(iter_blocks(str(path), chunk_rows=2))
    assert all(isinstance(b, LineBlock) for b in blocks)
    assert [(b.first_line, b.first_row, b.n_rows) for b in blocks] == [(1, 1, 2), (3, 3, 2), (7, 5, 2), (10, 7, 2)]
    assert [r["i"] for b in blocks[:3] for r in b.rows()] == list(range(6))
    with pytest.raises(DataError, match=r"rows.jsonl: row 8: expected an object with keys, got list"):
        blocks[3].rows()


def test_a_single_file_has_no_splits_or_configs(tmp_path):
    """A split or config given for a single file was ignored (the whole file read): refused in one line; the two
    buffers' default splits pass."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    assert len(read_rows(str(path), "test")) == 1
    with pytest.raises(DataError, match=r"experience_buffer.split: .*pairs.jsonl is a single file, which has no "
                                        r"splits \('validation' given\); remove it"):
        read_rows(str(path), "validation")
    with pytest.raises(DataError, match=r"experience_buffer.subset_name: .*pairs.jsonl is a single file, which has no "
                                        r"configs \('alpha' given\)"):
        read_rows(str(path), "train", "alpha")


def test_a_tokenizer_with_nothing_to_pad_with_is_one_line(make_config, monkeypatch):
    """No pad, eos, unk or bos token: one line naming the fix (a None pad id failed deep in batching)."""
    from transformers import AutoTokenizer

    from trinity_dpo.engine.modeling import load_tokenizer

    real = AutoTokenizer.from_pretrained

    def bare(*args, **kwargs):
        tok = real(*args, **kwargs)
        for name in ("pad_token", "eos_token", "unk_token", "bos_token"):
            setattr(tok, name, None)
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", bare)
    with pytest.raises(ConfigError, match="has no pad, eos, unk or bos token to pad with; add a pad_token"):
        load_tokenizer(load_config(make_config()))


def test_a_folder_whose_files_datasets_would_leave_out_is_refused(tmp_path):
    """Without a card's `configs`, datasets splits a folder by file names, one format per split: a .jsonl beside a
    .parquet, or a file whose name says no split, was read by no split and its rows left out silently. Refused,
    naming them; a card's own `configs` are kept as the user's choice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path, n):
        path.write_text("".join(json.dumps({**ROWS[0], "i": i}) + "\n" for i in range(n)))

    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder / "train.jsonl", 5)
    pq.write_table(pa.Table.from_pylist([{**ROWS[0], "i": 9}]), folder / "train.parquet")
    with pytest.raises(DataError, match=r"the dataset folder .*mixed would be read without train.jsonl \(datasets' "
                                        "file-name rules give them no split\\); name the files of each split"):
        read_rows(str(folder))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: train.parquet\n---\n")
    assert len(read_rows(str(folder))) == 1
