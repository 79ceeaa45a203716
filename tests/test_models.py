"""Model references and model checks before queueing: hub ids from the local cache, damaged configs,
missing chat templates, adapters of another base, the model types the fast engine runs, prompts longer
than the context and their truncation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmbatch import embedded, models
from llmbatch.cli import main
from llmbatch.models import resolve_models, tokens_over_bytes
from llmbatch.spec import SpecError, load_resolved, load_spec

from helpers import infer, run_cli, run_folder, set_key, submit_cli, write_data

REPO_ID = "llmbatch/tiny-llama"


def save_in_hub_cache(model_dir: Path, hub_cache: Path, repo_id: str = REPO_ID) -> Path:
    """The model in the Hugging Face cache layout (as `hf download` leaves it); its snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in model_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))  # relative, as the hub writes them
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


# --- hub ids -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hub_id_resolves_from_the_local_cache_only(tmp_path, good, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = save_in_hub_cache(model_dir, tmp_path / "hf" / "hub")
    good["model"] = {"path": REPO_ID}
    out = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", "--executor", "local").stdout
    assert f"path: {snapshot}\n" in out

    proc = submit_cli(
        "infer", spec_file(tmp_path, good), "--dry-run", "--set", "model.path=llmbatch/other", check=False
    )
    assert (
        f"model.path: no folder at {Path.cwd() / 'llmbatch/other'}, and 'llmbatch/other' is not in the "
        f"Hugging Face cache {tmp_path / 'hf' / 'hub'} (HF_HOME, HF_HUB_CACHE); fetch it with: hf download "
        f"llmbatch/other"
    ) in one_error_line(proc)

    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    proc = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", check=False)
    assert f"is not in the Hugging Face cache {tmp_path / 'elsewhere'} " in one_error_line(proc)


@pytest.mark.slow
def test_a_job_runs_offline_from_the_snapshot(tmp_path, good, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = save_in_hub_cache(model_dir, tmp_path / "hf" / "hub")
    good["model"] = {"path": REPO_ID}
    good["resources"] = {"cpus_per_gpu": 1}
    run = run_folder(submit_cli("infer", spec_file(tmp_path, good), "--executor", "local"))
    assert yaml.safe_load(run.spec_file.read_text())["model"]["path"] == str(snapshot)
    assert len(run.results_file.read_text().splitlines()) == 3
    [command] = [json.loads(line) for line in run.path.joinpath("commands.jsonl").read_text().splitlines()]
    assert "HF_HUB_OFFLINE" in command["env"]


@pytest.mark.slow
def test_a_container_sees_the_blobs_a_snapshot_links_to(tmp_path, tmp_path_factory, good, model_dir, monkeypatch):
    hf_home = tmp_path_factory.mktemp("hf")  # not under the data's folder, which is bound as a whole
    monkeypatch.setenv("HF_HOME", str(hf_home))
    snapshot = save_in_hub_cache(model_dir, hf_home / "hub")
    good["model"] = {"path": REPO_ID}
    good["container"] = {"runtime": "docker", "image": "llmbatch:latest"}
    out = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", "--executor", "local").stdout
    command = shlex.split(out.split("# per-node command")[1].splitlines()[1])
    repo = snapshot.parent.parent
    assert f"{repo}:{repo}" in command and f"{snapshot}:{snapshot}" not in command


# --- model files ---------------------------------------------------------------------------------


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def test_a_corrupt_config_is_one_line(tmp_path, good, capsys, model_copy):
    good["model"] = {"path": str(model_copy)}
    (model_copy / "config.json").write_text('{"hidden_size": 256,')
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and f"model.path: {model_copy / 'config.json'} is not valid JSON (" in err
    (model_copy / "config.json").write_text("[1, 2]")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and f"model.path: {model_copy / 'config.json'} must hold a JSON object" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path, good, capsys, model_copy):
    good["model"] = {"path": str(model_copy)}
    good["data"]["chat_template"] = True
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0
    (model_copy / "chat_template.jinja").unlink()
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and f"data.chat_template: the tokenizer in {model_copy} has no chat template" in err


def test_plain_prompts_to_a_model_with_a_chat_template_get_a_warning(tmp_path, good, capsys, model_copy):
    """An instruct model answered 37 of 40 plain prompts with nothing, and nothing said why."""
    warning = "llmbatch: warning: data.chat_template: the model has a chat template, but the prompts reach it as plain"
    for model in ("embedded:tiny-llama", str(model_copy)):
        good["model"] = {"path": model}
        code, err = run_cli(tmp_path, good, capsys=capsys)
        assert code == 0 and err.startswith(warning) and err.count("\n") == 1, err
    for chosen in (True, False):  # said either way: no warning
        assert run_cli(tmp_path, set_key(good, "data.chat_template", chosen), capsys=capsys) == (0, "")
    del good["data"]["chat_template"]
    (model_copy / "chat_template.jinja").unlink()
    assert run_cli(tmp_path, good, capsys=capsys) == (0, "")


