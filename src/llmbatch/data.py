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
import dataclasses
import functools
import glob
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmbatch.openai_batch import BatchLineError, RequestSettings, parse_request, refused_setting
from llmbatch.spec import DataSpec, GenerationSpec, JobSpec, SpecError, template_fields
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


class BadRecord(DataError):
    """A mistake in one record: `data.on_bad_record: skip` leaves the record out (`Rejected`) where
    `error` stops. A mistake that hides where records end (a CSV quote left open) is a DataError."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Rejected:
    """A record that `data.on_bad_record: skip` left out: a line of the run folder's rejected.jsonl."""

    file: str
    number: int
    """Its line (JSONL, CSV) or row (Parquet, a Hugging Face dataset), as errors name it."""
    unit: str
    """`line` or `row`."""
    reason: str
    split: str | None = None
    """Of a Hugging Face dataset: the split read."""

    def as_json(self) -> dict:
        split = {} if self.split is None else {"split": self.split}
        return {"file": self.file, **split, self.unit: self.number, "reason": self.reason}

    def __str__(self) -> str:
        return f"{location(self.file, self.number, self.split)}: {self.reason}"


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


def location(path: str | Path, number: int, split: str | None = None) -> str:
    """How an error names a record: `file:line`, or `file row N` for Parquet (which has no lines), or
    `folder[split] row N` for a Hugging Face dataset."""
    return f"{_location_prefix(path, split)}{number}"


def _location_prefix(path: str | Path, split: str | None = None) -> str:
    if split is not None:
        return f"{path}[{split}] row "
    return f"{path} row " if _in_rows(path) else f"{path}:"


def _in_rows(path: str | Path) -> bool:
    """Whether records are rows (Parquet, a Hugging Face dataset folder), not lines."""
    return _is_parquet(path) or Path(path).is_dir()


def _is_parquet(path: str | Path) -> bool:
    return Path(path).suffix == ".parquet"


def _lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, what is wrong with the line or None) of each line of a UTF-8 file; a BOM at
    its start is dropped. A line longer than MAX_RECORD_BYTES is never read whole: its text is empty.
    A line that is not UTF-8 comes decoded with replacement characters (a CSV reader still needs it)."""
    offset, number = 0, 0
    with path.open("rb") as f:
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            number += 1
            if len(raw) > MAX_RECORD_BYTES:
                while not raw.endswith(b"\n") and (raw := f.readline(MAX_RECORD_BYTES + 1)):
                    pass  # the rest of the line, a bounded piece at a time
                offset = f.tell()
                yield number, "", f"the line is longer than {_mib(MAX_RECORD_BYTES)}, the most a record may hold"
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            try:
                text, problem = raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                text, problem = raw.decode("utf-8", "replace"), not_utf8(e, offset)
            offset += len(raw)
            yield number, text, problem


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    for number, line, problem in _lines(path):
        where = f"{path}:{number}"
        if problem is not None:
            yield number, BadRecord(where, problem)
        elif not line.strip():
            continue
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, BadRecord(where, f"not valid JSON ({e.msg})")
                continue
            yield number, record if isinstance(record, dict) else BadRecord(where, "a line must be a JSON object")


def _csv_records(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """Records numbered by their first line: a quoted field may span several lines. A line that is not
    UTF-8 makes its record bad; damage that hides where records end (a quote left open, a line or field
    past MAX_RECORD_BYTES, duplicate column names) is a DataError."""
    lines = _lines(path)
    last_line = 0  # the number of the last line the CSV reader took
    problems: dict[int, str] = {}  # what is wrong with lines of the record being read

    def texts() -> Iterator[str]:
        nonlocal last_line, at_end
        for last_line, text, problem in lines:  # noqa: B007 (last_line is the nonlocal the reader reports)
            if problem is not None:
                if not text:  # too long: the reader would see a record end that is not there
                    raise DataError(f"{path}:{last_line}: {problem}")
                problems[last_line] = problem
            yield text
        at_end = True

    reader, header, at_end = csv.reader(texts()), None, False
    while True:
        first_line = last_line + 1
        problems.clear()
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
        where = f"{path}:{first_line}"
        if header is None and problems:
            raise DataError(f"{path}:{min(problems)}: {problems[min(problems)]}")
        if not row:
            continue  # a blank line
        if header is None:
            duplicates = sorted({name for name in row if row.count(name) > 1})
            if duplicates:
                raise DataError(f"{where}: duplicate column name {duplicates[0]!r}")
            header = row
        elif problems:  # named by the line of the bad byte, as an error; rejected by the record's first
            yield first_line, BadRecord(f"{path}:{min(problems)}", problems[min(problems)])
        elif len(row) != len(header):
            yield first_line, BadRecord(where, f"wrong number of columns ({len(row)}; the header has {len(header)})")
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


def _dataset_records(path: Path, split: str | None, columns: set[str]) -> Iterator[tuple[int, dict]]:
    """(row number from 1, record) pairs of a Hugging Face dataset's split, a record batch at a time from
    its memory-mapped Arrow files, only `columns` (as `_parquet_records`)."""
    dataset = open_dataset(path, split)
    present = [name for name in dataset.column_names if name in columns] or dataset.column_names[:1]
    number = 0
    for batch in dataset.select_columns(present).with_format("arrow").iter(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _datasets():
    """The datasets library, quiet (no progress bars, no warnings on stderr) and offline: nothing is
    ever downloaded, an id is read from the local cache only."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # read when datasets is imported ...
    import datasets

    datasets.config.HF_HUB_OFFLINE = True  # ... and here if it was imported before
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def dataset_splits(path: Path) -> list[str] | None:
    """The split names of a Hugging Face dataset folder; None for one Dataset (save_to_disk), which has none."""
    try:
        if (path / "dataset_dict.json").is_file():
            return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        if (path / "state.json").is_file():
            return None
        return list(json.loads((path / "dataset_info.json").read_text())["splits"])  # a cached id's folder
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable Hugging Face dataset ({type(e).__name__}: {e})") from None


