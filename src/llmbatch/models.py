"""Model references and cheap checks of a model's files, before anything is queued.

- `resolve_models`: `model.path` and `model.adapter` name a local folder, or a Hugging Face hub id
  (`Qwen/Qwen2.5-1.5B-Instruct`) already in the local cache (`HF_HOME`, `HF_HUB_CACHE`). Parsing keeps
  them as written; this step, after it, makes a hub id its snapshot folder in the resolved spec, so jobs
  never ask the hub (they also run with `HF_HUB_OFFLINE=1`, see `jobstep.launch_env`). Nothing is
  downloaded: a missing id is an error that says how to fetch it.
- `check_model`: reads only small JSON files and safetensors headers (never weights): the configs
  parse, the engine runs the model's family when the spec asks for it (`generation.engine: fast`), a
  chat template exists when the spec asks for one, an adapter fits the base model's layers, and
  prompts plus `generation.max_new_tokens` fit the model's context.
- `template_warning`: the one warning, not an error: a chat template the spec's plain prompts skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from llmbatch import embedded
from llmbatch.data import DataError, Input, location

# The engine's own list of families: a leaf module that imports nothing (no torch), so the check can
# run before anything is queued.
from llmbatch.engine.families import FAMILIES
from llmbatch.prompts import encode_texts, plain_prompt_warning, prompt_texts, templated
from llmbatch.spec import (
    EMBEDDED_MODEL,
    JobSpec,
    SpecError,
    blame,
    local_path,
    with_model_folders,
    written_in,
)

# The first of these in a model's (text) config is its context length.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# An adapter trained on a base whose config differs in one of these cannot fit model.path.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# What must be in a snapshot for the id to count as cached.
MARKER_FILES = {"model.path": "config.json", "model.adapter": "adapter_config.json"}
LORA_AXES = {"lora_A": (1, 1), "lora_B": (0, 0), "lora_embedding_A": (1, 0), "lora_embedding_B": (0, 1)}
SAFETENSORS_HEADER_LIMIT = 100 << 20  # the format's own limit; a larger length means a damaged file
# A model folder needs one of these to load a tokenizer, and one of the weight files (an index: with
# every shard it names).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Normalizers that never shorten a text's UTF-8 bytes by more than this factor: NFC composes at most
# three characters into one (Hangul jamo, 9 bytes into 3), lowercasing turns 3 bytes into 1 at most (the
# Kelvin sign into k). Others may drop text (Strip, BertNormalizer) or decompose it (NFD, NFKC).
NORMALIZER_SHRINK = {"NFC": 3, "Lowercase": 3, "Prepend": 1}
# Pre-tokenizers that only split (or, Metaspace, replace a space with a longer '▁'), never drop text.
KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts")


# --- references ----------------------------------------------------------------------------------


def resolve_models(
    spec: JobSpec,
    spec_file: str | Path | None,
    overrides: Sequence[str] = (),
    origins: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> JobSpec:
    """`spec` as `load_spec` parsed it from `spec_file` and `overrides`, its model references made
    folders and checked: a path against the folder it was written for, a hub id its snapshot in the
    local cache. A SpecError names the spec file, or the option that set the value (`blame`)."""

    def folder(key: str, value: str) -> Path:
        return resolve_reference(key, value, local_path(value, written_in(key, spec_file, overrides, cwd)))

    try:
        return with_model_folders(spec, folder)
    except SpecError as e:
        e.source = blame(e, overrides, origins) or (str(spec_file) if spec_file is not None else None)
        raise


def resolve_reference(key: str, value: str, local: Path) -> Path:
    """The folder a `model.path` or `model.adapter` value names: `local` (the value as a path) if it
    exists or the value is no hub id, else the id's snapshot in the Hugging Face cache."""
    if local.exists() or not _is_repo_id(value):
        return local
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(value, MARKER_FILES[key])
    if isinstance(found, str):
        return Path(found).parent
    raise SpecError(
        key,
        f"no folder at {local}, and {value!r} is not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} (HF_HOME, HF_HUB_CACHE); fetch it with: hf download {value}",
    )


