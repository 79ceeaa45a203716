"""The spec's schema: one dataclass per section (ModelSpec ... JobSpec), the range each number may take,
and the checks of each section and between sections. Values reach here typed (`loading`); a check
raises SpecError naming the key path."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmbatch.openai_batch import FORMAT as OPENAI_BATCH
from llmbatch.openai_batch import is_batch_file
from llmbatch.spec.slurm_formats import (
    SBATCH_OPTION,
    SLURM_MEM,
    SLURM_NAME,
    SLURM_TIME,
    SPEC_OWNED_SBATCH_OPTIONS,
    slurm_time_seconds,
)
from llmbatch.spec.templates import template_fields
from llmbatch.text import SURROGATE, hidden_character, invisible

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


def _no_control_characters(key: str, text: str) -> None:
    """Refuse newlines and other control characters: in a Slurm field one would end the #SBATCH line and
    start a line of shell in the batch script (or make sbatch ignore every directive after it). And
    invisible format characters (`hidden_character`)."""
    if (bad := hidden_character(text)) is not None:
        raise SpecError(key, f"contains {invisible(bad) or f'a control character ({bad!r})'}: {text!r}")


MAX_GPUS_PER_NODE = 64
MAX_NODES = 4096
MAX_ARRAY_TASKS = 100_000
"""Ceilings far above any real node or job: a value past them is a typo (--gpus 10000), not a cluster."""


@dataclass
class ModelSpec:
    path: str = EMBEDDED_MODEL
    """A local Hugging Face model folder, a hub id in the local Hugging Face cache, or `embedded:tiny-llama`."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bfloat16 on GPU, float32 on CPU."""
    adapter: str | None = None
    """A peft LoRA adapter folder, e.g. `<finetune run>/adapter`, or a hub id in the local cache."""
    quantization: Literal["none", "nf4"] = "none"
    """Fine-tuning: `nf4` loads the frozen base weights in 4 bits through bitsandbytes (QLoRA; CUDA only,
    the `quantization` extra); `none`: model.dtype."""

    def check_folders(self) -> None:
        """The folders are there: run on the references resolved (`llmbatch.models.resolve_models`, or
        `load_resolved`), not on the spec as written, where a hub id names no folder yet."""
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


DATA_SUFFIXES = (".jsonl", ".csv", ".parquet")
DATASET_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
"""A Hugging Face dataset id: `name` or `owner/name`."""


def is_dataset_id(value: str) -> bool:
    """Whether a data.path value as written may be a Hugging Face dataset id (no data file's suffix)."""
    return bool(DATASET_ID.fullmatch(value)) and Path(value).suffix not in DATA_SUFFIXES and ".." not in value


