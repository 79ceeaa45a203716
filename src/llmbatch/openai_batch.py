"""OpenAI Batch API files: requests in (`data.format: openai-batch`, or a .jsonl whose first line has a
custom_id and a body), results out (`output.format: openai-batch`).

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`; a file holds one url, as OpenAI's own batches do. What a line asks for that llmbatch
does not do (tools, n > 1, streaming, log probabilities, response formats, stop sequences, penalties, ...)
is refused, naming the key, before anything is queued: answering it another way would be a silent lie.
`body.model` is ignored (the spec's model answers every line); the output names the model that did.

A line's max_tokens, temperature, top_p and seed (`RequestSettings`) apply only where the spec's
`generation.allow_overrides` lists them (`refused_setting`); what a line leaves out is the spec's.

Leaf module: data.py turns requests into inputs, gather.py writes results through `output_line`, and the
spec detects a batch file with `is_batch_file`; it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbatch.text import SURROGATE

FORMAT = "openai-batch"
"""The value of data.format and output.format."""

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)

LINE_KEYS = ("custom_id", "method", "url", "body")
OVERRIDES = ("max_tokens", "temperature", "top_p", "seed")
"""What a line may set, where generation.allow_overrides lists it."""

MAX_TEMPERATURE = 2.0  # OpenAI's range: [0, 2]
MAX_SEED = 2**32 - 1  # the spec's seeds
MAX_TOKENS = 10**9

_DETECT_BYTES = 8 << 20
"""How much of the first line detection reads (data.MAX_RECORD_BYTES: a longer line is refused anyway)."""

_UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "n": "one completion per line: n must be 1",
    "best_of": "one completion per line: best_of must be 1",
    "stream": "streaming is not supported: results are written to a file",
    "stream_options": "streaming is not supported: results are written to a file",
    "logprobs": "log probabilities are not supported",
    "top_logprobs": "log probabilities are not supported",
    "echo": "echo is not supported",
    "response_format": "response formats (JSON mode, structured output) are not supported",
    "stop": "stop sequences are not supported (a completion ends at the model's end-of-sequence token)",
    "presence_penalty": "penalties are not supported",
    "frequency_penalty": "penalties are not supported",
    "logit_bias": "logit bias is not supported",
    "suffix": "suffixes are not supported",
}
"""Body keys of things llmbatch does not do; refused unless null or their neutral value (`_NEUTRAL`)."""

_NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "stream": False,
    "logprobs": False,
    "echo": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
"""Values of `_UNSUPPORTED` keys that ask for nothing: the default OpenAI would use."""

_IGNORED = ("model", "user", "metadata", "store")
"""Body keys that change no output: the spec's model answers; the rest is OpenAI's bookkeeping."""


class BatchLineError(ValueError):
    """What is wrong with one request line, without its location (the reader adds file:line)."""


@dataclass(frozen=True)
class RequestSettings:
    """A line's own generation settings; None: not given (the spec's applies)."""

    max_tokens: int | None = None
    temperature: float | None = None
    """0: greedy; above 0: sampling at that temperature."""
    top_p: float | None = None
    seed: int | None = None

    def given(self) -> list[str]:
        return [name for name in OVERRIDES if getattr(self, name) is not None]


@dataclass(frozen=True)
class Request:
    custom_id: str
    url: str
    prompt: str | None
    """A /v1/completions prompt, used as written; None for a chat."""
    messages: list[dict[str, str]] | None
    """A /v1/chat/completions chat, its contents as text; None for a prompt."""
    settings: RequestSettings


def is_batch_file(path: str | Path) -> bool:
    """Whether a .jsonl file's first line is an OpenAI batch request (it has a custom_id and a body).
    Anything unreadable is no batch file: the plain reader names what is wrong with it."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():  # never open a named pipe: it may never answer
        return False
    try:
        with path.open("rb") as f:
            while line := f.readline(_DETECT_BYTES):
                if line.strip():
                    first = json.loads(line)
                    return isinstance(first, dict) and "custom_id" in first and "body" in first
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        return False
    return False