def _split_of(path: Path, split: str | None, key: str) -> str | None:
    """The split of the dataset folder `path` to read: `split` (the value of `key`), or the only one."""
    names = dataset_splits(path)
    if names is None:
        if split is not None:
            raise SpecError(key, f"{path} is one Dataset (save_to_disk of a Dataset), with no splits; leave {key} out")
        return None
    if split is None and len(names) == 1:
        return names[0]
    if split is None:
        raise SpecError(key, f"{path} has the splits {', '.join(names)}: choose one")
    if split not in names:
        raise SpecError(key, f"no split {split!r} in {path}; it has {', '.join(names)}")
    return split


def dataset_files(path: Path, split: str | None) -> list[Path]:
    """The files a Hugging Face dataset folder's split is read from: its metadata and Arrow files."""
    if (path / "dataset_dict.json").is_file():
        return [path / "dataset_dict.json", *dataset_files(path / split, None)]
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        return [path / "state.json", path / "dataset_info.json", *(path / f["filename"] for f in state["_data_files"])]
    # A cached id's folder (datasets.naming): NAME-SPLIT.arrow or NAME-SPLIT-00000-of-00002.arrow.
    arrows = sorted(path.glob(f"*-{glob.escape(split)}.arrow")) or sorted(
        path.glob(f"*-{glob.escape(split)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].arrow")
    )
    return [path / "dataset_info.json", *arrows]