def test_a_model_folder_without_a_tokenizer_or_weights_is_refused_before_queueing(tmp_path, good, capsys, model_copy):
    """Such a folder was queued, then every rank failed with a traceback."""
    good["model"] = {"path": str(model_copy)}
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err == (
        f"llmbatch: error: model.path: {model_copy} has a config.json but no weights "
        f"(model.safetensors, pytorch_model.bin, or a sharded *.index.json)\n"
    )
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err == (
        f"llmbatch: error: model.path: {model_copy} has a config.json but no "
        f"model-00002-of-00002.safetensors (named in model.safetensors.index.json)\n"
    )
    (model_copy / "tokenizer.json").unlink()
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err == (
        f"llmbatch: error: model.path: {model_copy} has a config.json but no tokenizer "
        f"(tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model, "
        f"sentencepiece.bpe.model) and no model-00002-of-00002.safetensors (named in "
        f"model.safetensors.index.json)\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA adapter of the embedded model, and another, smaller base it does not fit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    tuned = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    tuned.save_pretrained(root / "adapter")
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
        )
    )
    other.save_pretrained(root / "other")
    shallow = LlamaForCausalLM(LlamaConfig(vocab_size=1024, **embedded.ARCH | {"num_hidden_layers": 2}))
    shallow.save_pretrained(root / "shallow")
    for base in ("other", "shallow"):  # a model folder has a tokenizer too
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_dir / name, root / base / name)
    return {"adapter": root / "adapter", "other": root / "other", "shallow": root / "shallow"}


@pytest.mark.slow
def test_an_adapter_of_another_base_is_refused(tmp_path, good, capsys, model_dir, adapters):
    adapter = Path(shutil.copytree(adapters["adapter"], tmp_path / "adapter"))
    good["model"] = {"path": str(model_dir), "adapter": str(adapter)}
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0

    good["model"]["path"] = str(adapters["other"])
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        f"model.adapter: {adapter} was trained on {model_dir} (hidden_size 256), not on a model like "
        f"{adapters['other']} (hidden_size 64)" in err
    )

    # Without a base folder to compare with, the tensor shapes still tell (read from the headers only).
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.search(
        r"model\.adapter: \S+adapter_model\.safetensors: base_model\.model\.model\.layers\.0\.\S+\.lora_A"
        r"\.weight has shape \[4, \d+\], which does not fit .* an adapter trained on another base\?",
        err,
    )

    good["model"]["path"] = str(adapters["shallow"])  # the same layers, but fewer of them
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.search(r"lora_A\.weight adapts model\.layers\.[23]\.\S+, which \S+shallow does not have", err)

    (adapter / "adapter_config.json").write_text("{")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and f"model.adapter: {adapter / 'adapter_config.json'} is not valid JSON" in err


@pytest.mark.slow
def test_an_adapter_with_a_damaged_header_is_refused(tmp_path, good, capsys, model_dir, adapters):
    adapter = Path(shutil.copytree(adapters["adapter"], tmp_path / "adapter"))
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    good["model"] = {"path": str(model_dir), "adapter": str(adapter)}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"model.adapter: {adapter / 'adapter_model.safetensors'} is not a safetensors file" in err


# --- context -------------------------------------------------------------------------------------


def test_max_new_tokens_must_leave_room_in_the_context(tmp_path, good, capsys, model_dir):
    good["model"] = {"path": str(model_dir)}
    code, err = run_cli(tmp_path, good, "--set", "generation.max_new_tokens=1000000000", capsys=capsys)
    assert (
        code == 2
        and "generation.max_new_tokens: 1000000000 leaves no room for a prompt in the model's context of 1024 tokens"
        in err
    )


def long_prompts(tmp_path) -> Path:
    rows = [
        {"id": i, "question": "Is 7 even or odd? " * (300 if i in (2, 4) else 1), "answer": "odd"} for i in range(6)
    ]
    return write_data(tmp_path / "in.jsonl", rows)


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_is_refused_by_default(tmp_path, good, capsys, model_dir):
    good["model"] = {"path": str(model_dir)}
    good["data"]["path"] = str(long_prompts(tmp_path))
    proc = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", check=False)  # no tokenizer warning
    assert (
        "in.jsonl:3: the prompt is 2401 tokens; with generation.max_new_tokens 32 it exceeds the model's "
        "context of 1024 (generation.long_prompts: truncate cuts it)" in one_error_line(proc)
    )
    assert run_cli(tmp_path, good, "--set", "generation.long_prompts=truncate", capsys=capsys)[0] == 0


