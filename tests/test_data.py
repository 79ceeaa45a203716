"""Data files (llmbatch.data): JSONL, CSV and Parquet inputs, chats (data.messages_field,
data.system_prompt), prompt templates, encodings and values, and streaming (data.max_inputs).

A bad file is one line naming `file:line` (`file row N` for Parquet), exit code 2, nothing queued.
How prompts are rendered and encoded: test_prompts.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch.cli import main
from llmbatch.data import load_inputs
from llmbatch.spec import DataSpec

from helpers import CHATS, run_cli, write_data, write_parquet, write_text


def bad_data(tmp_path, good, capsys, name: str, content: bytes | str, **data) -> str:
    """Write a data file, point the spec at it, and return the single error line of a dry run."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    good["data"] = {"path": str(path), "prompt_field": "question"} | data
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmbatch: error: "), err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    return err


# --- encodings -----------------------------------------------------------------------------------


def test_a_non_utf8_byte_names_the_line_and_the_offset(tmp_path, good, capsys):
    lines = b'{"id": 1, "question": "a"}\n{"id": 2, "question": "caf\xe9"}\n'
    offset = lines.index(b"\xe9")
    err = bad_data(tmp_path, good, capsys, "in.jsonl", lines)
    assert f"in.jsonl:2: not UTF-8 text: byte 0xe9 at byte offset {offset}" in err
    err = bad_data(tmp_path, good, capsys, "in.csv", b"id,question\n1,a\n2,\xff\n")
    assert "in.csv:3: not UTF-8 text: byte 0xff at byte offset 18" in err


