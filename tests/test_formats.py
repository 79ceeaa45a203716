"""Data formats: chats (data.messages_field, data.system_prompt), Parquet inputs, output.format: parquet.

Errors are one line naming `file:line` (`file row N` for Parquet), exit code 2, nothing queued; runs go
through `submit.py infer` on the embedded model, whose tokenizer has a chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.data import Example, load_examples
from llmbatch.gather import gather_run, merge_shards
from llmbatch.rundir import current_umask
from llmbatch.runners.generation import prompt_texts
from llmbatch.spec import DataSpec
from llmbatch.summary import summarize

from helpers import CHATS, examples_of, run_cli, run_folder, submit_cli, write_data, write_parquet
from test_data import bad_data
from test_infer import write_shard

# --- spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        ({"messages_field": "messages"}, "data: set only one of data.prompt_template, data.messages_field"),
        (
            {"prompt_template": None, "system_prompt": "Be brief."},
            "data: set one of data.prompt_field, data.prompt_template or data.messages_field",
        ),
        (
            {"system_prompt": "Be brief."},
            "data.system_prompt: a system message needs the chat template: set data.chat_template: true",
        ),
    ],
    ids=["two prompt keys", "none", "system prompt without a template"],
)
def test_one_way_to_the_prompt(tmp_path, good, capsys, data, message):
    good["data"] |= data
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_messages_need_jsonl_or_parquet(tmp_path, good, capsys):
    path = tmp_path / "in.csv"
    path.write_text("id,messages\n1,hi\n")
    good["data"] = {"path": str(path), "messages_field": "messages"}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "data.path: data.messages_field needs JSONL or Parquet" in err, err


def test_output_format_is_jsonl_or_parquet(tmp_path, good, capsys):
    good["output"]["format"] = "csv"
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "output.format: must be 'jsonl' or 'parquet', got 'csv'" in err, err


# --- malformed chats -----------------------------------------------------------------------------

BAD_CHATS = [
    ({"id": 2}, "no messages field 'messages' (data.messages_field)"),
    (
        {"id": 2, "messages": "hi"},
        "field 'messages' (data.messages_field) must be a non-empty list of {role, content} messages, got text",
    ),
    (
        {"id": 2, "messages": None},
        "field 'messages' (data.messages_field) must be a non-empty list of {role, content} messages, got null",
    ),
    (
        {"id": 2, "messages": []},
        "field 'messages' (data.messages_field) must be a non-empty list of {role, "
        "content} messages, got an empty list",
    ),
    ({"id": 2, "messages": ["hi"]}, "message 1 of 'messages' must be an object with a role and a content, got text"),
    (
        {"id": 2, "messages": [{"role": "user", "content": "a"}, {"content": "b"}]},
        "message 2 of 'messages': role must be one of system, user, assistant, got none",
    ),
    (
        {"id": 2, "messages": [{"role": "robot", "content": "b"}]},
        "message 1 of 'messages': role must be one of system, user, assistant, got 'robot'",
    ),
    ({"id": 2, "messages": [{"role": "user"}]}, "message 1 of 'messages': content must be text, got none"),
    (
        {"id": 2, "messages": [{"role": "user", "content": 7}]},
        "message 1 of 'messages': content must be text, got a value of type int",
    ),
    (
        {"id": 2, "messages": [{"role": "user", "content": ["a"]}]},
        "message 1 of 'messages': content must be text, got a list",
    ),
    (
        {"id": 2, "messages": [{"role": "user", "content": "a", "name": "x"}]},
        "message 1 of 'messages' has an unknown key 'name' (a message holds role and content)",
    ),
    (
        {"id": 2, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\ud800b"}]},
        "the content of message 2 of 'messages' holds a lone surrogate ('\\ud800'), half of a UTF-16 pair and no text",
    ),
]


@pytest.mark.parametrize("row,message", BAD_CHATS, ids=[m[:50] for _, m in BAD_CHATS])
def test_a_malformed_chat_names_its_line(tmp_path, good, capsys, row, message):
    rows = "\n".join(json.dumps(r) for r in ({"id": 1, "messages": CHATS[0]}, row))
    err = bad_data(tmp_path, good, capsys, "in.jsonl", rows + "\n", prompt_field=None, messages_field="messages")
    assert f"in.jsonl:2: {message}" in err


def test_a_malformed_chat_in_parquet_names_its_row(tmp_path, good, capsys):
    rows = [{"id": 1, "messages": CHATS[0]}, {"id": 2, "messages": [{"role": "robot", "content": "b"}]}]
    err = bad_data(
        tmp_path,
        good,
        capsys,
        "in.parquet",
        write_parquet(tmp_path / "p", rows).read_bytes(),
        prompt_field=None,
        messages_field="messages",
    )
    assert "in.parquet row 2: message 1 of 'messages': role must be one of system, user, assistant, got 'robot'" in err


# --- rendering -----------------------------------------------------------------------------------


def prompt_text(tokenizer, example: Example, data: DataSpec) -> str:
    [text] = prompt_texts(tokenizer, [example], data)
    return text


def test_system_prompt_opens_every_chat_without_one(tokenizer):
    plain = Example("a", "Is 7 even or odd?", None, 1)
    assert (
        prompt_text(tokenizer, plain, DataSpec(chat_template=True, system_prompt="Be brief."))
        == "System: Be brief.\nUser: Is 7 even or odd?\nAssistant:"
    )
    assert prompt_text(tokenizer, plain, DataSpec(prompt_field="q")) == plain.prompt
    chats = DataSpec(messages_field="m", system_prompt="Be brief.")
    assert (
        prompt_text(tokenizer, Example("b", None, None, 2, CHATS[0]), chats)
        == "System: Be brief.\nUser: Is 7 even or odd?\nAssistant:"
    )
    assert (
        prompt_text(tokenizer, Example("c", None, None, 3, CHATS[1]), chats)
        == "System: Answer in one word.\nUser: Is 12 even or odd?\nAssistant:"
    )  # its own system message wins
    multi_turn = prompt_text(tokenizer, Example("d", None, None, 4, CHATS[2]), DataSpec(messages_field="m"))
    assert multi_turn == f"User: Is 3 even or odd?\nAssistant: odd{tokenizer.eos_token}\nUser: And 4?\nAssistant:"


def test_the_context_check_reads_the_rendered_chat(tmp_path, good, capsys, model_dir):
    """A short chat that its system prompt makes too long is refused by the dry run, naming its line."""
    path = write_data(tmp_path / "chats.jsonl", [{"id": i, "messages": chat} for i, chat in enumerate(CHATS)])
    good["model"] = {"path": str(model_dir)}
    good["data"] = {"path": str(path), "messages_field": "messages", "system_prompt": "Be brief. " * 400}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "chats.jsonl:1: the prompt is " in err and "exceeds the model's context" in err, err
    good["data"]["system_prompt"] = "Be brief."
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0


# --- Parquet input -------------------------------------------------------------------------------

PARQUET_ERRORS = [
    (
        [{"id": 1, "question": "a"}, {"id": None, "question": "b"}],
        "in.parquet row 2: id field 'id' must be a string or an integer, got null",
    ),
    (
        [{"id": 1, "question": "a"}, {"id": 2, "question": None}],
        "in.parquet row 2: field 'question' (data.prompt_field) must be text or a number, got null",
    ),
    (
        [{"id": 1, "question": ["a"]}],
        "in.parquet row 1: field 'question' (data.prompt_field) must be text or a number, got a list",
    ),
    (
        [{"id": 1, "question": b"a"}],
        "in.parquet row 1: field 'question' (data.prompt_field) must be text or a number, got a value of type bytes",
    ),
    (
        [{"id": {"a": 1}, "question": "a"}],
        "in.parquet row 1: id field 'id' must be a string or an integer, got an object",
    ),
    (
        [{"id": 1.0, "question": "a"}, {"id": 2.5, "question": "b"}],  # a float column: pandas' ints with a gap
        "in.parquet row 1: id field 'id' must be a string or an integer, got a value of type float",
    ),
    (
        [{"id": 1, "question": "a"}, {"id": 2, "question": "b"}, {"id": 1, "question": "c"}],
        "in.parquet row 3: duplicate id '1' (first at row 1)",
    ),
    ([{"key": 1, "question": "a"}], "in.parquet row 1: no id field 'id' (set data.id_field)"),
    ([{"id": 1, "other": "a"}], "in.parquet row 1: no prompt field 'question' (data.prompt_field)"),
]


@pytest.mark.parametrize("rows,message", PARQUET_ERRORS, ids=[m.split(": ", 1)[1][:40] for _, m in PARQUET_ERRORS])
def test_parquet_errors_name_the_row(tmp_path, good, capsys, rows, message):
    err = bad_data(tmp_path, good, capsys, "in.parquet", write_parquet(tmp_path / "p", rows).read_bytes())
    assert message in err


def test_a_file_that_is_not_parquet_or_has_no_rows(tmp_path, good, capsys):
    err = bad_data(tmp_path, good, capsys, "in.parquet", '{"id": 1, "question": "a"}\n')
    assert "in.parquet: not a readable Parquet file (" in err
    empty = pa.Table.from_pylist([], schema=pa.schema([("id", pa.int64()), ("question", pa.string())]))
    pq.write_table(empty, tmp_path / "p")
    err = bad_data(tmp_path, good, capsys, "in.parquet", (tmp_path / "p").read_bytes())
    assert "in.parquet: the file has no records" in err


def test_parquet_is_read_in_batches_and_only_as_far_as_max_samples(tmp_path, monkeypatch):
    """Row groups of 1,000 rows; the last row is bad. max_samples stops before it, in the first batch."""
    monkeypatch.setattr("llmbatch.data.PARQUET_BATCH_ROWS", 500)
    rows = [{"id": i, "question": f"q{i}", "unused": "x" * 100} for i in range(5000)] + [{"id": None, "question": "q"}]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    batches = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def iter_batches(self, **kwargs):
        for batch in real_iter_batches(self, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    examples = load_examples(DataSpec(path=str(path), prompt_field="question", max_samples=10))
    assert [e.id for e in examples] == [str(i) for i in range(10)] and examples[3].line == 4
    assert len(batches) == 1 and batches[0].num_rows == 500 and batches[0].schema.names == ["id", "question"]
    with pytest.raises(Exception, match="big.parquet row 5001: id field 'id' must be a string or an integer"):
        load_examples(DataSpec(path=str(path), prompt_field="question"))
    assert max(b.num_rows for b in batches) == 500


# --- runs ----------------------------------------------------------------------------------------


def infer_results(tmp_path: Path, name: str, data: dict, output_format: str = "jsonl") -> list[dict]:
    spec = {
        "name": name,
        "data": data,
        "generation": {"max_new_tokens": 6},
        "output": {"root": str(tmp_path / "runs"), "format": output_format},
    }
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(json.dumps(spec))
    run = run_folder(submit_cli("infer", str(spec_path), "--executor", "local"))
    assert run.merged_results() == run.results_for(output_format)
    if output_format == "parquet":
        return pq.read_table(run.results_for("parquet")).to_pylist()
    return [json.loads(line) for line in run.results_file.read_text().splitlines()]


@pytest.mark.slow
def test_chats_run_like_the_same_prompts_rendered_by_hand(tmp_path, model_dir, tokenizer):
    """A chat run with a system prompt answers as a plain run of the text the template makes of it; the
    same plain data as Parquet, merged into results.parquet, gives the same records."""
    system = "Answer in one word."
    chats = write_data(tmp_path / "chats.jsonl", [{"id": f"c{i}", "messages": chat} for i, chat in enumerate(CHATS)])
    rendered = [
        {
            "id": f"c{i}",
            "text": tokenizer.apply_chat_template(
                chat if chat[0]["role"] == "system" else [{"role": "system", "content": system}, *chat],
                tokenize=False,
                add_generation_prompt=True,
            ),
        }
        for i, chat in enumerate(CHATS)
    ]
    as_chats = infer_results(
        tmp_path, "chats", {"path": str(chats), "messages_field": "messages", "system_prompt": system}
    )
    plain = {"prompt_field": "text"}
    as_text = infer_results(tmp_path, "text", {"path": str(write_data(tmp_path / "text.jsonl", rendered))} | plain)
    as_parquet = infer_results(
        tmp_path,
        "parquet",
        {"path": str(write_parquet(tmp_path / "text.parquet", rendered))} | plain,
        output_format="parquet",
    )

    assert [r["messages"] for r in as_chats] == CHATS  # as given: the system prompt is the spec's
    same = ("id", "output", "prompt_tokens", "output_tokens", "finish_reason")
    assert [{k: r[k] for k in same} for r in as_chats] == [{k: r[k] for k in same} for r in as_text]
    assert len({r["output"] for r in as_text}) > 1  # the prompts make a difference
    assert as_parquet == as_text


# --- output.format: parquet ----------------------------------------------------------------------


def test_parquet_results_hold_the_jsonl_records(make_run):
    run = make_run("infer", overrides=["data.max_samples=40", "output.format=parquet"])
    examples = examples_of(run)
    ids = [e.id for e in examples]
    write_shard(run, 0, 0, ids[1::2])
    write_shard(run, 0, 1, ids[0::2])
    assert gather_run(run) == 0 and not run.results_file.exists()
    parquet = run.results_for("parquet")
    assert oct(parquet.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert "results.parquet" in summarize(run)
    merge_shards(run, examples, "jsonl")
    assert pq.read_table(parquet).to_pylist() == [
        json.loads(line) for line in run.results_file.read_text().splitlines()
    ]


def test_parquet_results_appear_only_when_complete(make_run, monkeypatch):
    """A merge that dies while writing leaves no results.parquet (a complete-looking run) and no temp file."""
    run = make_run("infer", overrides=["data.max_samples=40", "output.format=parquet"])
    write_shard(run, 0, 0, [e.id for e in examples_of(run)])
    real_write_table = pq.write_table
    seen = []

    def write_then_die(table, where, **kwargs):
        real_write_table(table.slice(0, 5), where, **kwargs)  # bytes on disk, then the process dies
        seen.append(run.results_for("parquet").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gather_run(run)
    assert seen == [False] and run.merged_results() is None
    assert not [p for p in os.listdir(run.path) if p.startswith(".results")]
    monkeypatch.setattr(pq, "write_table", real_write_table)
    assert gather_run(run) == 0 and pq.read_table(run.results_for("parquet")).num_rows == 40
