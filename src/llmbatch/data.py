"""Datasets: JSONL, CSV or Parquet records turned into prompts or chats, every mistake named by
`file:line` (`file row N` for Parquet).

Files are streamed: with data.max_inputs, reading stops after that many inputs. JSONL and CSV are
read as UTF-8 (a leading BOM is dropped); Parquet in record batches of its needed columns (pyarrow).
Ids must be non-empty single-line text (a string or an integer) without control or invisible format
characters, since they appear in logs, shard files and error lines. A record is at most MAX_RECORD_BYTES:
a line, a CSV field, a prompt or a chat; text holds no lone surrogate (half of a UTF-16 pair, from a JSON
escape), which no tokenizer, log or shard can write. An OpenAI batch file's lines are checked by
llmbatch.openai_batch and become inputs here (`load_batch_inputs`).
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmbatch.openai_batch import BatchLineError, RequestSettings, parse_request, refused_setting
from llmbatch.spec import DataSpec, GenerationSpec, template_fields
from llmbatch.text import SURROGATE, hidden_character, invisible, not_utf8

ROLES = ("system", "user", "assistant")
"""Roles a message of data.messages_field may have."""

PARQUET_BATCH_ROWS = 65536
"""Rows of a Parquet file in memory at once, as Arrow columns (then as Python values)."""

MAX_RECORD_BYTES = 8 << 20
"""The most a line, a CSV field, a prompt or a chat may hold, in UTF-8 bytes. Far more than any model's
context in text; a bound on what reading (and encoding) one hostile record may cost."""

# A CSV field (counted in characters, each at least a byte) may be as long as a record. A module-wide
# setting: this process reads no CSV of another kind.
csv.field_size_limit(MAX_RECORD_BYTES)


class DataError(Exception):
    """A mistake in a data file, named by `file:line` (`file row N` for Parquet)."""


@dataclass(frozen=True)
class Input:
    id: str
    prompt: str | None
    """The prompt text; None for a chat (messages)."""
    reference: str | None
    line: int
    """Where the record starts: its line (JSONL, CSV), or its row (Parquet); see `location`."""
    messages: list[dict[str, str]] | None = None
    """A chat of {role, content} messages (data.messages_field), as given; None for a prompt."""
    settings: RequestSettings | None = None
    """An OpenAI batch line's own generation settings (see `check_settings`); None for other data."""


def location(path: str | Path, number: int) -> str:
    """How an error names a record: `file:line`, or `file row N` for Parquet (which has no lines)."""
    return f"{_location_prefix(path)}{number}"


def _location_prefix(path: str | Path) -> str:
    return f"{path} row " if _is_parquet(path) else f"{path}:"


def _is_parquet(path: str | Path) -> bool:
    return Path(path).suffix == ".parquet"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file; a BOM at its start is dropped. A line longer
    than MAX_RECORD_BYTES is refused before it is read whole."""
    offset, number = 0, 0
    with path.open("rb") as f:
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            number += 1
            if len(raw) > MAX_RECORD_BYTES:
                raise DataError(
                    f"{path}:{number}: the line is longer than {_mib(MAX_RECORD_BYTES)}, the most a record may hold"
                )
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: {not_utf8(e, offset)}") from None
            offset += len(raw)
            yield number, text


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a line must be a JSON object")
        yield number, record


def _csv_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Records numbered by their first line: a quoted field may span several lines."""
    lines = _lines(path)
    last_line = 0  # the number of the last line the CSV reader took

    def texts() -> Iterator[str]:
        nonlocal last_line, at_end
        for last_line, text in lines:  # noqa: B007 (last_line is the nonlocal the reader reports)
            yield text
        at_end = True

    reader, header, at_end = csv.reader(texts()), None, False
    while True:
        first_line = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise DataError(
                    f"{path}:{first_line}: a field runs past {_mib(MAX_RECORD_BYTES)}, the most a "
                    f"record may hold (a quote left open?)"
                ) from None
            raise DataError(f"{path}:{first_line}: not valid CSV ({e})") from None
        if at_end:
            # The reader finishes a row at its line's end, unless a quoted field is still open: then it
            # took every line to the file's end into that field (the rows after it would vanish).
            raise DataError(
                f"{path}:{first_line}: a quoted field opened in this record runs to the end of the file "
                f"(a quote left open?)"
            )
        if not row:
            continue  # a blank line
        if header is None:
            duplicates = sorted({name for name in row if row.count(name) > 1})
            if duplicates:
                raise DataError(f"{path}:{first_line}: duplicate column name {duplicates[0]!r}")
            header = row
        elif len(row) != len(header):
            raise DataError(f"{path}:{first_line}: wrong number of columns ({len(row)}; the header has {len(header)})")
        else:
            yield first_line, dict(zip(header, row))


