"""Spec files in, typed specs out: YAML read as YAML 1.2 reads it (duplicate keys refused, named by line),
values typed by the schema, `--set` overrides applied and blamed, and the spec written back out.

A spec is parsed once, here. Everything downstream takes a `JobSpec`, never a raw dict.
Relative paths in a spec file resolve against the spec file's folder; paths given on the
command line (`--set`, `--output`) resolve against the current directory.

The model references (`MODEL_KEYS`) stay as written: one may be a hub id, which only the models side
can resolve (`llmbatch.models.resolve_models`), after parsing. A run folder's spec holds them resolved,
and `load_resolved` reads them as the folders they are.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from llmbatch.spec.schema import EMBEDDED_MODEL, KINDS, JobSpec, Range, SpecError, is_dataset_id
from llmbatch.text import not_utf8

# Keys whose string values are paths, and so resolve against the folder they were written for.
DATA_PATH_KEYS = ("data.path", "data.val_path")
PATH_KEYS = {*DATA_PATH_KEYS, "output.root", "container.image"}
MODEL_KEYS = ("model.path", "model.adapter")
"""A model folder or a hub id each: kept as written while parsing, resolved after it."""


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2's core schema for plain scalars, where PyYAML reads YAML 1.1: there `off`, `no` and `on`
    are booleans (the documented `train.liger: off` arrived as False), `10:00:00` is the integer 36000
    (sexagesimal), `2024-01-01` a date and `4e-3` a string. Here a value means what it says."""


class _SpecDumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or 1.2 would read as something else, so a saved spec
    reads back the same here and in any other YAML reader."""


_YAML12_SCALARS = [
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
        "-+.0123456789",
    ),
]
_SpecLoader.yaml_implicit_resolvers = {  # YAML 1.1's null and merge key (<<) stay; they are 1.2's too
    first: [(tag, rx) for tag, rx in resolvers if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in _YAML12_SCALARS:
    for _cls in (_SpecLoader, _SpecDumper):
        _cls.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))

MAX_INT_DIGITS = 100
"""Longer integers are refused while parsing (Python refuses to convert those past 4300 digits)."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if len(text) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} digits", node.start_mark)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)  # YAML 1.2: 010 is ten, not eight


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _load_yaml(text: str, prefix: str = "", source: str | None = None) -> Any:
    """Parse YAML as `_SpecLoader` reads it, refusing duplicate keys (YAML would keep the last one
    silently), named by key path under `prefix` and, with the `source` file, by line."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, prefix, source)
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise SpecError(prefix, "nested too deeply to be a spec", source=source) from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, prefix: str, source: str | None) -> None:
    walked, todo = set(), [(root, prefix)]
    while todo:  # not recursive: a document may be as deep as PyYAML could compose
        node, path = todo.pop()
        if id(node) in walked:  # an alias: walked already (and it may hold itself)
            continue
        walked.add(id(node))
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):  # a complex key: refused as unknown later
                    continue
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                key_path = f"{path}.{key_node.value}" if path else key_node.value
                if key in first_lines:
                    if source is None:  # a --set value: its lines mean nothing to the user
                        raise SpecError(key_path, "duplicate key")
                    raise SpecError(
                        key_path, f"duplicate key (first at line {first_lines[key]})", source=f"{source}:{line}"
                    )
                first_lines[key] = line
                children.append((value_node, key_path))
        todo += reversed(children)  # in document order: the first duplicate is the one named


def _type_name(tp: Any, allowed: Range | None = None) -> str:
    """What a value of `tp` is, in words; with the range of a numeric field (`an integer in (0, 64]`)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, allowed) for a in typing.get_args(tp))
    if allowed is not None and tp in (int, float):
        return f"{_type_name(tp)} {allowed}"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


# YAML 1.1's booleans, which specs written for it may hold: true/false fields take them as written.
YAML11_BOOLEANS = {
    word: value
    for value, words in ((True, "yes Yes YES on On ON y Y"), (False, "no No NO off Off OFF n N"))
    for word in words.split()
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except SpecError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            # Values of extra sbatch options and env vars may be written as numbers in YAML.
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in YAML11_BOOLEANS:
            return YAML11_BOOLEANS[value]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise SpecError(key, f"must be {_type_name(tp)}, got {value!r}")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(options)})"