def test_a_non_utf8_byte_or_a_control_character_in_the_spec_names_the_line(tmp_path, good, capsys):
    path = tmp_path / "spec.yaml"
    path.write_bytes(yaml.safe_dump(good).encode() + b"# caf\xe9\n")
    lines = path.read_bytes().count(b"\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"spec.yaml: line {lines}: not UTF-8 text: byte 0xe9" in err and err.count("\n") == 1
    path.write_text("name: x\ndata: \x07\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml: invalid YAML at line 2: " in err and err.count("\n") == 1


def test_a_csv_with_a_bom_keeps_its_first_column(tmp_path):
    (tmp_path / "in.csv").write_bytes("id,question\n1,a\n".encode("utf-8-sig"))
    (tmp_path / "in.jsonl").write_bytes('{"id": 1, "question": "a"}\n'.encode("utf-8-sig"))
    for name in ("in.csv", "in.jsonl"):
        [input] = load_inputs(DataSpec(path=str(tmp_path / name), prompt_field="question"))
        assert (input.id, input.prompt, input.line) == ("1", "a", 1 if name == "in.jsonl" else 2)


# --- CSV structure -------------------------------------------------------------------------------


def test_a_multi_line_csv_record_is_named_by_its_first_line(tmp_path, good, capsys):
    rows = 'id,question\n1,"two\nlines"\n\n2,"three\nmore\nlines"\n1,again\n'
    inputs = load_inputs(
        DataSpec(path=str(write_text(tmp_path / "ok.csv", rows.rsplit("1,again", 1)[0])), prompt_field="question")
    )
    assert [(e.id, e.line) for e in inputs] == [("1", 2), ("2", 5)]
    err = bad_data(tmp_path, good, capsys, "in.csv", rows)
    assert "in.csv:8: duplicate id '1' (first at line 2)" in err


def test_csv_errors_name_the_line(tmp_path, good, capsys):
    err = bad_data(tmp_path, good, capsys, "in.csv", f'id,question\n1,a\n2,"{("x" * (2 << 20) + chr(10)) * 5}"\n')
    assert "in.csv:3: a field runs past 8 MiB, the most a record may hold (a quote left open?)" in err
    err = bad_data(tmp_path, good, capsys, "in.csv", "id,question,id\n1,a,2\n")
    assert "in.csv:1: duplicate column name 'id'" in err
    err = bad_data(tmp_path, good, capsys, "in.csv", "id,question\n1,a\n2\n")
    assert "in.csv:3: wrong number of columns (1; the header has 2)" in err


def test_a_quote_left_open_names_the_line_where_it_opened(tmp_path, good, capsys):
    """Python's csv reader takes every line after an open quote into that field: rows would vanish."""
    rows = 'id,question\n1,a\n2,"b\n3,c\n4,d\n'
    err = bad_data(tmp_path, good, capsys, "in.csv", rows)
    assert "in.csv:3: a quoted field opened in this record runs to the end of the file (a quote left open?)" in err
    err = bad_data(tmp_path, good, capsys, "in.csv", 'id,question\n1,"a"\n2,"b')  # no newline at the end
    assert "in.csv:3: a quoted field opened in this record runs to the end of the file" in err
    ok = load_inputs(
        DataSpec(path=str(write_text(tmp_path / "ok.csv", 'id,question\n1,"a\nb"\n2,"c"')), prompt_field="question")
    )
    assert [(e.id, e.prompt) for e in ok] == [("1", "a\nb"), ("2", "c")]


def test_a_line_longer_than_a_record_may_be_is_refused_before_it_is_read(tmp_path, good, capsys):
    err = bad_data(
        tmp_path,
        good,
        capsys,
        "in.jsonl",
        '{"id": 1, "question": "a"}\n{"id": 2, "question": "' + "x" * (8 << 20) + '"}\n',
    )
    assert "in.jsonl:2: the line is longer than 8 MiB, the most a record may hold" in err


def test_a_prompt_larger_than_a_record_may_be_is_refused(tmp_path, good, capsys):
    row = json.dumps({"id": 1, "question": "x" * (5 << 20)})  # a line of 5 MiB, a prompt of 10 MiB
    err = bad_data(
        tmp_path, good, capsys, "in.jsonl", row + "\n", prompt_field=None, prompt_template="{question}{question}"
    )
    assert f"in.jsonl:1: the prompt is {10 << 20} bytes, more than the 8 MiB a record may hold" in err


# --- values --------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"id": None, "question": "a"}, "in.jsonl:2: id field 'id' must be a string or an integer, got null"),
    ({"id": [1], "question": "a"}, "in.jsonl:2: id field 'id' must be a string or an integer, got a list"),
    ({"id": {"a": 1}, "question": "a"}, "in.jsonl:2: id field 'id' must be a string or an integer, got an object"),
    ({"id": " ", "question": "a"}, "in.jsonl:2: id field 'id' is empty"),
    ({"id": "a\nb", "question": "a"}, "in.jsonl:2: id 'a\\nb' holds a control character or line break"),
    ({"id": "\x1b[31mred", "question": "a"}, "in.jsonl:2: id '\\x1b[31mred' holds a control character"),
    (
        {"id": "abc\u202edef", "question": "a"},
        "in.jsonl:2: id 'abc\\u202edef' holds an invisible format character (U+202E)",
    ),
    ({"id": "a\u2066b", "question": "a"}, "in.jsonl:2: id 'a\\u2066b' holds an invisible format character (U+2066)"),
    (
        {"id": 2, "question": None},
        "in.jsonl:2: field 'question' (data.prompt_field) must be text or a number, got null",
    ),
    ({"id": 2, "question": ["a"]}, "in.jsonl:2: field 'question' (data.prompt_field) must be text or a number"),
    (
        {"id": 2, "question": "a", "answer": None},
        "in.jsonl:2: field 'answer' (data.reference_field) must be text or a number, got null",
    ),
    # An id must be a string or an integer: a float or a boolean has no one text form to match results by.
    (
        '{"id": true, "question": "a"}',
        ("in.jsonl:2: id field 'id' must be a string or an integer, got a value of type bool"),
    ),
    (
        '{"id": NaN, "question": "a"}',
        ("in.jsonl:2: id field 'id' must be a string or an integer, got a value of type float"),
    ),
    ('{"id": Infinity, "question": "a"}', "in.jsonl:2: id field 'id' must be a string or an integer"),
    ('{"id": 2.5, "question": "a"}', "in.jsonl:2: id field 'id' must be a string or an integer"),
    # Half a UTF-16 pair: no tokenizer, log or shard can write it.
    ('{"id": "\\ud800", "question": "a"}', "in.jsonl:2: id field 'id' holds a lone surrogate ('\\ud800')"),
    (
        '{"id": 2, "question": "a\\udfff"}',
        (
            "in.jsonl:2: field 'question' (data.prompt_field) holds a lone "
            "surrogate ('\\udfff'), half of a UTF-16 pair and no text"
        ),
    ),
    (
        '{"id": 2, "question": "a", "answer": "\\ud83d"}',
        ("in.jsonl:2: field 'answer' (data.reference_field) holds a lone surrogate"),
    ),
]


@pytest.mark.parametrize("row,message", BAD_VALUES, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_VALUES])
def test_null_and_structured_values_are_errors_never_the_text_none(tmp_path, good, capsys, row, message):
    rows = "\n".join(
        r if isinstance(r, str) else json.dumps(r) for r in ({"id": 1, "question": "q", "answer": "a"}, row)
    )
    err = bad_data(tmp_path, good, capsys, "in.jsonl", rows + "\n", reference_field="answer")
    assert message in err