def parse_request(line: dict[str, Any], url: str | None) -> Request:
    """One request line, checked; `url`: the file's (its first line's), None for the first line.
    Raises BatchLineError naming the key."""
    for key in LINE_KEYS:
        if key not in line:
            raise BatchLineError(f"no {key} (a request line holds {', '.join(LINE_KEYS)})")
    if unknown := sorted(set(line) - set(LINE_KEYS)):
        raise BatchLineError(f"unknown key {unknown[0]!r} (a request line holds {', '.join(LINE_KEYS)})")
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str):
        raise BatchLineError(f"custom_id must be a string, got {_kind(custom_id)}")
    if line["method"] != "POST":
        raise BatchLineError(f"method must be 'POST', got {_short(line['method'])}")
    if line["url"] not in URLS:
        raise BatchLineError(f"url {_short(line['url'])} is not supported (only {' and '.join(URLS)})")
    if url is not None and line["url"] != url:
        raise BatchLineError(f"url {line['url']!r} differs from the first line's {url!r}: a batch file holds one url")
    body = line["body"]
    if not isinstance(body, dict):
        raise BatchLineError(f"body must be an object, got {_kind(body)}")
    chat = line["url"] == CHAT_URL
    own = ("messages", "max_completion_tokens") if chat else ("prompt",)
    for key, value in body.items():
        if key in _UNSUPPORTED and value is not None and not _is_neutral(key, value):
            raise BatchLineError(f"body.{key}: {_UNSUPPORTED[key]}")
        if key not in _UNSUPPORTED and key not in (*own, *OVERRIDES, *_IGNORED):
            raise BatchLineError(f"body.{key}: not supported by llmbatch for {line['url']}")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BatchLineError(f"body.model must be a string, got {_kind(body['model'])}")
    messages = _messages(body) if chat else None
    prompt = None if chat else _prompt(body)
    return Request(custom_id, line["url"], prompt, messages, _settings(body))


def _is_neutral(key: str, value: Any) -> bool:
    neutral = _NEUTRAL.get(key)
    if neutral is None or isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return value == neutral


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise BatchLineError("no body.messages (a chat completion needs its messages)")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _kind(messages)
        raise BatchLineError(f"body.messages must be a non-empty list of {{role, content}} messages, got {got}")
    chat = []
    for number, message in enumerate(messages):
        where = f"body.messages[{number}]"
        if not isinstance(message, dict):
            raise BatchLineError(f"{where} must be an object with a role and a content, got {_kind(message)}")
        if unknown := sorted(set(message) - {"role", "content"}):
            reason = "tool calls are not supported" if "tool" in unknown[0] else "a message holds role and content"
            raise BatchLineError(f"{where}.{unknown[0]}: not supported ({reason})")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            hint = {"developer": " (write 'system')", "tool": " (tool calls are not supported)"}.get(role, "")
            got = _short(role) if "role" in message else "none"
            raise BatchLineError(f"{where}.role must be system, user or assistant, got {got}{hint}")
        chat.append({"role": role, "content": _content(where, message.get("content"))})
    return chat