def is_dataset_folder(path: str | Path) -> bool:
    """A folder `datasets` wrote: save_to_disk's (dataset_dict.json for a DatasetDict, dataset_info.json
    and state.json for a Dataset), or a dataset's folder in the datasets cache (dataset_info.json)."""
    return Path(path).is_dir() and any(
        (Path(path) / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")
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
    """JSONL, CSV or Parquet, or a Hugging Face dataset (a save_to_disk folder, an id in the local
    cache): the inputs to infer, or the training set to fine-tune on."""
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
    chat_template: bool | None = None
    """Wrap the prompt in the tokenizer's chat template (one user turn); chats always are. Unset (null),
    plain prompts to a model that has a template get a warning (`llmbatch.prompts.plain_prompt_warning`);
    false says they are plain on purpose."""
    split: str | None = None
    """A Hugging Face dataset's split to read (data.path); default: its only one."""
    val_split: str | None = None
    """The same for data.val_path."""
    max_inputs: int | None = ranged(None, positive(10**12))
    """Use only the first N inputs (and read the file only that far). Formerly `max_samples`."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A bad record (line, row): refuse the spec (`error`), or leave it out and list it in the run
    folder's rejected.jsonl (`skip`); a file with no good record is refused either way."""
    format: Literal["auto", "openai-batch"] = "auto"
    """`auto`: by the file's suffix, and a .jsonl whose first line has a custom_id and a body is an OpenAI
    batch file unless a prompt key is set; `openai-batch`: an OpenAI batch file (llmbatch.openai_batch)."""

    @property
    def through_chat_template(self) -> bool:
        """Whether the model reads records through the tokenizer's chat template (an OpenAI batch file's
        chat lines always do: `llmbatch.data.chat`)."""
        return bool(self.chat_template) or self.messages_field is not None

    def is_openai_batch(self) -> bool:
        """Whether data.path is an OpenAI batch file: said so, or detected (`openai_batch.is_batch_file`)
        where the spec does not say how to read prompts (a plain file may have fields named so)."""
        if self.format == OPENAI_BATCH:
            return True
        prompt_keys = (self.prompt_field, self.prompt_template, self.messages_field)
        return all(key is None for key in prompt_keys) and self.path is not None and is_batch_file(self.path)

    def validate(self, kind: str) -> None:
        if self.path is None:
            what = "train data" if kind == "finetune" else "input data"
            raise SpecError(
                "data.path", f"missing: a {kind} spec needs {what} (JSONL, CSV, Parquet or a Hugging Face dataset)"
            )
        for key, path, split in (
            ("data.path", self.path, "split"),
            ("data.val_path", self.val_path, "val_split"),
        ):
            # An id stays as written until it is found in the datasets cache (data.resolve_datasets).
            dataset = path is not None and (is_dataset_folder(path) or not Path(path).is_absolute())
            _check(
                f"data.{split}",
                getattr(self, split) is None or dataset,
                f"only for a Hugging Face dataset; {key} is {'not set' if path is None else f'a file: {path}'}",
                related=(key,),
            )
            if path is None or dataset:
                continue
            _check(
                key,
                Path(path).suffix in DATA_SUFFIXES,
                f"must be a .jsonl, .csv or .parquet file, a Hugging Face dataset folder (save_to_disk) or "
                f"a dataset id in the local cache: {path}",
            )
            _check(key, Path(path).is_file(), _not_a_file(path))
            _check(
                key,
                self.messages_field is None or Path(path).suffix != ".csv",
                f"data.messages_field needs JSONL or Parquet (a CSV cell holds no list): {path}",
                related=("data.messages_field",),
            )
        if self.is_openai_batch():
            self._validate_openai_batch(kind)
            return
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
                bool(self.chat_template),
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

    def _validate_openai_batch(self, kind: str) -> None:
        """The lines hold the ids, prompts or chats and settings: keys that would say otherwise are refused."""
        which = "data.format: openai-batch" if self.format == OPENAI_BATCH else f"{self.path} (an OpenAI batch file)"
        _check("data.format", kind == "infer", f"{which} holds requests to answer, not training data")
        _check("data.path", Path(self.path).is_file(), _not_a_file(self.path))
        _check("data.path", Path(self.path).suffix == ".jsonl", f"an OpenAI batch file is JSONL (.jsonl): {self.path}")
        _check("data.val_path", self.val_path is None, "only used by finetune specs")
        _check(
            "data.on_bad_record",
            self.on_bad_record == "error",
            f"not used with {which}: a line llmbatch cannot answer is refused, never skipped",
            related=("data.format",),
        )
        for key in ("prompt_field", "prompt_template", "messages_field", "reference_field", "system_prompt"):
            _check(
                f"data.{key}",
                getattr(self, key) is None,
                f"not used with {which}: its lines hold the prompts or chats (drop the key)",
                related=("data.format",),
            )
        _check(
            "data.id_field",
            self.id_field == "id",
            f"not used with {which}: a line's custom_id is its id (drop the key)",
            related=("data.format",),
        )
        _check(
            "data.chat_template",
            not self.chat_template,
            f"not used with {which}: chat lines go through the chat template, completion prompts are used as "
            f"written (drop the key)",
            related=("data.format",),
        )


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
    """`fast`: the engine (engine/); `hf`: transformers' generate; `auto`: the engine wherever
    the model and device allow it, else generate."""
    kv_cache_gb: float | None = ranged(None, positive(2**20))
    """Most memory the engine's KV cache may take (GiB). Default: what is free after the model and
    the headroom (GPU), 1 GiB (CPU)."""
    long_prompts: Literal["error", "truncate"] = "error"
    """A prompt that with max_new_tokens exceeds the model's context: refused before queueing (`error`),
    or cut to its last tokens, keeping its BOS (`truncate`; counted in metrics.json)."""
    allow_overrides: list[Literal["max_tokens", "temperature", "top_p", "seed"]] = field(default_factory=list)
    """What a line of an OpenAI batch file may set for itself (llmbatch.openai_batch); max_tokens at most
    max_new_tokens. A line setting anything else is refused."""

    def validate(self, data: DataSpec) -> None:
        for i, name in enumerate(self.allow_overrides):
            _check(f"generation.allow_overrides[{i}]", name not in self.allow_overrides[:i], f"{name!r} twice")
        _check(
            "generation.allow_overrides",
            not self.allow_overrides or data.is_openai_batch(),
            "only the lines of an OpenAI batch file carry their own settings (data.format: openai-batch)",
            related=("data.format", "data.path"),
        )


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
    """Pack several inputs into each sequence; attention never crosses inputs."""
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
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every rank holds the whole model; `fsdp`: FSDP2 (accelerate's) shards the frozen base weights,
    the LoRA weights and their optimizer state over the ranks, gathering a block's weights as it runs."""
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


def check_quantization(model: ModelSpec, container: ContainerSpec) -> None:
    """nf4 needs bitsandbytes where the ranks run: checked here unless a container's image holds it."""
    _check(
        "model.quantization",
        model.quantization == "none" or container.runtime != "none" or _importable("bitsandbytes"),
        f"{model.quantization} needs the bitsandbytes package, which is not installed here "
        f"(pip install llmbatch[quantization])",
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
    """Inference as a Slurm job array of this many one-node array tasks, each on its own share of the inputs
    (null: one job)."""
    array_max_running: int | None = ranged(None, positive(MAX_ARRAY_TASKS))
    """At most this many array tasks run at once (sbatch --array=0-(N-1)%M; null: all of them)."""
    gpu_memory_gb: float | None = ranged(None, positive(2**20))
    """Memory of each GPU (GiB): a spec whose estimated memory per rank exceeds it is refused before
    queueing (llmbatch.sizing), naming a layout that fits; null: not checked."""
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
            bool(SLURM_TIME.match(self.time)),
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
                bool(SLURM_MEM.match(self.mem)),
                f"not a Slurm memory size (e.g. 64G, 8000M): {self.mem!r}",
            )
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                _check(f"resources.{name}", bool(SLURM_NAME.match(value)), f"must be one word: {value!r}")
        for option, value in self.sbatch_extra.items():
            key = f"resources.sbatch_extra.{option}"
            _no_control_characters(key, option)
            _no_control_characters(key, value)
            name = option.lstrip("-").replace("_", "-")
            _check(key, bool(SBATCH_OPTION.match(name)), f"not an sbatch option name: {option!r}")
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
    scoring: Literal["exact", "normalized", "contains"] = "exact"
    """How an output is scored against its data.reference_field (`llmbatch.scoring`): equal once stripped
    (`exact`), equal once case, punctuation and spacing are normalized (`normalized`), or the normalized
    reference's words among the normalized output's (`contains`). Fine-tuning's validation accuracy too."""
    include_rendered_prompt: bool = False
    """Inference: each result also holds `rendered_prompt`, the text the model read (through the chat
    template, if any)."""
    root: str = "runs"
    """Run folders are created here; on a cluster, shared storage every node sees."""
    format: Literal["jsonl", "parquet", "openai-batch"] = "jsonl"
    """Inference: the gathered results as results.jsonl or results.parquet (the same columns), or as an
    OpenAI batch output file, results.openai-batch.jsonl (a response per custom_id)."""


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
        """Every check of the spec as written; the model's folders are checked once resolved
        (`ModelSpec.check_folders`)."""
        _check(
            "name",
            bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name)),
            f"use letters, digits, '.', '_' and '-' only: {self.name!r}",
        )
        # lora and train mean nothing to an inference spec: their values are checked for fine-tuning only.
        for section in ("data", "generation", "resources") + (("lora", "train") if self.kind == "finetune" else ()):
            check_ranges(getattr(self, section), section)
        self.data.validate(self.kind)
        if self.kind == "infer":
            self.generation.validate(self.data)
        self.resources.validate()
        self.container.validate()
        _check(
            "model.quantization",
            self.kind == "finetune" or self.model.quantization == "none",
            f"{self.model.quantization} is for fine-tuning (QLoRA); inference loads the weights in model.dtype "
            f"(a QLoRA run's adapter loads on the unquantized base): drop it",
        )
        if self.kind == "finetune":
            _check(
                "resources.array",
                self.resources.array is None,
                "job arrays are for inference (data-parallel); fine-tuning runs as one job",
            )
            self.train.validate(self.data, self.container)
            check_quantization(self.model, self.container)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