def test_only_prompts_that_could_be_too_long_are_encoded(tmp_path, good, capsys, model_dir, monkeypatch):
    """Encoding a million prompts takes minutes: the check encodes only those long enough in bytes."""
    encoded = []
    encode_texts = models.encode_texts
    monkeypatch.setattr(
        models,
        "encode_texts",
        lambda tokenizer, texts, templated: encoded.extend(texts) or encode_texts(tokenizer, texts, templated),
    )
    good["model"] = {"path": str(model_dir)}
    good["data"]["path"] = str(long_prompts(tmp_path))
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "in.jsonl:3: the prompt is 2401 tokens" in err, err
    assert len(encoded) == 2 and all(len(text) > 1000 for text in encoded)


def test_a_text_has_no_more_tokens_than_bytes_unless_the_normalizer_decomposes(model_dir):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = tokens_over_bytes(tokenizer)
    texts = [
        "",
        "a",
        " ",
        "1234567890",
        "Is 7 even or odd?",
        "ﷺ ﬁ é",
        "日本語のテキスト",
        "🙂🙃" * 5,
        "\x00\n\t",
        "<s></s><s>",
        "x" * 3000,
    ]
    assert all(len(tokenizer(text)["input_ids"]) <= len(text.encode()) + extra for text in texts)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()  # U+FDFA becomes 18 characters
    assert tokens_over_bytes(tokenizer) is None
    assert len(tokenizer("ﷺ")["input_ids"]) > len("ﷺ".encode()) + extra


def test_a_prompt_too_long_in_bytes_is_refused_without_encoding_it(tmp_path, good, capsys, model_dir, monkeypatch):
    """A 10 MB prompt took 27 s and 2.2 GB to encode just to be refused."""
    encoded = []
    encode_texts = models.encode_texts
    monkeypatch.setattr(
        models,
        "encode_texts",
        lambda tokenizer, texts, templated: encoded.extend(texts) or encode_texts(tokenizer, texts, templated),
    )
    good["model"] = {"path": str(model_dir)}
    good["data"]["path"] = str(
        write_data(tmp_path / "in.jsonl", [{"id": 1, "question": "Is 7 even? " * 500_000, "answer": "odd"}])
    )
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        "in.jsonl:1: the prompt is 5500000 bytes, more than 992 tokens hold (a token of this tokenizer stands "
        "for at most 9 bytes); with generation.max_new_tokens 32 it exceeds the model's context of 1024"
    ) in err
    assert encoded == []


def test_a_text_has_no_fewer_tokens_than_bytes_over_the_longest_token(model_dir):
    from tokenizers import normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    from llmbatch.models import bytes_per_token

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_token = bytes_per_token(tokenizer)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    longest = max(vocab, key=len)  # byte-level: a character per byte
    texts = [
        longest * 50,
        "Is 7 even or odd? " * 40,
        "日本語のテキスト" * 30,
        "🙂" * 100,
        " " * 1000,
        "1" * 500,
        "<s></s>" * 100,
        "x" * 3000,
    ]
    assert all(len(tokenizer(text)["input_ids"]) * per_token >= len(text.encode()) for text in texts)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()  # may compose 9 bytes into 3
    assert bytes_per_token(tokenizer) == 3 * per_token
    for unsound in (normalizers.Strip(), normalizers.NFKC()):  # drops text; decomposes it
        tokenizer.backend_tokenizer.normalizer = unsound
        assert bytes_per_token(tokenizer) is None
    tokenizer.backend_tokenizer.normalizer = None
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # drops spaces
    assert bytes_per_token(tokenizer) is None


@pytest.mark.slow
def test_truncated_prompts_are_cut_and_counted(make_run, tmp_path):
    run = make_run(
        "infer",
        overrides=[
            f"data.path={long_prompts(tmp_path)}",
            "generation.long_prompts=truncate",
            "generation.max_new_tokens=8",
        ],
    )
    infer(run, 1)
    results = [json.loads(line) for line in run.results_file.read_text().splitlines()]
    assert [r["truncated"] for r in results] == [False, False, True, False, True, False]
    assert all(r["prompt_tokens"] == 1024 - 8 for r in results if r["truncated"])
    assert json.loads(run.metrics_file.read_text())["truncated_prompts"] == 2


