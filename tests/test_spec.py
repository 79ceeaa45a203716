"""Bad specs and bad data: one line naming the key path or file:line, exit code 2, nothing queued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from llmbatch.cli import main
from llmbatch.spec import load_spec, parse_override, slurm_time_seconds


def write_data(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def good(tmp_path) -> dict:
    """A valid infer spec as a dict, with its own small data file."""
    data = write_data(tmp_path / "in.jsonl", [{"id": i, "question": f"q{i}", "answer": "a"} for i in range(3)])
    return {"name": "t", "data": {"path": str(data), "prompt_template": "{question}", "reference_field": "answer"},
            "output": {"root": str(tmp_path / "runs")}}


def run_cli(tmp_path, spec: dict | None, *extra: str, kind: str = "infer", capsys=None):
    args = [kind]
    if spec is not None:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        args.append(str(path))
    code = main(args + ["--executor", "local", "--dry-run", *extra])
    err = capsys.readouterr().err
    return code, err


def set_key(spec: dict, key: str, value) -> dict:
    *sections, leaf = key.split(".")
    target = spec
    for s in sections:
        target = target.setdefault(s, {})
    target[leaf] = value
    return spec


BAD_SPECS = [
    ("generation.max_new_token", 5, "generation.max_new_token: unknown key (did you mean 'max_new_tokens'?)"),
    ("modle", {"path": "x"}, "modle: unknown key (did you mean 'model'?)"),
    ("generation.max_new_tokens", "ten", "generation.max_new_tokens: must be an integer, got 'ten'"),
    ("generation.max_new_tokens", -4, "generation.max_new_tokens: must be > 0, got -4"),
    ("resources.gpus_per_node", 0, "resources.gpus_per_node: must be in (0, 64], got 0"),
    ("resources.gpus_per_node", 10000, "resources.gpus_per_node: must be in (0, 64], got 10000"),
    ("resources.time", "0", "resources.time: must be longer than 0: '0'"),
    ("resources.time", "2", "resources.signal_delay_s: the preemption warning (120 s) must come before the "
                            "time limit ('2' = 120 s)"),
    ("resources.partition", "gpu\n#SBATCH --qos=high", "resources.partition: contains a control character ('\\n')"),
    ("resources.account", "lab\rx", "resources.account: contains a control character ('\\r')"),
    ("resources.qos", "two words", "resources.qos: must be one word: 'two words'"),
    ("resources.sbatch_extra", {"mail-user": "me\nrm -rf ~"},
     "resources.sbatch_extra.mail-user: contains a control character ('\\n')"),
    ("resources.sbatch_extra", {"exclusive; rm": ""}, "resources.sbatch_extra.exclusive; rm: not an sbatch option name"),
    ("resources.sbatch_extra", {"time": "99:00:00"},
     "resources.sbatch_extra.time: set by the spec, not through sbatch_extra: use resources.time"),
    ("resources.sbatch_extra", {"gres": "gpu:8"},
     "resources.sbatch_extra.gres: set by the spec, not through sbatch_extra: use resources.gpus_per_node"),
    ("resources.sbatch_extra", {"output": "/tmp/x"},
     "resources.sbatch_extra.output: set by the spec, not through sbatch_extra: use the run folder"),
    ("container.env", {"BAD NAME": "1"}, "container.env.BAD NAME: not a variable name: 'BAD NAME'"),
    ("container.pass_env", ["HF_TOKEN", "1X"], "container.pass_env[1]: not a variable name: '1X'"),
    ("container.binds", ["/data\n"], "container.binds[0]: contains a control character"),
    ("resources.time", "1 hour", "resources.time: not a Slurm time (MM, HH:MM:SS, D-HH:MM): '1 hour'"),
    ("resources.mem", "lots", "resources.mem: not a Slurm memory size"),
    ("generation.do_sample", "yes please", "generation.do_sample: must be true/false"),
    ("model.path", "/nonexistent/model", "model.path: no model folder at /nonexistent/model"),
    ("model.adapter", "/nonexistent/adapter", "model.adapter: no peft adapter (adapter_config.json) at"),
    ("data.path", "/nonexistent/data.jsonl", "data.path: no such file: /nonexistent/data.jsonl"),
    ("data.path", "/etc/hostname", "data.path: must be a .jsonl, .csv or .parquet file"),
    ("container.runtime", "singularity", "container.runtime: must be 'none' or 'apptainer' or 'docker' or 'podman'"),
    ("container.runtime", "docker", "container.image: missing: runtime docker needs an image"),
    ("data.prompt_template", "{question", "data.prompt_template: not a valid template"),
    ("data.prompt_template", "{} and {0}", "data.prompt_template: name each field"),
    ("generation.engine", "vllm", "generation.engine: must be 'auto' or 'fast' or 'hf', got 'vllm'"),
    ("generation.kv_cache_gb", 0, "generation.kv_cache_gb: must be > 0, got 0.0"),
]


@pytest.mark.parametrize("key,value,message", BAD_SPECS, ids=[f"{k}={v}" for k, v, _ in BAD_SPECS])
def test_bad_spec_is_one_line_exit_2(tmp_path, good, capsys, key, value, message):
    code, err = run_cli(tmp_path, set_key(good, key, value), capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("llmbatch: error: ") and "spec.yaml" in err
    assert not (tmp_path / "runs").exists()


def test_the_fast_engine_on_a_model_it_cannot_run_is_a_spec_error(tmp_path, good, capsys):
    model = tmp_path / "gpt2-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    set_key(good, "model.path", str(model))
    code, err = run_cli(tmp_path, set_key(good, "generation.engine", "fast"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"generation.engine: fast: the engine runs llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe models, and {model} is 'gpt2'" in err
    code, _ = run_cli(tmp_path, set_key(good, "generation.engine", "auto"), capsys=capsys)
    assert code == 0  # auto falls back to generate


def test_a_bad_value_from_the_command_line_is_blamed_on_its_option(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, good, "--gpus", "10000", capsys=capsys)
    assert code == 2 and err == "llmbatch: error: --gpus 10000: resources.gpus_per_node: must be in (0, 64], got 10000\n"
    code, err = run_cli(tmp_path, good, "--set", "generation.top_p=2", capsys=capsys)
    assert code == 2 and err == "llmbatch: error: --set generation.top_p=2: generation.top_p: must be in (0, 1], got 2.0\n"
    code, err = run_cli(tmp_path, good, "--set", "generation.top_k", capsys=capsys)
    assert code == 2 and err == ("llmbatch: error: --set generation.top_k: expected key.path=value, "
                                 "got 'generation.top_k'\n")


@pytest.mark.parametrize("bind,message", [
    ("/data:/in:/x:ro", "container: container bind '/data:/in:/x:ro': expected HOST[:DEST[:ro]]"),
    ("/data:in", "container: container bind '/data:in': paths must be absolute"),
])
def test_container_binds_are_checked_before_anything_is_queued(tmp_path, good, capsys, bind, message):
    set_key(good, "container", {"runtime": "docker", "image": "llmbatch:latest", "binds": [bind]})
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err == f"llmbatch: error: {message}\n"


def test_docker_client_variables_in_container_env_are_refused_before_queueing(tmp_path, good, capsys):
    set_key(good, "container", {"runtime": "docker", "image": "llmbatch:latest", "env": {"DOCKER_HOST": "tcp://x"}})
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.startswith("llmbatch: error: container: docker reads these from its own environment")


def test_container_env_reaches_the_job_without_a_container():
    from llmbatch.jobstep import LaunchPlan, example_place, node_command
    from llmbatch.spec import ContainerSpec

    plan = LaunchPlan(run_dir="/runs/r", runner="llmbatch.runners.infer", nodes=1, gpus_per_node=1,
                      mixed_precision="no", container=ContainerSpec(env={"HF_DATASETS_CACHE": "/scratch/hf"}),
                      binds=())
    assert node_command(plan, example_place(1)).env["HF_DATASETS_CACHE"] == "/scratch/hf"


def test_an_output_root_that_cannot_be_created_is_one_line(tmp_path, good, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output root's parent should be")
    set_key(good, "output.root", str(blocker / "runs"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good))
    assert main(["infer", str(path), "--executor", "local"]) == 2
    assert capsys.readouterr().err == (f"llmbatch: error: output.root: cannot create a run folder in "
                                       f"{blocker / 'runs'}: Not a directory\n")


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\ndata:\n  path: [unclosed\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    assert "invalid YAML at line" in capsys.readouterr().err


BAD_DATA = [
    ([], "the file is empty"),
    ([{"id": 1, "question": "a"}, "{not json", {"id": 3, "question": "c"}], "in.jsonl:2: not valid JSON"),
    ([{"id": 1, "question": "a"}, {"id": 2, "question": "b"}, {"id": 1, "question": "c"}],
     "in.jsonl:3: duplicate id '1' (first at line 1)"),
    ([{"id": 1, "question": "a"}, {"id": 2, "text": "b"}],
     "in.jsonl:2: data.prompt_template names field 'question', which this record lacks"),
    ([{"question": "a"}], "in.jsonl:1: no id field 'id'"),
    ([[1, 2]], "in.jsonl:1: a line must be a JSON object"),
]


@pytest.mark.parametrize("rows,message", BAD_DATA, ids=[m.split(":")[-1].strip()[:30] for _, m in BAD_DATA])
def test_bad_data_names_file_and_line(tmp_path, good, capsys, rows, message):
    write_data(tmp_path / "in.jsonl", rows)
    good["data"].pop("reference_field")
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2
    assert message in err and str(tmp_path / "in.jsonl") in err
    assert err.count("\n") == 1


def test_bad_csv_row(tmp_path, good, capsys):
    (tmp_path / "in.csv").write_text("id,question\n1,a\n2,b,extra\n")
    good["data"] = {"path": str(tmp_path / "in.csv"), "prompt_field": "question"}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "in.csv:3: wrong number of columns" in err


def test_missing_reference_field_in_data(tmp_path, good, capsys):
    write_data(tmp_path / "in.jsonl", [{"id": 1, "question": "a", "answer": "x"}, {"id": 2, "question": "b"}])
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "in.jsonl:2: no reference field 'answer'" in err


def test_finetune_without_train_data(tmp_path, good, capsys):
    del good["data"]["path"]
    code, err = run_cli(tmp_path, good, kind="finetune", capsys=capsys)
    assert code == 2 and "data.path: missing: a finetune spec needs train data" in err


def test_finetune_without_completion_field(tmp_path, good, capsys):
    del good["data"]["reference_field"]
    code, err = run_cli(tmp_path, good, kind="finetune", capsys=capsys)
    assert code == 2 and "data.reference_field: missing" in err


def test_bad_overrides(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, good, "--set", "generation.max_new_tokns=3", capsys=capsys)
    assert code == 2 and "generation.max_new_tokns: unknown key (did you mean 'max_new_tokens'?)" in err
    code, err = run_cli(tmp_path, good, "--set", "generation.max_new_tokens=many", capsys=capsys)
    assert code == 2 and "generation.max_new_tokens: must be an integer, got 'many'" in err
    code, err = run_cli(tmp_path, good, "--gpus", "0", capsys=capsys)
    assert code == 2 and "--gpus 0: resources.gpus_per_node: must be in (0, 64], got 0" in err
    code, err = run_cli(tmp_path, good, "--nodes", "2", capsys=capsys)
    assert code == 2 and "resources.nodes: 2 nodes need Slurm" in err


def test_missing_spec_file(tmp_path, capsys):
    assert main(["infer", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_real_process_prints_no_traceback(tmp_path, good):
    """The same through a real `python submit.py`: exit 2, one line on stderr, nothing on disk."""
    set_key(good, "generation.max_new_tokens", -1)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(good))
    proc = subprocess.run([sys.executable, str(REPO / "submit.py"), "infer", str(tmp_path / "spec.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("generation.max_new_tokens: must be > 0, got -1")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_defaults_and_overrides_are_typed(tmp_path, good):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good))
    spec = load_spec(path, "infer", ["generation.max_new_tokens=7", "name=007", "resources.sbatch_extra={exclusive: ''}",
                                     "generation.temperature=1"], cwd=tmp_path)
    assert spec.generation.max_new_tokens == 7 and spec.name == "007"
    assert spec.generation.temperature == 1.0 and isinstance(spec.generation.temperature, float)
    assert spec.resources.sbatch_extra == {"exclusive": ""}
    assert spec.resources.gpus_per_node == 1 and spec.container.runtime == "none"
    assert parse_override("output.root=out") == ("output.root", "out")


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_numbers(tmp_path, good):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good) + "generation:\n  temperature: 7e-1\n")
    assert load_spec(path, "infer", ["generation.top_p=5E-1"], cwd=tmp_path).generation.top_p == 0.5
    assert load_spec(path, "infer", [], cwd=tmp_path).generation.temperature == 0.7
    with pytest.raises(Exception, match="generation.top_p: must be a number, got 'e-1'"):
        load_spec(path, "infer", ["generation.top_p=e-1"], cwd=tmp_path)


def test_relative_paths_resolve_against_spec_folder(tmp_path, good):
    (tmp_path / "sub").mkdir()
    write_data(tmp_path / "sub" / "d.jsonl", [{"id": 1, "question": "a", "answer": "b"}])
    good["data"]["path"] = "d.jsonl"
    good["output"]["root"] = "runs"
    (tmp_path / "sub" / "spec.yaml").write_text(yaml.safe_dump(good))
    spec = load_spec(tmp_path / "sub" / "spec.yaml", "infer", ["output.root=elsewhere"], cwd=tmp_path)
    assert spec.data.path == str(tmp_path / "sub" / "d.jsonl")
    assert spec.output.root == str(tmp_path / "elsewhere")  # command-line paths: against the cwd


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("10:30", 630), ("01:00:00", 3600), ("2-00", 172800),
                                          ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_slurm_time(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_shipped_specs_are_valid():
    for kind in ("infer", "finetune"):
        spec = load_spec(REPO / "jobs" / f"{kind}.yaml", kind)
        assert spec.kind == kind and Path(spec.data.path).is_file()