OLD_KEYS = {"data.max_samples": "data.max_inputs"}
"""Spec keys by an older name (old: new), read as the new one: users' spec files and the spec.yaml of run
folders written before the rename still load."""


def _build(cls: type, raw: Any, prefix: str, base_dir: Path) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(prefix, f"must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in OLD_KEYS:
            new_path = OLD_KEYS[path]
            key = new_path.rpartition(".")[2]
            if key in raw:
                raise SpecError(path, f"the old name of {new_path}, which is given too: keep one")
        if key not in fields:
            raise SpecError(path, "unknown key" + _suggest(str(key), list(fields)))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, base_dir)
            continue
        try:
            value = _coerce(path, value, tp)
        except SpecError:
            if (allowed := fields[key].metadata.get("range")) is None:
                raise
            raise SpecError(path, f"must be {_type_name(tp, allowed)}, got {value!r}") from None
        if _is_path(path, value) and not _dataset_id(path, value, base_dir):
            value = str(local_path(value, base_dir))
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required field without a value
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise SpecError(f"{prefix}.{missing[0]}" if prefix else missing[0], "missing") from None


def _is_path(key: str, value: Any) -> bool:
    if key not in PATH_KEYS or not isinstance(value, str):
        return False
    # A Docker/Podman image is a name (repo/name:tag); only an Apptainer image is a file.
    return key != "container.image" or value.endswith(".sif")


def _dataset_id(key: str, value: str, base_dir: Path) -> bool:
    """A data path written as a Hugging Face dataset id, with nothing at it as a path: kept as written,
    to be found in the datasets cache after parsing (`llmbatch.data.resolve_datasets`)."""
    return key in DATA_PATH_KEYS and is_dataset_id(value) and not local_path(value, base_dir).exists()


def local_path(value: str, folder: Path) -> Path:
    """A path value as the absolute path it names, relative to `folder`."""
    return (folder / Path(value).expanduser()).resolve()


