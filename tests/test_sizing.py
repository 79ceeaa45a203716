"""Memory per rank before queueing (llmbatch.sizing): estimates from config.json alone, on folders that
hold nothing else (a 70B model's shape, no weights), and the one-line refusal naming a layout that fits."""

from __future__ import annotations

import json
import re

import pytest

from llmbatch.sizing import GIB, Layout, check_memory, rank_bytes, shape_of
from llmbatch.spec import SpecError, load_spec

from helpers import JOBS, run_cli

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
LLAMA_8B = LLAMA_70B | {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
}


@pytest.fixture
def config_only(tmp_path):
    """A model folder holding only a config.json of the given shape."""

    def make(config: dict):
        folder = tmp_path / f"model-{config['hidden_size']}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def spec_for(kind: str, folder, *sets: str):
    return load_spec(JOBS / f"{kind}.yaml", kind, [f"model.path={folder}", *sets])


def refusal(spec) -> str:
    with pytest.raises(SpecError) as e:
        check_memory(spec)
    assert e.value.key == "resources.gpu_memory_gb"
    return e.value.message


def test_a_70b_shape_counts_70b_parameters_and_its_kv_cache_per_token():
    shape = shape_of(LLAMA_70B)
    params = shape.block_params() * shape.layers + shape.embedding_params()
    assert 70.0e9 < params < 71.0e9
    # 2 (key, value) x 80 layers x 8 KV heads x 128 dims x 2 bytes (bf16)
    assert shape.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2


def test_70b_inference_on_80_gb_names_a_tensor_parallel_degree(config_only):
    folder = config_only(LLAMA_70B)
    message = refusal(spec_for("infer", folder, "resources.gpu_memory_gb=80"))
    assert re.fullmatch(
        rf"{folder} needs about 13\d\.\d GiB per GPU \(weights 131\.\d, KV cache 5\.0, overhead 2\.0\) with every rank "
        r"holding the whole model, more than the 80 GiB given: it fits with the model split over 2 GPUs of a node "
        r"\(tensor parallel\) \(about \d+\.\d GiB each\)",
        message,
    ), message
    check_memory(spec_for("infer", folder, "resources.gpu_memory_gb=141"))  # an H200 holds it
    check_memory(spec_for("infer", folder))  # no GPU size given: nothing to check


def test_70b_lora_names_qlora_on_one_gpu_and_fsdp_on_eight(config_only):
    folder = config_only(LLAMA_70B)
    small = ["train.micro_batch_size=1", "train.seq_len=1024", "resources.gpu_memory_gb=80"]
    one = refusal(spec_for("finetune", folder, *small))
    assert (
        "with every rank holding the whole model, more than the 80 GiB given: it fits with model.quantization: nf4"
        in one
    )
    eight = refusal(spec_for("finetune", folder, *small, "resources.gpus_per_node=8"))
    assert eight.endswith(
        re.search(r"it fits with train.sharding: fsdp over 8 GPUs \(about \d+\.\d GiB each\)", eight)[0]
    )
    check_memory(spec_for("finetune", folder, *small, "resources.gpus_per_node=8", "train.sharding=fsdp"))
    # Base weights divide by the ranks under FSDP; the LoRA state does too.
    spec = spec_for("finetune", folder, *small)
    shape = shape_of(LLAMA_70B)
    ddp, fsdp = rank_bytes(spec, shape, Layout()), rank_bytes(spec, shape, Layout("fsdp", 8))
    assert fsdp["LoRA and AdamW"] == pytest.approx(ddp["LoRA and AdamW"] / 8)
    assert fsdp["weights"] < ddp["weights"] / 8 + 4 * GIB
    nf4 = rank_bytes(spec, shape, Layout(quantization="nf4"))
    assert 0.25 < nf4["weights"] / ddp["weights"] < 0.3  # 4 bits for the blocks, bf16 embeddings and head


def test_a_spec_that_fits_nowhere_says_so(config_only):
    folder = config_only(LLAMA_70B)
    message = refusal(spec_for("finetune", folder, "train.seq_len=32768", "resources.gpu_memory_gb=24"))
    assert message.endswith("no layout llmbatch knows fits it (a smaller model, train.seq_len or micro_batch_size?)")


def test_an_8b_model_fits_an_80_gb_gpu(config_only):
    folder = config_only(LLAMA_8B)
    check_memory(spec_for("infer", folder, "resources.gpu_memory_gb=80"))
    check_memory(spec_for("finetune", folder, "resources.gpu_memory_gb=80"))


def test_the_command_refuses_before_queueing_in_one_line(config_only, good, tmp_path, capsys):
    """Through the CLI, on a folder with no weights at all: the memory check reads config.json only, and
    comes first."""
    folder = config_only(LLAMA_70B)
    spec = good | {"model": {"path": str(folder)}}
    code, err = run_cli(tmp_path, spec, "--gpus", "4", "--set", "resources.gpu_memory_gb=40", capsys=capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("llmbatch: error: --set resources.gpu_memory_gb=40: resources.gpu_memory_gb: ")
    assert line.endswith(
        re.search(r"it fits with the model split over 4 GPUs of a node \(tensor parallel\).*", line)[0]
    )
    assert not (tmp_path / "runs").exists()
    code, err = run_cli(tmp_path, spec, "--set", "resources.gpu_memory_gb=0", capsys=capsys)
    assert code == 2 and err.strip().endswith("resources.gpu_memory_gb: must be in (0, 1048576], got 0.0")
