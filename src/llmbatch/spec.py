"""Job specs: YAML in, typed dataclasses out, every mistake caught before anything runs.

A spec is parsed once, here. Everything downstream takes a `JobSpec`, never a raw dict.
Relative paths in a spec file resolve against the spec file's folder; paths given on the
command line (`--set`, `--output`) resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import string
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

KINDS = ("infer", "finetune")

EMBEDDED_MODEL = "embedded:tiny-llama"
"""The value of `model.path` that means the embedded default model (`llmbatch.embedded` builds it)."""


class SpecError(Exception):
    """A mistake in a spec, named by its key path (`generation.max_new_tokens`). `related`: the other keys
    of a rule between keys (signal_delay_s and time), so that an option setting either is blamed."""

    def __init__(self, key: str, message: str, source: str | None = None, related: tuple[str, ...] = ()):
        self.key, self.message, self.source, self.related = key, message, source, related
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


def _check(key: str, ok: bool, message: str, related: tuple[str, ...] = ()) -> None:
    if not ok:
        raise SpecError(key, message, related=related)


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


@dataclass(frozen=True)
class Range:
    """The values a number may take: above `low` (or from it, `low_closed`), and up to `high` (or below
    it, not `high_closed`). Declared on every numeric field with `ranged`; null always passes. Every range
    is finite: inf, nan and 1e30 are typos, and would only fail later, in a rank, as a traceback."""

    low: float
    high: float
    low_closed: bool = False
    high_closed: bool = True

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below  # nan is in no range: every comparison with it is false

    def __str__(self) -> str:
        return (
            f"in {'[' if self.low_closed else '('}{_number(self.low)}, {_number(self.high)}"
            f"{']' if self.high_closed else ')'}"
        )


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def positive(high: float) -> Range:
    return Range(0, high)


def non_negative(high: float) -> Range:
    return Range(0, high, low_closed=True)


MAX_COUNT = 10**9
"""Ceiling of steps, tokens and other counts: far above any real run, so a value past it is a typo."""
SEEDS = non_negative(2**32 - 1)  # numpy's seeds, which accelerate's set_seed sets too


def ranged(default: Any, allowed: Range) -> Any:
    """A numeric field's default and its range, checked by `check_ranges`."""
    return field(default=default, metadata={"range": allowed})


def check_ranges(section: Any, prefix: str) -> None:
    """Every field of a spec section that declares a range, checked; the error names its key path."""
    for f in dataclasses.fields(section):
        allowed, value = f.metadata.get("range"), getattr(section, f.name)
        if allowed is not None and value is not None:
            _check(f"{prefix}.{f.name}", value in allowed, f"must be {allowed}, got {value!r}")


def hidden_character(text: str) -> str | None:
    """The first character of `text` that must not be in an id or a spec value, or None: a control
    character (Unicode category Cc: newlines, escapes), a line or paragraph separator (Zl, Zp), or an
    invisible format character (Cf: a bidirectional override such as U+202E shows the text as other
    text than it is; zero-width marks)."""
    return next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")), None)


def invisible(ch: str) -> str | None:
    """An invisible format character said for an error line; None for any other character."""
    return f"an invisible format character (U+{ord(ch):04X})" if unicodedata.category(ch) == "Cf" else None


def _no_control_characters(key: str, text: str) -> None:
    """Refuse newlines and other control characters: in a Slurm field one would end the #SBATCH line and
    start a line of shell in the batch script (or make sbatch ignore every directive after it). And
    invisible format characters (`hidden_character`)."""
    if (bad := hidden_character(text)) is not None:
        raise SpecError(key, f"contains {invisible(bad) or f'a control character ({bad!r})'}: {text!r}")


