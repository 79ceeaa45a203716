"""Text helpers for error lines and for refusing text that would not show as what it is: control and
invisible characters, lone surrogates, bytes that are not UTF-8. Spec values, ids and data files all pass
through them; they know nothing of specs."""

from __future__ import annotations

import re
import unicodedata

SURROGATE = re.compile(r"[\ud800-\udfff]")
"""A lone surrogate: JSON's "\\ud800" escape decodes to one, and it cannot be encoded as UTF-8."""


def printable(text: str) -> str:
    """`text` kept on one line for an error message: control characters, line separators, bidirectional
    overrides and lone surrogates (user text can hold any of them) escaped as Python writes them (\\n,
    \\u202e), so they can neither split the line nor reorder it on a terminal."""
    return "".join(
        repr(ch)[1:-1] if unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") else ch
        for ch in text
    )


def hidden_character(text: str) -> str | None:
    """The first character of `text` that must not be in an id or a spec value, or None: a control
    character (Unicode category Cc: newlines, escapes), a line or paragraph separator (Zl, Zp), or an
    invisible format character (Cf: a bidirectional override such as U+202E shows the text as other
    text than it is; zero-width marks)."""
    return next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")), None)


def invisible(ch: str) -> str | None:
    """An invisible format character said for an error line; None for any other character."""
    return f"an invisible format character (U+{ord(ch):04X})" if unicodedata.category(ch) == "Cf" else None


def not_utf8(error: UnicodeDecodeError, offset: int = 0) -> str:
    """What a decode error found, for an error line: the byte and its offset in the file."""
    return (
        f"not UTF-8 text: byte 0x{error.object[error.start]:02x} at byte offset {offset + error.start} "
        f"(save the file as UTF-8)"
    )
