"""Datasets: JSONL or CSV records turned into prompts, with every mistake named by file:line."""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path

from llmbatch.spec import DataSpec


class DataError(Exception):
    """A mistake in a data file, named by `file:line`."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    reference: str | None
    line: int


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; CSV line numbers count the header as line 1."""
    if not path.stat().st_size:
        raise DataError(f"{path}: the file is empty")
    records = []
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                if None in record or None in record.values():
                    raise DataError(f"{path}:{reader.line_num}: wrong number of columns")
                records.append((reader.line_num, record))
    else:
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: a line must be a JSON object")
                records.append((number, record))
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def load_examples(data: DataSpec, path: str | None = None) -> list[Example]:
    """The examples of `path` (default: data.path), in file order, at most data.max_samples."""
    path = Path(path or data.path)
    examples, seen = [], {}
    for number, record in _read_records(path):
        where = f"{path}:{number}"
        if data.id_field not in record:
            raise DataError(f"{where}: no id field '{data.id_field}' (set data.id_field)")
        example_id = str(record[data.id_field])
        if example_id in seen:
            raise DataError(f"{where}: duplicate id {example_id!r} (first at line {seen[example_id]})")
        seen[example_id] = number
        if data.prompt_template is not None:
            missing = [name for name in template_fields(data.prompt_template) if name not in record]
            if missing:
                raise DataError(f"{where}: data.prompt_template names field '{missing[0]}', "
                                f"which this record lacks")
            prompt = data.prompt_template.format_map(record)
        else:
            if data.prompt_field not in record:
                raise DataError(f"{where}: no prompt field '{data.prompt_field}' (data.prompt_field)")
            prompt = str(record[data.prompt_field])
        reference = None
        if data.reference_field is not None:
            if data.reference_field not in record:
                raise DataError(f"{where}: no reference field '{data.reference_field}' "
                                f"(data.reference_field)")
            reference = str(record[data.reference_field])
        examples.append(Example(example_id, prompt, reference, number))
        if data.max_samples is not None and len(examples) == data.max_samples:
            break
    return examples