# Options the spec sets itself: through sbatch_extra they would bypass its checks (or break the job).
SPEC_OWNED_SBATCH_OPTIONS = {
    "time": "resources.time",
    "nodes": "resources.nodes",
    "gpus-per-node": "resources.gpus_per_node",
    "gpus": "resources.gpus_per_node",
    "gres": "resources.gpus_per_node",
    "ntasks": "one task per node",
    "ntasks-per-node": "one task per node",
    "cpus-per-task": "resources.cpus_per_gpu",
    "mem": "resources.mem",
    "partition": "resources.partition",
    "account": "resources.account",
    "qos": "resources.qos",
    "constraint": "resources.constraint",
    "job-name": "name",
    "output": "the run folder",
    "error": "the run folder",
    "signal": "resources.signal_delay_s",
    "array": "resources.array",
    "requeue": "resources.max_requeues",
    "no-requeue": "resources.max_requeues",
    "wrap": "the job step",
}
_SBATCH_OPTION = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_SLURM_NAME = re.compile(r"^[^\s]+$")  # partition, account, qos, constraint: one word, no spaces

MAX_GPUS_PER_NODE = 64
MAX_NODES = 4096
MAX_ARRAY_TASKS = 100_000
"""Ceilings far above any real node or job: a value past them is a typo (--gpus 10000), not a cluster."""

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")


def slurm_time_seconds(value: str) -> int:
    """Seconds in a Slurm time string (already validated)."""
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = [int(p) for p in rest.split(":")]
    if days != "0" or "-" in value:
        parts += [0] * (3 - len(parts))  # D-H, D-H:M, D-H:M:S
        h, m, s = parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0  # plain minutes
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = parts
    return ((int(days) * 24 + h) * 60 + m) * 60 + s


@dataclass
class ModelSpec:
    path: str = EMBEDDED_MODEL
    """A local Hugging Face model folder, a hub id in the local Hugging Face cache, or `embedded:tiny-llama`."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bfloat16 on GPU, float32 on CPU."""
    adapter: str | None = None
    """A peft LoRA adapter folder, e.g. `<finetune run>/adapter`, or a hub id in the local cache."""

    def validate(self) -> None:
        if self.path != EMBEDDED_MODEL:
            _check("model.path", Path(self.path).is_dir(), f"no model folder at {self.path}")
            _check(
                "model.path",
                (Path(self.path) / "config.json").is_file(),
                f"{self.path} has no config.json (not a Hugging Face model folder)",
            )
        if self.adapter is not None:
            _check(
                "model.adapter",
                (Path(self.adapter) / "adapter_config.json").is_file(),
                f"no peft adapter (adapter_config.json) at {self.adapter}",
            )


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


def not_utf8(error: UnicodeDecodeError, offset: int = 0) -> str:
    """What a decode error found, for an error line: the byte and its offset in the file."""
    return (
        f"not UTF-8 text: byte 0x{error.object[error.start]:02x} at byte offset {offset + error.start} "
        f"(save the file as UTF-8)"
    )


def _not_a_file(path: str) -> str:
    """Why `path`, which is not a regular file, cannot be a data file (stat only: a FIFO is never opened)."""
    if Path(path).is_dir():
        return f"{path} is a folder, not a data file"
    if Path(path).exists():
        return f"{path} is not a regular file (a named pipe or a device?); data is read from a file"
    return f"no such file: {path}"