def open_dataset(path: Path, split: str | None):
    """The split of a Hugging Face dataset folder as a `datasets.Dataset`, its Arrow files memory-mapped."""
    from pyarrow import ArrowException

    datasets = _datasets()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if split is None else loaded[split]
        arrows = dataset_files(path, split)[1:]
        if not arrows:
            raise FileNotFoundError(f"no Arrow file of split {split!r}")
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in arrows])
    except (OSError, ValueError, KeyError, TypeError, ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable Hugging Face dataset ({first})") from None


def find_cached_dataset(key: str, dataset_id: str) -> Path:
    """The folder of `dataset_id` in the local datasets cache (HF_DATASETS_CACHE), where
    `datasets.load_dataset` left it; never downloaded. A SpecError naming `key` if it is not there."""
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(dataset_id)
        some_split = next(iter(loaded.values()))
        return Path(some_split.cache_files[0]["filename"]).parent
    except Exception as e:  # datasets says "not cached" in several ways (FileNotFoundError, ValueError, ...)
        raise SpecError(
            key,
            f"no file or folder {dataset_id!r}, and no dataset {dataset_id!r} in the Hugging Face datasets "
            f"cache {datasets.config.HF_DATASETS_CACHE} (HF_HOME, HF_DATASETS_CACHE); nothing is downloaded: "
            f"load it once with datasets.load_dataset where there is a network, or give a save_to_disk folder "
            f"({type(e).__name__})",
        ) from None


def resolve_datasets(spec: JobSpec) -> JobSpec:
    """`spec` with each dataset id (data.path, data.val_path) made its folder in the local datasets cache
    and each dataset's split chosen (data.split, data.val_split: the only one unless given), so that the
    ranks, in a container too, read the same folder and split without asking the hub."""
    changes = {}
    for key, split_key in (("path", "split"), ("val_path", "val_split")):
        value = getattr(spec.data, key)
        if value is None:
            continue
        if not Path(value).is_absolute():  # kept as written: an id (spec.loading)
            changes[key] = value = str(find_cached_dataset(f"data.{key}", value))
        if Path(value).is_dir():
            changes[split_key] = _split_of(Path(value), getattr(spec.data, split_key), f"data.{split_key}")
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, **changes))


def _read_records(path: Path, columns: set[str], split: str | None) -> Iterator[tuple[int, dict]]:
    """(line or row number, record) pairs, read as they are asked for; CSV line numbers count the
    header. `columns`: the fields the spec uses (Parquet and datasets are read only for those)."""
    if path.is_dir():
        return _dataset_records(path, split, columns)
    if not path.stat().st_size:
        raise DataError(f"{path}: the file is empty")
    if _is_parquet(path):
        return _parquet_records(path, columns)
    return _csv_records(path) if path.suffix == ".csv" else _jsonl_records(path)


def _input_id(where: str, record: dict, field: str) -> str:
    if field not in record:
        raise BadRecord(where, f"no id field '{field}' (set data.id_field)")
    value = record[field]
    # Not a float: NaN, inf, 1e16 or 0.1 + 0.2 have no one text form to match results by; nor a boolean.
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRecord(where, f"id field '{field}' must be a string or an integer, got {_kind(value)}")
    input_id = str(value)
    _no_surrogate(where, f"id field '{field}'", input_id)
    if not input_id.strip():
        raise BadRecord(where, f"id field '{field}' is empty")
    if (bad := hidden_character(input_id)) is not None:
        raise BadRecord(
            where,
            f"id {input_id!r} holds {invisible(bad) or 'a control character or line break'}; "
            f"ids appear in logs and error lines, so they must be printable single-line text",
        )
    return input_id


def _text(where: str, record: dict, field: str, key: str) -> str:
    """A prompt or reference field as text: a string or a number, never null or a structure."""
    if field not in record:
        what = key.removeprefix("data.").removesuffix("_field")
        raise BadRecord(where, f"no {what} field '{field}' ({key})")
    value = record[field]
    if not _is_scalar(value):
        raise BadRecord(where, f"field '{field}' ({key}) must be text or a number, got {_kind(value)}")
    _no_surrogate(where, f"field '{field}' ({key})", value)
    return str(value)


def _no_surrogate(where: str, what: str, value) -> None:
    if isinstance(value, str) and (found := SURROGATE.search(value)):
        raise BadRecord(
            where,
            f"{what} holds a lone surrogate ({found.group()!a}), half of a UTF-16 pair "
            f"and no text (a broken \\u escape?)",
        )