def _field_type(key: str) -> Any:
    """The annotation of a dotted key path, for typing `--set` values."""
    cls: Any = JobSpec
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise SpecError(".".join(parts[: i + 1]), "unknown key" + _suggest(part, names))
        cls = typing.get_type_hints(cls)[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise SpecError(key, f"'{'.'.join(parts[: i + 1])}' has no sub-keys")
    return cls


def parse_override(assignment: str) -> tuple[str, Any]:
    """`generation.max_new_tokens=16` -> ("generation.max_new_tokens", 16), typed by the schema."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise SpecError("", f"expected key.path=value, got {assignment!r}")
    key = OLD_KEYS.get(key, key)
    tp = _field_type(key)
    if tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType)
        and str in typing.get_args(tp)
        and text not in ("null", "~")
    ):
        return key, text  # a string field keeps the text as written ("007" stays "007")
    try:
        return key, _load_yaml(text, prefix=key)
    except yaml.YAMLError:
        raise SpecError(key, f"cannot parse value {text!r}") from None


def load_spec(
    path: str | Path | None,
    kind: str | None,
    overrides: list[str] = (),
    cwd: Path | None = None,
    origins: dict[str, str] | None = None,
) -> JobSpec:
    """Read, override, type and validate a spec, its model references as written (`MODEL_KEYS`). Raises
    SpecError naming the key path, and where the wrong value came from: the spec file, or the option that
    set it (`origins` maps an override to the option's words, e.g. "--gpus 0"; default "--set KEY=VALUE").
    Kind None: the one the file names."""
    cwd = Path.cwd() if cwd is None else cwd
    source = str(path) if path is not None else None
    try:
        if path is None:
            raw, base_dir = {}, cwd
        else:
            path = Path(path)
            if not path.is_file():
                raise SpecError("", f"no such spec file: {path}")
            try:
                data = path.read_bytes()
                text = data.decode("utf-8-sig")
            except OSError as e:
                raise SpecError("", f"cannot read the spec file: {e.strerror}") from None
            except UnicodeDecodeError as e:
                line = e.object.count(b"\n", 0, e.start) + 1  # e.object: the bytes after a BOM
                raise SpecError("", f"line {line}: {not_utf8(e, len(data) - len(e.object))}") from None
            try:
                raw = _load_yaml(text, source=source) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                if mark is not None:
                    line = mark.line + 1
                else:  # a ReaderError (a control character) knows only its position
                    line = text.count("\n", 0, getattr(e, "position", 0)) + 1
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise SpecError("", f"invalid YAML at line {line}: {problem}") from None
            if not isinstance(raw, dict):
                raise SpecError("", "a spec must be a mapping of sections (model, data, ...)")
            base_dir = path.resolve().parent
        if kind is None:
            kind = raw.get("kind")
            if kind not in KINDS:
                raise SpecError("kind", f"must be {' or '.join(map(repr, KINDS))}, got {kind!r}")
        raw.setdefault("name", Path(source).stem if source else kind)
        if "kind" in raw and raw["kind"] != kind:
            raise SpecError("kind", f"this is a {raw['kind']!r} spec, but the command is {kind!r}")
        raw["kind"] = kind
        spec = _build(JobSpec, raw, "", base_dir)
        for assignment in overrides:
            try:
                key, value = parse_override(assignment)
                spec = apply_override(spec, key, value, cwd)
                if spec.kind != kind:
                    raise SpecError(
                        "kind", f"the command chose {kind!r}; run the {spec.kind} command for a {spec.kind} job"
                    )
            except SpecError as e:
                e.source = (origins or {}).get(assignment, f"--set {assignment}")
                raise
        try:
            spec.validate()
        except SpecError as e:
            e.source = blame(e, overrides, origins)
            raise
        return spec
    except SpecError as e:
        e.source = e.source or source
        raise


def blame(error: SpecError, overrides: list[str], origins: dict[str, str] | None = None) -> str | None:
    """The option that set the value `error` is about (its key, a key above or below it, or for a rule
    between keys, one of the others), as the user wrote it; None if the spec file did."""
    set_by = {
        assignment.partition("=")[0]: (origins or {}).get(assignment, f"--set {assignment}") for assignment in overrides
    }
    for key in (error.key, *error.related):
        for set_key, option in reversed(set_by.items()):
            if set_key == key or key.startswith((f"{set_key}.", f"{set_key}[")) or set_key.startswith(f"{key}."):
                return option
    return None


def apply_override(spec: JobSpec, key: str, value: Any, cwd: Path) -> JobSpec:
    """A copy of `spec` with one dotted key set, typed and checked like a value from a file.

    Paths already in `spec` are absolute (model references are left as they are), so rebuilding against
    `cwd` resolves only the new value.
    """
    raw = spec.to_dict()
    *sections, leaf = key.split(".")
    target = raw
    for part in sections:
        target = target[part]
    target[leaf] = value
    return _build(JobSpec, raw, "", cwd)


def written_in(key: str, spec_file: str | Path | None, overrides: Sequence[str] = (), cwd: Path | None = None) -> Path:
    """The folder a relative path at `key` was written for: the current one if an override set the key
    (or its section) or there is no spec file, else the spec file's."""
    set_here = any(assignment.partition("=")[0] in (key, key.rpartition(".")[0]) for assignment in overrides)
    if spec_file is None or set_here:
        return Path.cwd() if cwd is None else cwd
    return Path(spec_file).resolve().parent


def with_model_folders(spec: JobSpec, folder: Callable[[str, str], Path]) -> JobSpec:
    """`spec` with each model reference (`MODEL_KEYS`) replaced by `folder(key, value as written)`, and
    the folders checked (`ModelSpec.check_folders`)."""
    changes = {}
    for key in MODEL_KEYS:
        name = key.partition(".")[2]
        value = getattr(spec.model, name)
        if value is not None and value != EMBEDDED_MODEL:
            changes[name] = str(folder(key, value))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, **changes))
    spec.model.check_folders()
    return spec


def load_resolved(path: Path) -> JobSpec:
    """Load the resolved spec a run folder holds, checked exactly as at submission (`load_spec`, the model
    folders too): anyone who can write the run folder can edit it, and `resume` builds the batch script
    from it. Its model references are folders (a hub id was resolved at submission), read as paths.

    A SpecError naming the file and the key if it is damaged (edited, torn by a full disk), holds what
    submission refuses, or names a data or model path that is gone.
    """
    spec = load_spec(path, None)
    try:
        return with_model_folders(spec, lambda key, value: local_path(value, Path(path).resolve().parent))
    except SpecError as e:
        e.source = str(path)
        raise


def dump_spec(spec: JobSpec) -> str:
    return yaml.dump(spec.to_dict(), Dumper=_SpecDumper, sort_keys=False)