def test_an_empty_csv_id_is_an_error(tmp_path, good, capsys):
    err = bad_data(tmp_path, good, capsys, "in.csv", "id,question\n1,a\n,b\n")
    assert "in.csv:3: id field 'id' is empty" in err


# --- prompt templates ----------------------------------------------------------------------------

BAD_TEMPLATES = [
    ("{question!x}", "data.prompt_template: {question!x}: unknown conversion '!x' (use !r, !s or !a)"),
    ("{question:>>>}", "data.prompt_template: {question:>>>}: not a valid format spec"),
    ("{question:{width}}", "data.prompt_template: {question:{width}}: a format spec cannot hold fields"),
    ("{question.__class__}", "data.prompt_template: {question.__class__}: attribute access is not supported"),
    # A width is text every prompt holds: {q:999999999} took a dry run to 24 GB.
    (
        "{question:999999999}",
        (
            "data.prompt_template: {question:999999999}: widths and precisions may add up to at "
            "most 1000 characters in a template"
        ),
    ),
    ("{question:.2000}", "data.prompt_template: {question:.2000}: widths and precisions may add up to at most 1000"),
    ("{question:0>600}{question:600}", "data.prompt_template: {question:600}: widths and precisions may add up"),
    ("{question:" + "9" * 5000 + "}", "widths and precisions may add up to at most 1000 characters"),
    ("\ud800{question}", "data.prompt_template: holds a lone surrogate, half of a UTF-16 pair and no text"),
]


@pytest.mark.parametrize("template,message", BAD_TEMPLATES, ids=[t for t, _ in BAD_TEMPLATES])
def test_a_bad_template_is_a_spec_error(tmp_path, good, capsys, template, message):
    good["data"]["prompt_template"] = template
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_template_that_a_record_cannot_fill_names_the_line(tmp_path, good, capsys):
    rows = '{"id": 1, "n": 5, "c": ["x"]}\n{"id": 2, "n": "five", "c": ["x"]}\n'
    err = bad_data(tmp_path, good, capsys, "in.jsonl", rows, prompt_field=None, prompt_template="{n:03d} {c[0]}")
    assert (
        "in.jsonl:2: data.prompt_template cannot be filled from this record (ValueError: Unknown format code "
        "'d' for object of type 'str')"
    ) in err
    err = bad_data(
        tmp_path,
        good,
        capsys,
        "in.jsonl",
        rows.replace('["x"]}\n{', "[]}\n{"),
        prompt_field=None,
        prompt_template="{n:03d} {c[0]}",
    )
    assert "in.jsonl:1: data.prompt_template cannot be filled from this record (IndexError" in err
    err = bad_data(
        tmp_path, good, capsys, "in.jsonl", '{"id": 1, "n": null}\n', prompt_field=None, prompt_template="{n}"
    )
    assert "in.jsonl:1: field 'n' of data.prompt_template must be text or a number, got null" in err
    [input] = load_inputs(
        DataSpec(path=str(write_text(tmp_path / "ok.jsonl", rows.splitlines()[0])), prompt_template="{n:03d} {c[0]}")
    )
    assert input.prompt == "005 x"


@pytest.mark.parametrize(
    "row,message",
    [
        (
            '{"id": 1, "q": {"x": 1}, "c": [1]}',
            ("in.jsonl:1: field 'q' of data.prompt_template must be text or a number, got an object"),
        ),
        (
            '{"id": 1, "q": "a", "c": [[1]]}',
            ("in.jsonl:1: field 'c[0]' of data.prompt_template must be text or a number, got a list"),
        ),
        (
            '{"id": 1, "q": "a", "c": [null]}',
            ("in.jsonl:1: field 'c[0]' of data.prompt_template must be text or a number, got null"),
        ),
        ('{"id": 1, "q": "\\udc00", "c": [1]}', "in.jsonl:1: field 'q' of data.prompt_template holds a lone surrogate"),
    ],
)
def test_a_template_value_obeys_the_prompt_field_rule(tmp_path, good, capsys, row, message):
    """What reaches the prompt is text or a number, never a structure printed as its Python repr."""
    err = bad_data(tmp_path, good, capsys, "in.jsonl", row + "\n", prompt_field=None, prompt_template="{q} {c[0]}")
    assert message in err