def _check_size(where: str, what: str, text: str) -> None:
    """A prompt or chat of at most MAX_RECORD_BYTES (a character is 1 to 4 bytes: most need no encoding)."""
    if len(text) * 4 > MAX_RECORD_BYTES and (size := len(text.encode())) > MAX_RECORD_BYTES:
        raise BadRecord(where, f"the {what} is {size} bytes, more than the {_mib(MAX_RECORD_BYTES)} a record may hold")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _messages(where: str, record: dict, field: str) -> list[dict[str, str]]:
    """A chat: a non-empty list of {role, content} messages, roles from ROLES, content text."""
    if field not in record:
        raise BadRecord(where, f"no messages field '{field}' (data.messages_field)")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _kind(messages)
        raise BadRecord(
            where,
            f"field '{field}' (data.messages_field) must be a non-empty list of {{role, content}} messages, got {got}",
        )
    for number, message in enumerate(messages, 1):
        what = f"message {number} of '{field}'"
        if not isinstance(message, dict):
            raise BadRecord(where, f"{what} must be an object with a role and a content, got {_kind(message)}")
        if unknown := sorted(set(message) - {"role", "content"}):
            raise BadRecord(where, f"{what} has an unknown key {unknown[0]!r} (a message holds role and content)")
        if message.get("role") not in ROLES:
            got = repr(message["role"]) if "role" in message else "none"
            raise BadRecord(where, f"{what}: role must be one of {', '.join(ROLES)}, got {got}")
        if not isinstance(message.get("content"), str):
            got = _kind(message["content"]) if "content" in message else "none"
            raise BadRecord(where, f"{what}: content must be text, got {got}")
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
            raise BadRecord(where, f"data.prompt_template names field '{name}', which this record lacks")
    try:
        # Each value that reaches the prompt ({q}, or {c[0]} of a list) obeys the prompt field's rule:
        # text or a number, never null or a structure printed as its Python repr.
        for name in _replacement_fields(template):
            value, _ = _FORMATTER.get_field(name, (), record)
            if not _is_scalar(value):
                raise BadRecord(
                    where, f"field '{name}' of data.prompt_template must be text or a number, got {_kind(value)}"
                )
            _no_surrogate(where, f"field '{name}' of data.prompt_template", value)
        return template.format_map(record)
    except (ValueError, TypeError, LookupError, AttributeError) as e:  # e.g. {n:d} on a string, {q[9]}
        raise BadRecord(
            where, f"data.prompt_template cannot be filled from this record ({type(e).__name__}: {e})"
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


def load_inputs(data: DataSpec, val: bool = False, rejected: list[Rejected] | None = None) -> list[Input]:
    """The inputs of data.path (of data.val_path with `val`), in file order, at most data.max_inputs.

    A bad record raises BadRecord, or with data.on_bad_record: skip is left out and added to `rejected`;
    the same file gives the same inputs and the same rejected records every time. A file with no good
    record is a DataError either way."""
    path, split = (Path(data.val_path), data.val_split) if val else (Path(data.path), data.split)
    if path.is_dir():
        split = _split_of(path, split, "data.val_split" if val else "data.split")
    if data.is_openai_batch():
        return load_batch_inputs(path, data.max_inputs)
    skip = data.on_bad_record == "skip"
    fields = template_fields(data.prompt_template) if data.prompt_template is not None else []
    inputs, seen, left_out, first_bad = [], {}, [], None
    unit, prefix = "row" if _in_rows(path) else "line", _location_prefix(path, split)
    for number, record in _read_records(path, used_fields(data), split):
        try:
            if isinstance(record, BadRecord):
                raise record
            inputs.append(_input(f"{prefix}{number}", number, record, data, fields, seen, unit))
        except BadRecord as e:
            if not skip:
                raise
            left_out.append((number, e.reason))
            first_bad = first_bad or str(e)
            continue
        seen[inputs[-1].id] = number
        if data.max_inputs is not None and len(inputs) == data.max_inputs:
            break  # the rest of the file is not read
    if not inputs and left_out:
        raise DataError(f"{path}: no good record: all {len(left_out)} are bad; the first: {first_bad}")
    if not inputs:
        raise DataError(f"{path}: the file has no records")
    if rejected is not None:
        rejected += [Rejected(str(path), number, unit, reason, split) for number, reason in left_out]
    return inputs


def _input(
    where: str, number: int, record: dict, data: DataSpec, fields: list[str], seen: dict[str, int], unit: str
) -> Input:
    """One record as an input; raises BadRecord. `where`: location(path, number), made once per record.
    `seen`: the line or row of each good input's id so far."""
    input_id = _input_id(where, record, data.id_field)
    if input_id in seen:
        raise BadRecord(where, f"duplicate id {input_id!r} (first at {unit} {seen[input_id]})")
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
    return Input(input_id, prompt, reference, number, messages)


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
