"""The embedded default model (llmbatch.embedded) and the sample task's data (llmbatch.sampledata)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmbatch import embedded, sampledata

from helpers import JOBS, REPO

PARITY = JOBS / "data" / "parity"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="module")
def model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


# --- the model folder ---------------------------------------------------------------------------


def test_build_is_deterministic_and_repairs_a_damaged_folder(model_dir, tmp_path):
    other = embedded.ensure_embedded_model(tmp_path)
    assert other == tmp_path / embedded.NAME
    for name in MODEL_FILES:
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == [embedded.NAME]  # no temporary folder left

    (other / "tokenizer.json").unlink()
    assert embedded.ensure_embedded_model(tmp_path) == other
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [embedded.NAME]


def test_a_complete_folder_is_reused(model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert embedded.ensure_embedded_model(model_dir.parent) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_loads_like_a_user_model(model_dir, model, tokenizer):
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(set(ids)) == 3
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == ids
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_round_trips_any_text(tokenizer):
    for text in [
        "Is 4817 even or odd?\nAnswer: odd",
        "  spaces\tand\ttabs  ",
        "naïve café, 日本語, 😀",
        "def f(x):\n    return x ** 2  # {braces} <tags>",
        "",
    ]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Numbers are split into single digits.
    digits = tokenizer.convert_ids_to_tokens(tokenizer("x 1234567890", add_special_tokens=False)["input_ids"])
    assert digits[-10:] == list("1234567890")
    assert tokenizer.padding_side == "left"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Is 3 odd?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello<|eos|>\nUser: Is 3 odd?\nAssistant:"
    text = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert text == "System: Be brief.\nUser: Hi\n"
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1


def test_greedy_outputs_do_not_depend_on_batching(model, tokenizer):
    """The property the peaky init is for: batch composition and left padding change nothing."""
    import torch

    prompts = [
        "Is 7 even or odd?\nAnswer:",
        "Hello",
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Is 123456 even or odd?\nAnswer:",
        "User: hi\nAssistant:",
        "1 2 3 4 5 6 7 8 9",
    ]

    def generate(batch):
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    alone = [generate([p])[0] for p in prompts]
    assert generate(prompts) == alone
    assert generate(prompts[::-1]) == alone[::-1]
    assert len({tuple(o) for o in alone}) == len(prompts)  # outputs depend on the prompt


def test_import_is_light():
    """The command line imports this module: that must not pull in torch."""
    code = "import sys, llmbatch.embedded; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src")})


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBATCH_CACHE", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("LLMBATCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path / ".cache" / "llmbatch"


# --- sample data --------------------------------------------------------------------------------


def test_sampledata_matches_the_committed_files(tmp_path):
    assert sampledata.main([str(tmp_path)]) == 0
    for split in sampledata.SPLITS:
        name = f"{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (PARITY / name).read_bytes(), name


def test_sampledata_splits_are_disjoint_and_correct():
    numbers, ids = {}, set()
    for split, size in sampledata.SPLITS.items():
        records = [json.loads(line) for line in (PARITY / f"{split}.jsonl").read_text().splitlines()]
        assert len(records) == size
        numbers[split] = set()
        for r in records:
            assert set(r) == {"id", "question", "answer"}
            n = int(r["question"].removeprefix("Is ").removesuffix(" even or odd?"))
            assert r["answer"] == ("odd" if n % 2 else "even")
            numbers[split].add(n)
            ids.add(r["id"])
        assert len(numbers[split]) == size
        answers = [r["answer"] for r in records]
        assert 0.4 < answers.count("odd") / size < 0.6
    assert len(ids) == sum(sampledata.SPLITS.values())
    train, val, test = numbers["train"], numbers["val"], numbers["test"]
    assert not (train & val or train & test or val & test)
