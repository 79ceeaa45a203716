"""Prompt templates (`data.prompt_template`): the record fields a template reads, and whatever
str.format would refuse, found before any record is read."""

from __future__ import annotations

import re
import string


def template_fields(template: str) -> list[str]:
    """The record fields a prompt template reads: `{question}` and `{choices[0]}` read `question` and `choices`.

    Raises ValueError, saying what is wrong, for what str.format would refuse whatever the record holds.
    Attribute access (`{q.real}`) is refused too: record values are plain JSON, with nothing to read there.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e})") from None
    fields, padding = [], 0
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        field = re.match(r"[^.\[]*", name).group()
        if not field or field.isdigit():
            raise ValueError("name each field, as in {question}; {} and {0} have no field to fill them")
        if "." in re.sub(r"\[[^\]]*\]", "", name[len(field) :]):
            raise ValueError(
                f"{{{name}}}: attribute access is not supported; name a field, or index it: {{{field}[key]}}"
            )
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"{{{name}!{conversion}}}: unknown conversion '!{conversion}' (use !r, !s or !a)")
        if "{" in format_spec:
            raise ValueError(f"{{{name}:{format_spec}}}: a format spec cannot hold fields")
        padding += _format_size(format_spec)
        if padding > MAX_TEMPLATE_PADDING:  # checked before trying the spec out: {q:999999999} is a 1 GB string
            raise ValueError(
                f"{{{name}:{format_spec}}}: widths and precisions may add up to at most "
                f"{MAX_TEMPLATE_PADDING} characters in a template"
            )
        if format_spec and not _valid_format_spec(format_spec):
            raise ValueError(f"{{{name}:{format_spec}}}: not a valid format spec")
        fields.append(field)
    return list(dict.fromkeys(fields))


MAX_TEMPLATE_PADDING = 1000
"""The most the widths and precisions of a template's fields may add up to: each is text every prompt holds."""


def _format_size(format_spec: str) -> int:
    """The width and precision of a format spec, added up: `>8.3f` is 11. After an optional fill and
    align ([[fill]align]) every digit is part of one of them (or the 0 flag, which adds nothing)."""
    rest = (
        format_spec[2:]
        if format_spec[1:2] in tuple("<>=^")
        else format_spec[1:]
        if format_spec[:1] in tuple("<>=^")
        else format_spec
    )
    # Without int() on 5,000 digits (Python refuses that): more than 9 digits is too many anyway.
    return sum(int(digits) if len(digits) <= 9 else 10**9 for digits in re.findall(r"\d+", rest))


def _valid_format_spec(format_spec: str) -> bool:
    """Whether some value takes it: `{n:d}` fits a number (a string value fails later, naming its line)."""
    for sample in ("", 0, 0.0):
        try:
            format(sample, format_spec)
            return True
        except ValueError:
            pass
    return False