@dataclass
class DataSpec:
    path: str | None = None
    """JSONL, CSV or Parquet: the inputs to infer, or the training set to fine-tune on."""
    val_path: str | None = None
    """Fine-tuning only: the validation set."""
    id_field: str = "id"
    prompt_field: str | None = None
    """Use this field as the prompt as it is ..."""
    prompt_template: str | None = None
    """... or build the prompt with a Python format string over the record's fields ..."""
    messages_field: str | None = None
    """... or take a chat from this field: a list of {role, content} messages, through the chat template."""
    system_prompt: str | None = None
    """A system message opening each chat (one that has none) or templated prompt."""
    reference_field: str | None = None
    """The reference answer: scored after inference, the completion to learn when fine-tuning."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template (one user turn); chats always are."""
    max_samples: int | None = ranged(None, positive(10**12))

    @property
    def through_chat_template(self) -> bool:
        """Whether the model reads records through the tokenizer's chat template."""
        return self.chat_template or self.messages_field is not None

    def validate(self, kind: str) -> None:
        if self.path is None:
            what = "train data" if kind == "finetune" else "input data"
            raise SpecError("data.path", f"missing: a {kind} spec needs {what} (JSONL, CSV or Parquet)")
        for key, path in (("data.path", self.path), ("data.val_path", self.val_path)):
            if path is not None:
                _check(
                    key,
                    Path(path).suffix in (".jsonl", ".csv", ".parquet"),
                    f"must be a .jsonl, .csv or .parquet file: {path}",
                )
                _check(key, Path(path).is_file(), _not_a_file(path))
                _check(
                    key,
                    self.messages_field is None or Path(path).suffix != ".csv",
                    f"data.messages_field needs JSONL or Parquet (a CSV cell holds no list): {path}",
                    related=("data.messages_field",),
                )
        prompt_keys = [k for k in ("prompt_field", "prompt_template", "messages_field") if getattr(self, k) is not None]
        if len(prompt_keys) != 1:
            chosen = (
                f"only one of {', '.join(f'data.{k}' for k in prompt_keys)}"
                if prompt_keys
                else "one of data.prompt_field, data.prompt_template or data.messages_field"
            )
            raise SpecError("data", f"set {chosen}")
        if self.system_prompt is not None and self.messages_field is None:
            _check(
                "data.system_prompt",
                self.chat_template,
                "a system message needs the chat template: set data.chat_template: true",
                related=("data.chat_template", "data.messages_field"),
            )
        for key in ("prompt_template", "system_prompt"):
            _check(
                f"data.{key}",
                not SURROGATE.search(getattr(self, key) or ""),
                "holds a lone surrogate, half of a UTF-16 pair and no text (a broken \\u escape?)",
            )
        if self.prompt_template is not None:
            try:
                template_fields(self.prompt_template)
            except ValueError as e:
                raise SpecError("data.prompt_template", str(e)) from None
        if kind == "finetune":
            _check(
                "data.reference_field",
                self.reference_field is not None,
                "missing: fine-tuning learns the completion from this field",
            )
        if self.val_path is not None and kind != "finetune":
            raise SpecError("data.val_path", "only used by finetune specs")


@dataclass
class GenerationSpec:
    max_new_tokens: int = ranged(32, positive(MAX_COUNT))
    do_sample: bool = False
    """False: greedy. True: sampling, seeded per input id (so results don't depend on the rank count)."""
    temperature: float = ranged(1.0, positive(100))
    top_p: float = ranged(1.0, positive(1))
    top_k: int = ranged(0, non_negative(MAX_COUNT))
    seed: int = ranged(0, SEEDS)
    ignore_eos: bool = False
    """Always generate max_new_tokens (benchmarks)."""
    batch_tokens: int | None = ranged(None, positive(MAX_COUNT))
    """Token budget of one batch (prompt + new tokens, padded); for the engine, of all its cache
    slots together. Default: sized from free GPU memory."""
    engine: Literal["auto", "fast", "hf"] = "auto"
    """`fast`: the engine (runners/engine/); `hf`: transformers' generate; `auto`: the engine wherever
    the model and device allow it, else generate."""
    kv_cache_gb: float | None = ranged(None, positive(2**20))
    """Most memory the engine's KV cache may take (GiB). Default: what is free after the model and
    the headroom (GPU), 1 GiB (CPU)."""
    long_prompts: Literal["error", "truncate"] = "error"
    """A prompt that with max_new_tokens exceeds the model's context: refused before queueing (`error`),
    or cut to its last tokens, keeping its BOS (`truncate`; counted in metrics.json)."""


@dataclass
class LoraSpec:
    r: int = ranged(8, positive(2**16))
    alpha: int = ranged(16, positive(2**20))
    dropout: float = ranged(0.0, Range(0, 1, low_closed=True, high_closed=False))
    target_modules: str | list[str] = "all-linear"
    """`all-linear`: every linear layer but the output head."""
    modules_to_save: list[str] | None = None


