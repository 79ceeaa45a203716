"""Datasets: JSONL or CSV records turned into prompts, with every mistake named by file:line.

Files are read as UTF-8 (a leading BOM is dropped) and streamed: with data.max_samples, reading stops
after that many records. Ids must be non-empty single-line text (a string or a number) without
control characters, since they appear in logs, shard files and error lines.
"""

from __future__ import annotations

import codecs
import csv
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmbatch.spec import DataSpec, not_utf8, template_fields


class DataError(Exception):
    """A mistake in a data file, named by `file:line`."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    reference: str | None
    line: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file; a BOM at its start is dropped."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
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
        nonlocal last_line
        for last_line, text in lines:
            yield text

    reader, header = csv.reader(texts()), None
    while True:
        first_line = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{first_line}: not valid CSV ({e})") from None
        if not row:
            continue  # a blank line
        if header is None:
            duplicates = sorted({name for name in row if row.count(name) > 1})
            if duplicates:
                raise DataError(f"{path}:{first_line}: duplicate column name {duplicates[0]!r}")
            header = row
        elif len(row) != len(header):
            raise DataError(f"{path}:{first_line}: wrong number of columns ({len(row)}; the header has "
                            f"{len(header)})")
        else:
            yield first_line, dict(zip(header, row))


def _read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs, read as they are asked for; CSV line numbers count the header."""
    if not path.stat().st_size:
        raise DataError(f"{path}: the file is empty")
    return _csv_records(path) if path.suffix == ".csv" else _jsonl_records(path)


def _example_id(where: str, record: dict, field: str) -> str:
    if field not in record:
        raise DataError(f"{where}: no id field '{field}' (set data.id_field)")
    value = record[field]
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: id field '{field}' must be a string or a number, got {_json_kind(value)}")
    example_id = str(value)
    if not example_id.strip():
        raise DataError(f"{where}: id field '{field}' is empty")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in example_id):
        raise DataError(f"{where}: id {example_id!r} holds a control character or line break; ids appear in "
                        f"logs and error lines, so they must be printable single-line text")
    return example_id


def _text(where: str, record: dict, field: str, key: str) -> str:
    """A prompt or reference field as text: a string or a number, never null or a structure."""
    if field not in record:
        what = key.removeprefix("data.").removesuffix("_field")
        raise DataError(f"{where}: no {what} field '{field}' ({key})")
    value = record[field]
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: field '{field}' ({key}) must be text or a number, got {_json_kind(value)}")
    return str(value)


def _json_kind(value) -> str:
    return "null" if value is None else "a JSON object" if isinstance(value, dict) else "a JSON array"


def _render(where: str, template: str, record: dict) -> str:
    for name in template_fields(template):
        if name not in record:
            raise DataError(f"{where}: data.prompt_template names field '{name}', which this record lacks")
        if record[name] is None:
            raise DataError(f"{where}: field '{name}' of data.prompt_template is null")
    try:
        return template.format_map(record)
    except (ValueError, TypeError, LookupError, AttributeError) as e:  # e.g. {n:d} on a string, {q[9]}
        raise DataError(f"{where}: data.prompt_template cannot be filled from this record "
                        f"({type(e).__name__}: {e})") from None


def load_examples(data: DataSpec, path: str | None = None) -> list[Example]:
    """The examples of `path` (default: data.path), in file order, at most data.max_samples."""
    path = Path(path or data.path)
    examples, seen = [], {}
    for number, record in _read_records(path):
        where = f"{path}:{number}"
        example_id = _example_id(where, record, data.id_field)
        if example_id in seen:
            raise DataError(f"{where}: duplicate id {example_id!r} (first at line {seen[example_id]})")
        seen[example_id] = number
        if data.prompt_template is not None:
            prompt = _render(where, data.prompt_template, record)
        else:
            prompt = _text(where, record, data.prompt_field, "data.prompt_field")
        reference = None
        if data.reference_field is not None:
            reference = _text(where, record, data.reference_field, "data.reference_field")
        examples.append(Example(example_id, prompt, reference, number))
        if data.max_samples is not None and len(examples) == data.max_samples:
            break  # the rest of the file is not read
    if not examples:
        raise DataError(f"{path}: the file has no records")
    return examples