def _parquet_records(path: Path, columns: set[str]) -> Iterator[tuple[int, dict]]:
    """(row number from 1, record) pairs, a record batch at a time; only `columns` are read (a record
    lacks those the file does not have, and is named for it like a JSONL line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        # At least one column, or batches have no rows: a file with none of the fields then fails
        # at its first row, naming the id field, as a JSONL file would.
        present = [name for name in parquet.schema_arrow.names if name in columns] or parquet.schema_arrow.names[:1]
        number = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except (pa.ArrowException, OSError) as e:  # not Parquet, damaged pages, an unreadable file
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _read_records(path: Path, columns: set[str]) -> Iterator[tuple[int, dict]]:
    """(line or row number, record) pairs, read as they are asked for; CSV line numbers count the
    header. `columns`: the fields the spec uses (a Parquet file is read only for those)."""
    if not path.stat().st_size:
        raise DataError(f"{path}: the file is empty")
    if _is_parquet(path):
        return _parquet_records(path, columns)
    return _csv_records(path) if path.suffix == ".csv" else _jsonl_records(path)


def _input_id(where: str, record: dict, field: str) -> str:
    if field not in record:
        raise DataError(f"{where}: no id field '{field}' (set data.id_field)")
    value = record[field]
    # Not a float: NaN, inf, 1e16 or 0.1 + 0.2 have no one text form to match results by; nor a boolean.
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f"{where}: id field '{field}' must be a string or an integer, got {_kind(value)}")
    input_id = str(value)
    _no_surrogate(where, f"id field '{field}'", input_id)
    if not input_id.strip():
        raise DataError(f"{where}: id field '{field}' is empty")
    if (bad := hidden_character(input_id)) is not None:
        raise DataError(
            f"{where}: id {input_id!r} holds {invisible(bad) or 'a control character or line break'}; "
            f"ids appear in logs and error lines, so they must be printable single-line text"
        )
    return input_id


def _text(where: str, record: dict, field: str, key: str) -> str:
    """A prompt or reference field as text: a string or a number, never null or a structure."""
    if field not in record:
        what = key.removeprefix("data.").removesuffix("_field")
        raise DataError(f"{where}: no {what} field '{field}' ({key})")
    value = record[field]
    if not _is_scalar(value):
        raise DataError(f"{where}: field '{field}' ({key}) must be text or a number, got {_kind(value)}")
    _no_surrogate(where, f"field '{field}' ({key})", value)
    return str(value)


def _no_surrogate(where: str, what: str, value) -> None:
    if isinstance(value, str) and (found := SURROGATE.search(value)):
        raise DataError(
            f"{where}: {what} holds a lone surrogate ({found.group()!a}), half of a UTF-16 pair "
            f"and no text (a broken \\u escape?)"
        )


def _check_size(where: str, what: str, text: str) -> None:
    """A prompt or chat of at most MAX_RECORD_BYTES (a character is 1 to 4 bytes: most need no encoding)."""
    if len(text) * 4 > MAX_RECORD_BYTES and (size := len(text.encode())) > MAX_RECORD_BYTES:
        raise DataError(
            f"{where}: the {what} is {size} bytes, more than the {_mib(MAX_RECORD_BYTES)} a record may hold"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _messages(where: str, record: dict, field: str) -> list[dict[str, str]]:
    """A chat: a non-empty list of {role, content} messages, roles from ROLES, content text."""
    if field not in record:
        raise DataError(f"{where}: no messages field '{field}' (data.messages_field)")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _kind(messages)
        raise DataError(
            f"{where}: field '{field}' (data.messages_field) must be a non-empty list of "
            f"{{role, content}} messages, got {got}"
        )
    for number, message in enumerate(messages, 1):
        what = f"{where}: message {number} of '{field}'"
        if not isinstance(message, dict):
            raise DataError(f"{what} must be an object with a role and a content, got {_kind(message)}")
        if unknown := sorted(set(message) - {"role", "content"}):
            raise DataError(f"{what} has an unknown key {unknown[0]!r} (a message holds role and content)")
        if message.get("role") not in ROLES:
            got = repr(message["role"]) if "role" in message else "none"
            raise DataError(f"{what}: role must be one of {', '.join(ROLES)}, got {got}")
        if not isinstance(message.get("content"), str):
            got = _kind(message["content"]) if "content" in message else "none"
            raise DataError(f"{what}: content must be text, got {got}")
        _no_surrogate(where, f"the content of message {number} of '{field}'", message["content"])
    _check_size(where, f"chat in '{field}'", "".join(message["content"] for message in messages))
    return messages


def _is_scalar(value) -> bool:
    """Text, a number or a boolean: a value with one obvious text form."""
    return isinstance(value, (str, int, float))


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"  # a JSON object, a Parquet struct
    if isinstance(value, list):
        return "a list"  # a JSON array, a Parquet list
    return "text" if isinstance(value, str) else f"a value of type {type(value).__name__}"


def _render(where: str, template: str, fields: list[str], record: dict) -> str:
    """The template filled from the record; `fields`: template_fields(template)."""
    for name in fields:
        if name not in record:
            raise DataError(f"{where}: data.prompt_template names field '{name}', which this record lacks")
    try:
        # Each value that reaches the prompt ({q}, or {c[0]} of a list) obeys the prompt field's rule:
        # text or a number, never null or a structure printed as its Python repr.
        for name in _replacement_fields(template):
            value, _ = _FORMATTER.get_field(name, (), record)
            if not _is_scalar(value):
                raise DataError(
                    f"{where}: field '{name}' of data.prompt_template must be text or a number, got {_kind(value)}"
                )
            _no_surrogate(where, f"field '{name}' of data.prompt_template", value)
        return template.format_map(record)
    except (ValueError, TypeError, LookupError, AttributeError) as e:  # e.g. {n:d} on a string, {q[9]}
        raise DataError(
            f"{where}: data.prompt_template cannot be filled from this record ({type(e).__name__}: {e})"
        ) from None


_FORMATTER = string.Formatter()


@functools.cache
def _replacement_fields(template: str) -> tuple[str, ...]:
    """The replacement fields of a template as written: `question`, `c[0]`."""
    return tuple(dict.fromkeys(name for _, name, _, _ in _FORMATTER.parse(template) if name is not None))


def used_fields(data: DataSpec) -> set[str]:
    """The record fields the spec reads."""
    fields = {data.id_field, data.prompt_field, data.messages_field, data.reference_field}
    if data.prompt_template is not None:
        fields |= set(template_fields(data.prompt_template))
    return fields - {None}


def load_inputs(data: DataSpec, path: str | None = None) -> list[Input]:
    """The inputs of `path` (default: data.path), in file order, at most data.max_inputs."""
    path = Path(path or data.path)
    if data.is_openai_batch():
        return load_batch_inputs(path, data.max_inputs)
    fields = template_fields(data.prompt_template) if data.prompt_template is not None else []
    inputs, seen = [], {}
    unit, prefix = "row" if _is_parquet(path) else "line", _location_prefix(path)
    for number, record in _read_records(path, used_fields(data)):
        where = f"{prefix}{number}"  # location(path, number), for a million records
        input_id = _input_id(where, record, data.id_field)
        if input_id in seen:
            raise DataError(f"{where}: duplicate id {input_id!r} (first at {unit} {seen[input_id]})")
        seen[input_id] = number
        prompt = messages = None
        if data.messages_field is not None:
            messages = _messages(where, record, data.messages_field)
        elif data.prompt_template is not None:
            prompt = _render(where, data.prompt_template, fields, record)
        else:
            prompt = _text(where, record, data.prompt_field, "data.prompt_field")
        if prompt is not None:
            _check_size(where, "prompt", prompt)
        reference = None
        if data.reference_field is not None:
            reference = _text(where, record, data.reference_field, "data.reference_field")
        inputs.append(Input(input_id, prompt, reference, number, messages))
        if data.max_inputs is not None and len(inputs) == data.max_inputs:
            break  # the rest of the file is not read
    if not inputs:
        raise DataError(f"{path}: the file has no records")
    return inputs


def load_batch_inputs(path: Path, max_inputs: int | None) -> list[Input]:
    """The requests of an OpenAI batch file (llmbatch.openai_batch) as inputs: custom_id is the id,
    the chat or prompt the text, and the body's max_tokens, temperature, top_p and seed its settings."""
    if not path.stat().st_size:
        raise DataError(f"{path}: the file is empty")
    inputs, seen, url = [], {}, None
    for number, record in _jsonl_records(path):
        where = f"{path}:{number}"
        try:
            request = parse_request(record, url)
        except BatchLineError as e:
            raise DataError(f"{where}: {e}") from None
        url = request.url
        input_id = _input_id(where, record, "custom_id")
        if input_id in seen:
            raise DataError(f"{where}: duplicate custom_id {input_id!r} (first at line {seen[input_id]})")
        seen[input_id] = number
        if request.prompt is not None:
            _check_size(where, "prompt", request.prompt)
        else:
            _check_size(where, "chat in body.messages", "".join(m["content"] for m in request.messages))
        inputs.append(Input(input_id, request.prompt, None, number, request.messages, request.settings))
        if max_inputs is not None and len(inputs) == max_inputs:
            break
    if not inputs:
        raise DataError(f"{path}: the file has no records")
    return inputs


def check_settings(inputs: list[Input], data: DataSpec, generation: GenerationSpec) -> None:
    """Refuse, naming its line, an input whose own settings the spec does not allow
    (generation.allow_overrides, and max_tokens at most generation.max_new_tokens)."""
    for item in inputs:
        if item.settings is not None and (
            why := refused_setting(item.settings, generation.allow_overrides, generation.max_new_tokens)
        ):
            raise DataError(f"{location(data.path, item.line)}: {why}")


def chat(item: Input, data: DataSpec) -> list[dict[str, str]] | None:
    """The messages an input is to the chat template, or None for a prompt used as written.

    data.system_prompt opens every chat with a system message, unless its messages begin with one
    of their own (theirs is the more specific). An OpenAI batch file's chat lines are chats, its
    completion prompts are used as written.
    """
    if item.messages is None and not data.chat_template:
        return None
    messages = item.messages or [{"role": "user", "content": item.prompt}]
    if data.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    return messages