@dataclass
class TrainSpec:
    epochs: int = ranged(1, positive(MAX_COUNT))
    max_steps: int | None = ranged(None, positive(MAX_COUNT))
    """Optimizer steps; overrides epochs."""
    learning_rate: float = ranged(2e-3, positive(100))
    weight_decay: float = ranged(0.0, non_negative(100))
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = ranged(10, non_negative(MAX_COUNT))
    micro_batch_size: int = ranged(8, positive(MAX_COUNT))
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = ranged(1, positive(MAX_COUNT))
    max_grad_norm: float | None = ranged(1.0, positive(MAX_COUNT))
    seq_len: int = ranged(256, positive(MAX_COUNT))
    packing: bool = True
    """Pack several examples into each sequence; attention never crosses examples."""
    loss_on: Literal["completion", "all"] = "completion"
    """`completion`: the loss covers only the reference's tokens (and EOS); `all`: the prompt's too."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    log_every_steps: int = ranged(10, positive(MAX_COUNT))
    """A progress line on stdout every N steps; train_metrics.jsonl gets every step."""
    eval_every_steps: int = ranged(50, positive(MAX_COUNT))
    eval_accuracy: bool = True
    """Also score val answers by greedy generation at each evaluation (needs data.reference_field)."""
    save_every_steps: int = ranged(100, positive(MAX_COUNT))
    save_every_minutes: float = ranged(30.0, positive(MAX_COUNT))
    keep_last: int = ranged(2, positive(MAX_COUNT))
    seed: int = ranged(0, SEEDS)
    merge: bool = False
    """Also write the adapter merged into the base weights (`merged/`)."""
    early_stopping_patience: int | None = ranged(None, positive(MAX_COUNT))
    """Stop after this many evaluations in a row without a better validation loss; null: never."""
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    """Also log the metrics of train_metrics.jsonl to a tracker (accelerate's), offline, in the run folder."""
    liger: Literal["auto", "off"] = "auto"
    """`auto`: Liger-Kernel's Triton kernels on CUDA when `liger_kernel` is installed and knows the
    architecture: the output head and the loss in its fused linear cross-entropy (the logits never exist
    in full), and its RMSNorm, SwiGLU and RoPE; `off`, on CPU or without the package: plain PyTorch."""

    def validate(self, data: DataSpec, container: ContainerSpec) -> None:
        _check(
            "train.early_stopping_patience",
            self.early_stopping_patience is None or data.val_path is not None,
            "needs data.val_path: early stopping compares validation losses",
            related=("data.val_path",),
        )
        # In a container the image must hold the package: it cannot be checked from here.
        package = TRACKER_PACKAGES.get(self.report_to)
        _check(
            "train.report_to",
            package is None or container.runtime != "none" or _importable(package),
            f"{self.report_to} needs the {package} package, which is not installed here "
            f"(pip install {package}, or llmbatch[{package}])",
        )


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""train.report_to -> the package its accelerate tracker imports."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: None in sys.modules, Python's way to block an import
        return False


@dataclass
class ResourcesSpec:
    nodes: int = ranged(1, positive(MAX_NODES))
    gpus_per_node: int = ranged(1, positive(MAX_GPUS_PER_NODE))
    """Also the number of processes per node (one rank per GPU; CPU processes without GPUs)."""
    cpus_per_gpu: int = ranged(4, positive(1024))
    mem: str | None = None
    """Memory per node in Slurm's format (64G); None: the partition's default."""
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    """More sbatch options, e.g. {exclusive: "", reservation: "lab"}."""
    max_requeues: int = ranged(3, non_negative(1000))
    signal_delay_s: int = ranged(120, positive(65535))  # sbatch --signal's most
    """Slurm signals the job this long before the time limit, so it can checkpoint and requeue."""
    array: int | None = ranged(None, Range(2, MAX_ARRAY_TASKS, low_closed=True))
    """Inference as a Slurm job array of this many one-node tasks, each on its own share of the inputs
    (null: one job)."""
    array_max_running: int | None = ranged(None, positive(MAX_ARRAY_TASKS))
    """At most this many array tasks run at once (sbatch --array=0-(N-1)%M; null: all of them)."""
    collective_timeout_s: int = ranged(600, positive(30 * 86400))
    """A collective that a peer never joins fails after this long, and a rank whose heartbeat stops
    (stopped, or frozen outside Python's reach) fails the job after it, instead of holding the
    allocation until the time limit."""

    def validate(self) -> None:
        for name in ("time", "mem", "partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                _no_control_characters(f"resources.{name}", getattr(self, name))
        _check(
            "resources.time",
            bool(_SLURM_TIME.match(self.time)),
            f"not a Slurm time (MM, HH:MM:SS, D-HH:MM): {self.time!r}",
        )
        seconds = slurm_time_seconds(self.time)
        _check("resources.time", seconds > 0, f"must be longer than 0: {self.time!r}")
        _check(
            "resources.signal_delay_s",
            self.signal_delay_s < seconds,
            f"the preemption warning ({self.signal_delay_s} s) must come before the time limit "
            f"({self.time!r} = {seconds} s)",
            related=("resources.time",),
        )
        if self.mem is not None:
            _check(
                "resources.mem",
                bool(_SLURM_MEM.match(self.mem)),
                f"not a Slurm memory size (e.g. 64G, 8000M): {self.mem!r}",
            )
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                _check(f"resources.{name}", bool(_SLURM_NAME.match(value)), f"must be one word: {value!r}")
        for option, value in self.sbatch_extra.items():
            key = f"resources.sbatch_extra.{option}"
            _no_control_characters(key, option)
            _no_control_characters(key, value)
            name = option.lstrip("-").replace("_", "-")
            _check(key, bool(_SBATCH_OPTION.match(name)), f"not an sbatch option name: {option!r}")
            _check(
                key,
                name not in SPEC_OWNED_SBATCH_OPTIONS,
                f"set by the spec, not through sbatch_extra: use {SPEC_OWNED_SBATCH_OPTIONS.get(name)}",
            )
            # sbatch takes any unambiguous prefix of an option for the option (`--tim` is `--time`).
            owned = [o for o in SPEC_OWNED_SBATCH_OPTIONS if o.startswith(name)]
            _check(
                key,
                not owned,
                f"{option!r} abbreviates {', '.join(f'--{o}' for o in owned)} (sbatch expands "
                f"prefixes of its options), which the spec sets: use "
                f"{SPEC_OWNED_SBATCH_OPTIONS[owned[0]] if owned else ''}",
            )
        if self.array is None:
            _check(
                "resources.array_max_running",
                self.array_max_running is None,
                "needs resources.array (the number of array tasks)",
                related=("resources.array",),
            )
        else:
            _check(
                "resources.nodes",
                self.nodes == 1,
                f"an array task runs on one node, got {self.nodes} with resources.array: {self.array} "
                f"(use more tasks, or more GPUs per task)",
                related=("resources.array",),
            )


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ContainerSpec:
    runtime: Literal["none", "apptainer", "docker", "podman"] = "none"
    image: str | None = None
    """Apptainer: a .sif file. Docker/Podman: an image name."""
    binds: list[str] = field(default_factory=list)
    """Extra HOST[:DEST[:ro]] mounts; the run, data, model and cache folders are bound already."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables set inside the container (not secrets: the spec is saved in the run folder)."""
    pass_env: list[str] = field(default_factory=list)
    """Names of variables forwarded from the job's environment (for secrets such as HF_TOKEN)."""
    python: str = "python3"
    """The interpreter inside the image, with llmbatch installed."""
    shm_size: str = "16g"
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.runtime != "none":
            _check(
                "container.image",
                self.image is not None,
                f"missing: runtime {self.runtime} needs an image",
                related=("container.runtime",),
            )
        if self.image is not None:
            _no_control_characters("container.image", self.image)
            _check(
                "container.image",
                not self.image.startswith("-"),
                f"must not start with '-' (the runtime would read it as an option): {self.image!r}",
            )
        for i, bind in enumerate(self.binds):
            _no_control_characters(f"container.binds[{i}]", bind)
            _check(f"container.binds[{i}]", bind.split(":")[0].startswith("/"), f"host path must be absolute: {bind!r}")
        for name in self.env:
            _check(f"container.env.{name}", bool(ENV_NAME.match(name)), f"not a variable name: {name!r}")
        for i, name in enumerate(self.pass_env):
            _check(f"container.pass_env[{i}]", bool(ENV_NAME.match(name)), f"not a variable name: {name!r}")


@dataclass
class OutputSpec:
    root: str = "runs"
    """Run folders are created here; on a cluster, shared storage every node sees."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """Inference: the merged results as results.jsonl or results.parquet (the same columns)."""


@dataclass
class JobSpec:
    kind: Literal["infer", "finetune"]
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    container: ContainerSpec = field(default_factory=ContainerSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def validate(self) -> None:
        _check(
            "name",
            bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name)),
            f"use letters, digits, '.', '_' and '-' only: {self.name!r}",
        )
        # lora and train mean nothing to an inference spec: their values are checked for fine-tuning only.
        for section in ("data", "generation", "resources") + (("lora", "train") if self.kind == "finetune" else ()):
            check_ranges(getattr(self, section), section)
        self.model.validate()
        self.data.validate(self.kind)
        self.resources.validate()
        self.container.validate()
        if self.kind == "finetune":
            _check(
                "resources.array",
                self.resources.array is None,
                "job arrays are for inference (data-parallel); fine-tuning runs as one job",
            )
            self.train.validate(self.data, self.container)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- parsing -------------------------------------------------------------------------------

# Keys whose string values are paths, and so resolve against the spec file's folder.
PATH_KEYS = {"model.path", "model.adapter", "data.path", "data.val_path", "output.root", "container.image"}


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
        if _is_path(path, value):
            value = _resolve_path(path, value, base_dir)
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
    if key not in PATH_KEYS or not isinstance(value, str) or value == EMBEDDED_MODEL:
        return False
    # A Docker/Podman image is a name (repo/name:tag); only an Apptainer image is a file.
    return key != "container.image" or value.endswith(".sif")


def _resolve_path(key: str, value: str, base_dir: Path) -> str:
    local = (base_dir / Path(value).expanduser()).resolve()
    if key in ("model.path", "model.adapter"):
        from llmbatch.models import resolve_reference  # models imports this module

        return str(resolve_reference(key, value, local))  # a local folder, or a hub id in the HF cache
    return str(local)


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
    """Read, override, type and validate a spec. Raises SpecError naming the key path, and where the
    wrong value came from: the spec file, or the option that set it (`origins` maps an override to the
    option's words, e.g. "--gpus 0"; default "--set KEY=VALUE"). Kind None: the one the file names."""
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
            _check("kind", kind in KINDS, f"must be {' or '.join(map(repr, KINDS))}, got {kind!r}")
        raw.setdefault("name", Path(source).stem if source else kind)
        if "kind" in raw and raw["kind"] != kind:
            raise SpecError("kind", f"this is a {raw['kind']!r} spec, but the command is {kind!r}")
        raw["kind"] = kind
        spec = _build(JobSpec, raw, "", base_dir)
        for assignment in overrides:
            try:
                key, value = parse_override(assignment)
                spec = apply_override(spec, key, value, cwd)
                _check(
                    "kind",
                    spec.kind == kind,
                    f"the command chose {kind!r}; run the {spec.kind} command for a {spec.kind} job",
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

    Paths already in `spec` are absolute, so rebuilding against `cwd` resolves only the new value.
    """
    raw = spec.to_dict()
    *sections, leaf = key.split(".")
    target = raw
    for part in sections:
        target = target[part]
    target[leaf] = value
    return _build(JobSpec, raw, "", cwd)


def load_resolved(path: Path) -> JobSpec:
    """Load the resolved spec a run folder holds, checked exactly as at submission (`load_spec`):
    anyone who can write the run folder can edit it, and `resume` builds the batch script from it.

    A SpecError naming the file and the key if it is damaged (edited, torn by a full disk), holds what
    submission refuses, or names a data or model path that is gone.
    """
    return load_spec(path, None)


def dump_spec(spec: JobSpec) -> str:
    return yaml.dump(spec.to_dict(), Dumper=_SpecDumper, sort_keys=False)