def test_the_fast_engine_on_a_model_it_cannot_run_is_a_spec_error(tmp_path, good, capsys):
    model = tmp_path / "gpt2-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for name in ("tokenizer.json", "model.safetensors"):  # there, though never read by a dry run
        (model / name).write_text("")
    set_key(good, "model.path", str(model))
    code, err = run_cli(tmp_path, set_key(good, "generation.engine", "fast"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        "generation.engine: fast: the engine runs llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, "
        f"qwen3_moe models, and {model} is 'gpt2'" in err
    )
    code, _ = run_cli(tmp_path, set_key(good, "generation.engine", "auto"), capsys=capsys)
    assert code == 0  # auto falls back to generate


# Model references (`model.path`, `model.adapter`): parsing keeps them as written; the models side resolves
# them after it, against the folder each was written for, or in the Hugging Face cache.


def write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def model_folder(path: Path) -> Path:
    """As much of a model folder as the folder check reads."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_parsing_keeps_a_hub_id_as_written(tmp_path, good, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    good["model"] = {"path": "llmbatch/not-cached", "adapter": "llmbatch/not-cached-either"}
    spec = load_spec(write_spec(tmp_path, good), "infer")
    assert (spec.model.path, spec.model.adapter) == ("llmbatch/not-cached", "llmbatch/not-cached-either")


def test_parsing_a_spec_imports_nothing_of_the_models_side(tmp_path, good):
    """The spec is the bottom layer: reading one must not reach up into models (a circle once)."""
    model_folder(tmp_path / "model")
    good["model"] = {"path": "model"}
    code = (
        "import sys\n"
        "from llmbatch.spec import load_spec\n"
        f"spec = load_spec({str(write_spec(tmp_path, good))!r}, 'infer')\n"
        "print(sorted(m for m in sys.modules if m == 'llmbatch.models' or m.startswith('huggingface_hub')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"


def test_a_reference_resolves_against_the_folder_it_was_written_for(tmp_path, good, monkeypatch):
    spec_dir, elsewhere = tmp_path / "specs", tmp_path / "elsewhere"
    written = model_folder(spec_dir / "models" / "m")
    given = model_folder(elsewhere / "models" / "m")
    monkeypatch.chdir(elsewhere)  # the current folder, where the command line's paths read
    good["model"] = {"path": "models/m"}
    spec_file = write_spec(spec_dir, good)

    # Another key overridden: the file's reference still reads against the file's folder.
    overrides = ["model.dtype=float32"]
    spec = resolve_models(load_spec(spec_file, "infer", overrides), spec_file, overrides)
    assert spec.model.path == str(written)

    # Set on the command line, as the key or its section: against the current folder.
    for overrides in (["model.path=models/m"], ["model={path: models/m}"]):
        spec = resolve_models(load_spec(spec_file, "infer", overrides), spec_file, overrides)
        assert spec.model.path == str(given), overrides


def test_a_missing_model_is_blamed_on_what_named_it(tmp_path, good, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_file = write_spec(tmp_path / "specs", good | {"model": {"path": "/nonexistent/model"}})
    with pytest.raises(SpecError) as e:
        resolve_models(load_spec(spec_file, "infer"), spec_file)
    assert str(e.value) == f"{spec_file}: model.path: no model folder at /nonexistent/model"

    overrides, origins = ["model.path=/nowhere"], {"model.path=/nowhere": "--model /nowhere"}
    with pytest.raises(SpecError) as e:
        resolve_models(load_spec(spec_file, "infer", overrides, origins=origins), spec_file, overrides, origins)
    assert str(e.value) == "--model /nowhere: model.path: no model folder at /nowhere"


def test_a_run_folders_spec_reads_its_references_as_folders(tmp_path, good):
    """load_resolved, as the ranks and resume call it: a relative path reads against the run folder, and
    a folder that is gone is one line naming the file."""
    run = tmp_path / "run"
    model_folder(run / "model")
    spec_file = write_spec(run, good | {"kind": "infer", "model": {"path": "model"}})
    assert load_resolved(spec_file).model.path == str(run / "model")

    spec_file.write_text(yaml.safe_dump(good | {"kind": "infer", "model": {"path": "llmbatch/gone"}}))
    with pytest.raises(SpecError) as e:
        load_resolved(spec_file)
    assert str(e.value) == f"{spec_file}: model.path: no model folder at {run / 'llmbatch/gone'}"


def test_the_embedded_model_folder_is_absolute_in_the_resolved_spec(tmp_path, good, capsys, monkeypatch):
    """Parsing leaves references as written, so the folder the CLI puts in for the embedded model must be
    one already: a relative cache would otherwise be read against the run folder by the ranks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMBATCH_CACHE", "cache")
    spec_file = write_spec(tmp_path / "specs", good)
    assert main(["infer", str(spec_file), "--executor", "local", "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("# resolved spec (infer)\n")[1].split("\n#")[0])
    assert resolved["model"]["path"] == str(tmp_path / "cache" / "<embedded-model-built-on-first-run>")