def _is_repo_id(value: str) -> bool:
    if value.startswith(("/", ".", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def host_folder(model_folder: str) -> Path:
    """The folder a container must see for `model_folder` to load: a hub snapshot's files are links
    into the repository's `blobs/`, so for a snapshot that is the repository folder."""
    path = Path(model_folder)
    return path.parent.parent if path.parent.name == "snapshots" else path


# --- checks --------------------------------------------------------------------------------------


def check_model(spec: JobSpec, inputs: list[Input]) -> None:
    """Raise SpecError or DataError (one line) for what would make the job fail or run past the
    model's context. `inputs`: the inputs generation will see (infer: data.path)."""
    folder = model_folder(spec.model.path)
    if folder is None:
        return  # the embedded model before its first build: this project's own files
    config = read_json_object(folder / "config.json", "model.path")
    check_model_files(folder)
    if spec.kind == "infer" and spec.generation.engine == "fast" and config.get("model_type") not in FAMILIES:
        raise SpecError(
            "generation.engine",
            f"fast: the engine runs {', '.join(FAMILIES)} models, and "
            f"{spec.model.path} is {config.get('model_type')!r} "
            f"(use auto to fall back to generate)",
        )
    for name in ("generation_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            read_json_object(folder / name, "model.path")
    if templated(inputs, spec.data) and not has_chat_template(folder):
        key = "data.messages_field" if spec.data.messages_field else "data.chat_template"
        if spec.data.is_openai_batch():
            key = "data.path"  # its chat lines: /v1/chat/completions
        raise SpecError(
            key,
            f"the tokenizer in {folder} has no chat template (none in tokenizer_config.json, no chat_template.jinja)",
        )
    context = context_length(config)
    limit = prompt_token_limit(config, spec.generation.max_new_tokens)
    if limit is not None and limit < 1:
        raise SpecError(
            "generation.max_new_tokens",
            f"{spec.generation.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens",
        )
    if spec.model.adapter is not None:
        check_adapter(Path(spec.model.adapter), folder, config)
    if spec.kind == "infer" and spec.generation.long_prompts == "error" and limit is not None:
        check_prompt_lengths(spec, inputs, folder, limit, context)


def template_warning(spec: JobSpec) -> str | None:
    """`prompts.plain_prompt_warning` for the spec's model, from its files (the embedded model, built
    or not, has a template)."""
    folder = model_folder(spec.model.path)
    return plain_prompt_warning(spec.data, folder is None or has_chat_template(folder))


def model_folder(path: str) -> Path | None:
    if path != EMBEDDED_MODEL:
        return Path(path)
    folder = embedded.default_cache_dir() / embedded.NAME
    return folder if embedded.is_complete(folder) else None


def check_model_files(folder: Path) -> None:
    """A tokenizer and weights must be there: without them every rank fails after the job started."""
    missing = []
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"no tokenizer ({', '.join(TOKENIZER_FILES)})")
    for weights in WEIGHT_FILES:
        index = folder / f"{weights}.index.json"
        if index.is_file():
            weight_map = read_json_object(index, "model.path").get("weight_map")
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            if absent := [name for name in shards if not isinstance(name, str) or not (folder / name).is_file()]:
                missing.append(f"no {absent[0]} (named in {index.name})")
            break
        if (folder / weights).is_file():
            break
    else:
        missing.append(f"no weights ({', '.join(WEIGHT_FILES)}, or a sharded *.index.json)")
    if missing:
        raise SpecError("model.path", f"{folder} has a config.json but {' and '.join(missing)}")


def read_json_object(path: Path, key: str) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise SpecError(key, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SpecError(key, f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise SpecError(key, f"{path} must hold a JSON object")
    return value


def has_chat_template(folder: Path) -> bool:
    """Where transformers finds a template: chat_template.jinja/.json, or tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    return tokenizer_config.is_file() and bool(read_json_object(tokenizer_config, "model.path").get("chat_template"))


def text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal models nest it)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def context_length(config: dict) -> int | None:
    text = text_config(config)
    return next((text[k] for k in CONTEXT_KEYS if isinstance(text.get(k), int)), None)


def prompt_token_limit(config: dict, max_new_tokens: int) -> int | None:
    """Tokens a prompt may have so that it and max_new_tokens fit the context; None: unknown."""
    context = context_length(config)
    return None if context is None else context - max_new_tokens


def check_prompt_lengths(spec: JobSpec, inputs: list[Input], folder: Path, limit: int, context: int) -> None:
    """Render the prompts as the runner does, encode those that could be too long (batched, fast
    tokenizer), and name the first that is."""
    from transformers import AutoTokenizer  # seconds to import: only here
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its "longer than the maximum" warning would come before our one line
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # transformers raises many types for a broken tokenizer: one line for all
            raise SpecError("model.path", f"cannot load the tokenizer in {folder} ({str(e).splitlines()[0]})") from None
        extra, per_token = tokens_over_bytes(tokenizer), bytes_per_token(tokenizer)
        too_long = (
            f"with generation.max_new_tokens {spec.generation.max_new_tokens} it exceeds the model's context "
            f"of {context} (generation.long_prompts: truncate cuts it)"
        )
        chunk = 4096
        for start in range(0, len(inputs), chunk):
            batch = inputs[start : start + chunk]
            texts = prompt_texts(tokenizer, batch, spec.data)
            sizes = [len(text.encode()) for text in texts]
            # Encoding a text of megabytes takes seconds and gigabytes: one this long in bytes cannot fit.
            for i, size in enumerate(sizes):
                if per_token is not None and size > limit * per_token:
                    raise DataError(
                        f"{location(spec.data.path, batch[i].line, spec.data.split)}: the prompt is {size} bytes, more "
                        f"than {limit} tokens hold (a token of this tokenizer stands for at most "
                        f"{per_token} bytes); {too_long}"
                    )
            # Encoding a million prompts takes minutes; a text this short in bytes cannot be too long.
            maybe = [i for i, size in enumerate(sizes) if extra is None or size + extra > limit]
            for i, ids in zip(maybe, encode_texts(tokenizer, [texts[i] for i in maybe], templated(batch, spec.data))):
                if len(ids) > limit:
                    raise DataError(
                        f"{location(spec.data.path, batch[i].line, spec.data.split)}: the prompt is {len(ids)} "
                        f"tokens; {too_long}"
                    )
    finally:
        logging.set_verbosity(verbosity)


def tokens_over_bytes(tokenizer) -> int | None:
    """At most how many more tokens than UTF-8 bytes a text encodes to; None where that is not known.

    A byte-level BPE token covers at least one byte, a BPE, Unigram or WordPiece token at least one
    character, a byte-fallback token one byte of one: so a text has at most as many tokens as bytes,
    plus the special tokens encoding adds and a prefix ('▁') the tokenizer may put in front. Unless its
    normalizer decomposes characters (NFD, NFKD, NFKC: one character may become several), or it is a
    slow (Python) tokenizer, which is not inspected.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or any(form in repr(backend.normalizer) for form in ("NFD", "NFKD", "NFKC")):
        return None
    return tokenizer.num_special_tokens_to_add() + 1


def bytes_per_token(tokenizer) -> int | None:
    """At most how many UTF-8 bytes of text one token stands for; None where that is not known.

    Known for a fast BPE tokenizer that encodes any byte (byte-level, or with byte fallback: nothing is
    unknown, so no run of characters fuses into one unknown token), whose pre-tokenizer drops nothing
    and whose normalizer shortens text by a bounded factor (NORMALIZER_SHRINK). A vocabulary token then
    stands for at most its own length: in characters for byte-level (a character per byte), in UTF-8
    bytes otherwise ('▁' stands for a space, <0x41> for a byte); an added token for its text. So a
    text of more bytes than `limit` times this has more than `limit` tokens.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    model, added = state.get("model") or {}, state.get("added_tokens") or []
    vocab = model.get("vocab")
    pre = _steps(state.get("pre_tokenizer"), "pretokenizers")
    byte_level = any(step.get("type") == "ByteLevel" for step in pre) and set(
        pre_tokenizers.ByteLevel.alphabet()
    ) <= set(vocab or ())
    byte_fallback = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in (vocab or ()) for b in range(256))
    shrink = 1
    for step in _steps(state.get("normalizer"), "normalizers"):
        if step.get("type") == "Replace" and set(step.get("pattern") or ()) == {"String"}:
            factor = 1 if len(step.get("content", "").encode()) >= len(step["pattern"]["String"].encode()) else None
        else:
            factor = NORMALIZER_SHRINK.get(step.get("type"))
        if factor is None:
            return None
        shrink *= factor
    if (
        model.get("type") != "BPE"
        or not isinstance(vocab, dict)
        or not (byte_level or byte_fallback)
        or not all(step.get("type") in KEEPING_PRE_TOKENIZERS and step.get("behavior") != "Removed" for step in pre)
        or any(token.get("lstrip") or token.get("rstrip") for token in added)
    ):  # these take in spaces
        return None
    longest = max(len(token) if byte_level else len(token.encode()) for token in vocab)
    longest = max([longest, *(len(token["content"].encode()) for token in added)])
    return longest * shrink


def _steps(component: dict | None, key: str) -> list[dict]:
    """A tokenizer.json normalizer or pre-tokenizer as its steps, a Sequence flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [step for part in component.get(key) or () for step in _steps(part, key)]
    return [component]


def check_adapter(adapter: Path, model: Path, config: dict) -> None:
    """The adapter's base (when it is a folder here) and its LoRA shapes must fit model.path."""
    adapter_config = read_json_object(adapter / "adapter_config.json", "model.adapter")
    base = adapter_config.get("base_model_name_or_path")
    if (
        isinstance(base, str)
        and Path(base).is_absolute()
        and (Path(base) / "config.json").is_file()
        and Path(base).resolve() != model.resolve()
    ):
        mine, theirs = text_config(config), text_config(read_json_object(Path(base) / "config.json", "model.adapter"))
        for key in ARCH_KEYS:
            if mine.get(key) != theirs.get(key):
                raise SpecError(
                    "model.adapter",
                    f"{adapter} was trained on {base} ({key} {theirs.get(key)}), "
                    f"not on a model like {model} ({key} {mine.get(key)})",
                )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file() or "quantization_config" in config:
        return  # .bin files need torch to read, quantized weights are packed: the job will tell
    base_shapes = model_shapes(model)
    lora = {}  # adapter tensor -> (adapted module, part, shape)
    for name, shape in safetensors_shapes(weights, "model.adapter").items():
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
            r"(?:\.weight)?",
            name,
        )
        if match and len(shape) == 2:
            lora[name] = (*match.groups(), shape)
    if not any(f"{module}.weight" in base_shapes for module, _, _ in lora.values()):
        return  # no module name in common: the checkpoint names its tensors otherwise; the job will tell
    for name, (module, part, shape) in lora.items():
        base_shape = base_shapes.get(f"{module}.weight")
        if base_shape is None and re.search(r"\.\d+\.", module):
            raise SpecError(
                "model.adapter",
                f"{weights}: {name} adapts {module}, which {model} does not have (an adapter trained on another base?)",
            )
        if base_shape is None:
            continue  # not in a numbered layer: perhaps a tied output head, absent from the checkpoint
        # A linear layer's weight is (out, in), adapted as A: (r, in), B: (out, r); an embedding's is
        # (num, dim), adapted as A: (r, num), B: (dim, r). Here: (axis of the LoRA tensor, axis of the base).
        axis, base_axis = LORA_AXES[part]
        if len(base_shape) == 2 and shape[axis] != base_shape[base_axis]:
            raise SpecError(
                "model.adapter",
                f"{weights}: {name} has shape {shape}, which does not fit "
                f"{module} of {model} (shape {base_shape}): an adapter trained on "
                f"another base?",
            )


def model_shapes(model: Path) -> dict[str, list[int]]:
    """Tensor shapes of a model's safetensors weights, one file or shards; {} if it has none."""
    index = model / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "model.path").get("weight_map", {})
        files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    else:
        files = ["model.safetensors"] if (model / "model.safetensors").is_file() else []
    shapes = {}
    for name in files:
        shapes |= safetensors_shapes(model / name, "model.path")
    return shapes


def safetensors_shapes(path: Path, key: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header: 8 bytes of header length, then JSON."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= SAFETENSORS_HEADER_LIMIT:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        shapes = {name: info["shape"] for name, info in header.items() if name != "__metadata__"}
        if not all(isinstance(s, list) for s in shapes.values()):
            raise ValueError("shapes must be lists")
    except OSError as e:
        raise SpecError(key, f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SpecError(key, f"{path} is not a safetensors file (its header does not parse: {e})") from None
    return shapes