def _content(where: str, content: Any) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, list) and content:
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                what = f"a {kind!r} part" if isinstance(kind, str) else _kind(part)
                raise BatchLineError(f"{where}.content[{number}] must be a text part {{type: text, text}}, got {what}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise BatchLineError(f"{where}.content must be text (or a list of text parts), got {_kind(content)}")
    _no_surrogate(f"{where}.content", content)
    return content


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise BatchLineError("no body.prompt (a completion needs its prompt)")
    if not isinstance(prompt, str):
        raise BatchLineError(f"body.prompt must be text (one prompt per line), got {_kind(prompt)}")
    _no_surrogate("body.prompt", prompt)
    return prompt


def _settings(body: dict) -> RequestSettings:
    max_tokens = body.get("max_tokens")
    if body.get("max_completion_tokens") is not None:
        if max_tokens is not None and max_tokens != body["max_completion_tokens"]:
            raise BatchLineError("body.max_tokens and body.max_completion_tokens differ: give one")
        max_tokens = body["max_completion_tokens"]
    return RequestSettings(
        max_tokens=_number("body.max_tokens", max_tokens, int, 1, MAX_TOKENS),
        temperature=_number("body.temperature", body.get("temperature"), float, 0, MAX_TEMPERATURE),
        top_p=_number("body.top_p", body.get("top_p"), float, 0, 1, low_open=True),
        seed=_number("body.seed", body.get("seed"), int, 0, MAX_SEED),
    )


def _number(key: str, value: Any, kind: type, low: float, high: float, low_open: bool = False):
    if value is None:
        return None
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer and not (kind is float and isinstance(value, float)):
        what = "an integer" if kind is int else "a number"
        raise BatchLineError(f"{key} must be {what}, got {_kind(value)}")
    if not (value > low if low_open else value >= low) or not value <= high:  # NaN fails too
        raise BatchLineError(f"{key} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return kind(value)


def refused_setting(settings: RequestSettings, allowed: list[str], max_new_tokens: int) -> str | None:
    """Why the spec refuses a line's settings (generation.allow_overrides and its ceiling), or None."""
    for name in settings.given():
        if name not in allowed:
            return (
                f"body.{name}: the spec does not let a line set {name} (add it to generation.allow_overrides, "
                f"or drop it from the line)"
            )
    if settings.max_tokens is not None and settings.max_tokens > max_new_tokens:
        return (
            f"body.max_tokens: {settings.max_tokens} is more than generation.max_new_tokens "
            f"({max_new_tokens}), the most a line may ask for"
        )
    return None


def _no_surrogate(key: str, text: str) -> None:
    if found := SURROGATE.search(text):
        raise BatchLineError(
            f"{key} holds a lone surrogate ({found.group()!a}), half of a UTF-16 pair and no text "
            f"(a broken \\u escape?)"
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "text" if isinstance(value, str) else f"a {type(value).__name__}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


# --- results ---------------------------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "length": "length"}
"""A result's finish_reason in OpenAI's words."""


def stable_id(prefix: str, run_name: str, custom_id: str) -> str:
    """An id derived from the run and the custom_id: gathering again writes the same file."""
    digest = hashlib.blake2b(f"{prefix}\0{run_name}\0{custom_id}".encode(), digest_size=12).hexdigest()
    return f"{prefix}{digest}"


def model_name(path: str) -> str:
    """What the output calls the model: a hub id for a snapshot in the Hugging Face cache, else the
    folder's name (never a path of this machine)."""
    folder = Path(path)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return folder.name


def output_line(record: dict[str, Any], run_name: str, model: str, created: int) -> dict[str, Any]:
    """A result record (runners/infer.py) as an OpenAI batch output line, keyed by its custom_id."""
    custom_id = record["id"]
    finish_reason = FINISH_REASONS.get(record["finish_reason"], record["finish_reason"])
    if "messages" in record:
        kind, choice = (
            ("chatcmpl-", "chat.completion"),
            {"index": 0, "message": {"role": "assistant", "content": record["output"]}},
        )
    else:
        kind, choice = ("cmpl-", "text_completion"), {"index": 0, "text": record["output"]}
    body = {
        "id": stable_id(kind[0], run_name, custom_id),
        "object": kind[1],
        "created": created,
        "model": model,
        "choices": [choice | {"finish_reason": finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": record["prompt_tokens"],
            "completion_tokens": record["output_tokens"],
            "total_tokens": record["prompt_tokens"] + record["output_tokens"],
        },
    }
    return {
        "id": stable_id("batch_req_", run_name, custom_id),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": stable_id("req_", run_name, custom_id), "body": body},
        "error": None,
    }