def test_a_data_path_that_is_a_folder_or_a_fifo_is_one_line(tmp_path, good, capsys):
    import os

    (tmp_path / "dir.jsonl").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl")  # nobody writes it: opening it to read would block
    for name, message in (
        ("dir.jsonl", "is a folder, not a data file"),
        ("pipe.jsonl", "is not a regular file (a named pipe or a device?); data is read from a file"),
    ):
        good["data"]["path"] = str(tmp_path / name)
        code, err = run_cli(tmp_path, good, capsys=capsys)
        assert code == 2 and err == f"llmbatch: error: {tmp_path}/spec.yaml: data.path: {tmp_path / name} {message}\n"


# --- cost ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_max_samples_stops_reading_the_file(tmp_path, good, capsys, suffix):
    """A 50 MB file with a broken last line: with max_inputs=10, validation never gets that far."""
    path = tmp_path / f"big{suffix}"
    padding = "x" * 250  # short enough for any model's context: the embedded model may check prompt lengths
    if suffix == ".csv":
        rows = ["id,question"] + [f"{i},{padding}" for i in range(200_000)] + ["broken"]
    else:
        rows = [f'{{"id": {i}, "question": "{padding}"}}' for i in range(200_000)] + ["{broken"]
    path.write_text("\n".join(rows) + "\n")
    assert path.stat().st_size > 50_000_000
    good["data"] = {"path": str(path), "prompt_field": "question", "max_inputs": 10}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 0, err
    inputs = load_inputs(DataSpec(path=str(path), prompt_field="question", max_inputs=10))
    assert [e.id for e in inputs] == [str(i) for i in range(10)]
    good["data"].pop("max_inputs")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and f"big{suffix}:{len(rows)}: " in err  # without max_inputs the broken line is found


# --- JSONL and CSV records ------------------------------------------------------------------------


BAD_DATA = [
    ([], "the file is empty"),
    ([{"id": 1, "question": "a"}, "{not json", {"id": 3, "question": "c"}], "in.jsonl:2: not valid JSON"),
    (
        [{"id": 1, "question": "a"}, {"id": 2, "question": "b"}, {"id": 1, "question": "c"}],
        "in.jsonl:3: duplicate id '1' (first at line 1)",
    ),
    (
        [{"id": 1, "question": "a"}, {"id": 2, "text": "b"}],
        "in.jsonl:2: data.prompt_template names field 'question', which this record lacks",
    ),
    ([{"question": "a"}], "in.jsonl:1: no id field 'id'"),
    ([[1, 2]], "in.jsonl:1: a line must be a JSON object"),
]


@pytest.mark.parametrize("rows,message", BAD_DATA, ids=[m.split(":")[-1].strip()[:30] for _, m in BAD_DATA])
def test_bad_data_names_file_and_line(tmp_path, good, capsys, rows, message):
    write_data(tmp_path / "in.jsonl", rows)
    good["data"].pop("reference_field")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2
    assert message in err and str(tmp_path / "in.jsonl") in err
    assert err.count("\n") == 1


def test_bad_csv_row(tmp_path, good, capsys):
    (tmp_path / "in.csv").write_text("id,question\n1,a\n2,b,extra\n")
    good["data"] = {"path": str(tmp_path / "in.csv"), "prompt_field": "question"}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "in.csv:3: wrong number of columns" in err


def test_missing_reference_field_in_data(tmp_path, good, capsys):
    write_data(tmp_path / "in.jsonl", [{"id": 1, "question": "a", "answer": "x"}, {"id": 2, "question": "b"}])
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "in.jsonl:2: no reference field 'answer'" in err


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
    """Row groups of 1,000 rows; the last row is bad. max_inputs stops before it, in the first batch."""
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
    inputs = load_inputs(DataSpec(path=str(path), prompt_field="question", max_inputs=10))
    assert [e.id for e in inputs] == [str(i) for i in range(10)] and inputs[3].line == 4
    assert len(batches) == 1 and batches[0].num_rows == 500 and batches[0].schema.names == ["id", "question"]
    with pytest.raises(Exception, match="big.parquet row 5001: id field 'id' must be a string or an integer"):
        load_inputs(DataSpec(path=str(path), prompt_field="question"))
    assert max(b.num_rows for b in batches) == 500
