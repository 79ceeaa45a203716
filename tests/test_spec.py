"""The job spec (llmbatch.spec): YAML loading, overrides (--set and the flags), the schema's keys,
types and ranges, and the one-line errors naming the key path, file:line or option (exit code 2,
nothing queued). Data files: test_data.py; model checks: test_models.py; container keys: test_container.py.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from llmbatch.cli import main
from llmbatch.spec import JobSpec, dump_spec, load_resolved, load_spec, parse_override, slurm_time_seconds

from helpers import REPO, run_cli, set_key, write_data, write_text

BAD_SPECS = [
    ("generation.max_new_token", 5, "generation.max_new_token: unknown key (did you mean 'max_new_tokens'?)"),
    ("modle", {"path": "x"}, "modle: unknown key (did you mean 'model'?)"),
    ("generation.max_new_tokens", "ten", "generation.max_new_tokens: must be an integer in (0, 1000000000], got 'ten'"),
    ("generation.max_new_tokens", -4, "generation.max_new_tokens: must be in (0, 1000000000], got -4"),
    ("resources.gpus_per_node", 0, "resources.gpus_per_node: must be in (0, 64], got 0"),
    ("resources.gpus_per_node", 10000, "resources.gpus_per_node: must be in (0, 64], got 10000"),
    ("resources.time", "0", "resources.time: must be longer than 0: '0'"),
    (
        "resources.time",
        "2",
        "resources.signal_delay_s: the preemption warning (120 s) must come before the time limit ('2' = 120 s)",
    ),
    ("resources.partition", "gpu\n#SBATCH --qos=high", "resources.partition: contains a control character ('\\n')"),
    ("resources.account", "lab\rx", "resources.account: contains a control character ('\\r')"),
    ("resources.qos", "two words", "resources.qos: must be one word: 'two words'"),
    (
        "resources.sbatch_extra",
        {"mail-user": "me\nrm -rf ~"},
        "resources.sbatch_extra.mail-user: contains a control character ('\\n')",
    ),
    (
        "resources.sbatch_extra",
        {"exclusive; rm": ""},
        "resources.sbatch_extra.exclusive; rm: not an sbatch option name",
    ),
    (
        "resources.sbatch_extra",
        {"time": "99:00:00"},
        "resources.sbatch_extra.time: set by the spec, not through sbatch_extra: use resources.time",
    ),
    (
        "resources.sbatch_extra",
        {"gres": "gpu:8"},
        "resources.sbatch_extra.gres: set by the spec, not through sbatch_extra: use resources.gpus_per_node",
    ),
    (
        "resources.sbatch_extra",
        {"output": "/tmp/x"},
        "resources.sbatch_extra.output: set by the spec, not through sbatch_extra: use the run folder",
    ),
    # sbatch expands an unambiguous prefix of an option to the option
    (
        "resources.sbatch_extra",
        {"arr": "0-99"},
        "resources.sbatch_extra.arr: 'arr' abbreviates --array (sbatch expands prefixes of its options), which the "
        "spec sets: use resources.array",
    ),
    ("resources.sbatch_extra", {"tim": "99:00:00"}, "resources.sbatch_extra.tim: 'tim' abbreviates --time"),
    ("resources.sbatch_extra", {"outp": "/tmp/x"}, "resources.sbatch_extra.outp: 'outp' abbreviates --output"),
    (
        "resources.sbatch_extra",
        {"--n": "9"},
        "resources.sbatch_extra.--n: '--n' abbreviates --nodes, --ntasks, --ntasks-per-node, --no-requeue",
    ),
    ("resources.partition", "gpu\u202e#", "resources.partition: contains an invisible format character (U+202E)"),
    (
        "resources.sbatch_extra",
        {"mail-user": "me\u2066@x"},
        "resources.sbatch_extra.mail-user: contains an invisible format character (U+2066)",
    ),
    (
        "container",
        {"runtime": "docker", "image": "--privileged"},
        "container.image: must not start with '-' (the runtime would read it as an option): '--privileged'",
    ),
    (
        "container",
        {"runtime": "docker", "image": "img\n-v/:/host"},
        "container.image: contains a control character ('\\n')",
    ),
    (
        "container",
        {"runtime": "docker", "image": "img\u200f"},
        "container.image: contains an invisible format character (U+200F)",
    ),
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
    ("generation.kv_cache_gb", 0, "generation.kv_cache_gb: must be in (0, 1048576], got 0.0"),
]


@pytest.mark.parametrize("key,value,message", BAD_SPECS, ids=[f"{k}={v}" for k, v, _ in BAD_SPECS])
def test_bad_spec_is_one_line_exit_2(tmp_path, good, capsys, key, value, message):
    code, err = run_cli(tmp_path, set_key(good, key, value), capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("llmbatch: error: ") and "spec.yaml" in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_value_from_the_command_line_is_blamed_on_its_option(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, good, "--gpus", "10000", capsys=capsys)
    assert (
        code == 2 and err == "llmbatch: error: --gpus 10000: resources.gpus_per_node: must be in (0, 64], got 10000\n"
    )
    code, err = run_cli(tmp_path, good, "--set", "generation.top_p=2", capsys=capsys)
    assert (
        code == 2 and err == "llmbatch: error: --set generation.top_p=2: generation.top_p: must be in (0, 1], got 2.0\n"
    )
    code, err = run_cli(tmp_path, good, "--set", "generation.top_k", capsys=capsys)
    assert code == 2 and err == (
        "llmbatch: error: --set generation.top_k: expected key.path=value, got 'generation.top_k'\n"
    )


def test_an_output_root_that_cannot_be_created_is_one_line(tmp_path, good, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output root's parent should be")
    set_key(good, "output.root", str(blocker / "runs"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good))
    assert main(["infer", str(path), "--executor", "local"]) == 2
    assert capsys.readouterr().err == (
        f"llmbatch: error: output.root: cannot create a run folder in {blocker / 'runs'}: Not a directory\n"
    )


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\ndata:\n  path: [unclosed\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    assert "invalid YAML at line" in capsys.readouterr().err


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
    assert code == 2 and "generation.max_new_tokens: must be an integer in (0, 1000000000], got 'many'" in err
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
    proc = subprocess.run(
        [sys.executable, str(REPO / "submit.py"), "infer", str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("generation.max_new_tokens: must be in (0, 1000000000], got -1")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_defaults_and_overrides_are_typed(tmp_path, good):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good))
    spec = load_spec(
        path,
        "infer",
        [
            "generation.max_new_tokens=7",
            "name=007",
            "resources.sbatch_extra={exclusive: ''}",
            "generation.temperature=1",
        ],
        cwd=tmp_path,
    )
    assert spec.generation.max_new_tokens == 7 and spec.name == "007"
    assert spec.generation.temperature == 1.0 and isinstance(spec.generation.temperature, float)
    assert spec.resources.sbatch_extra == {"exclusive": ""}
    assert spec.resources.gpus_per_node == 1 and spec.container.runtime == "none"
    assert parse_override("output.root=out") == ("output.root", "out")


def test_max_samples_is_read_as_max_inputs_in_a_file_and_on_the_command_line(tmp_path, good):
    """data.max_inputs was data.max_samples: users' specs and old run folders' spec.yaml still load."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(set_key(good, "data.max_samples", 2)))
    spec = load_spec(path, "infer", [], cwd=tmp_path)
    assert spec.data.max_inputs == 2 and "max_samples:" not in dump_spec(spec)
    assert load_spec(path, "infer", ["data.max_samples=1"], cwd=tmp_path).data.max_inputs == 1
    assert parse_override("data.max_samples=3") == ("data.max_inputs", 3)


def test_a_spec_giving_max_inputs_and_its_old_name_is_one_line(tmp_path, good, capsys):
    good["data"] |= {"max_samples": 2, "max_inputs": 3}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.endswith("data.max_samples: the old name of data.max_inputs, which is given too: keep one\n"), err
    assert not (tmp_path / "runs").exists()


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_numbers(tmp_path, good):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good) + "generation:\n  temperature: 7e-1\n")
    assert load_spec(path, "infer", ["generation.top_p=5E-1"], cwd=tmp_path).generation.top_p == 0.5
    assert load_spec(path, "infer", [], cwd=tmp_path).generation.temperature == 0.7
    with pytest.raises(Exception, match=r"generation.top_p: must be a number in \(0, 1\], got 'e-1'"):
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


@pytest.mark.parametrize(
    "text,seconds",
    [("30", 1800), ("10:30", 630), ("01:00:00", 3600), ("2-00", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784)],
)
def test_slurm_time(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_shipped_specs_are_valid():
    for kind in ("infer", "finetune"):
        spec = load_spec(REPO / "jobs" / f"{kind}.yaml", kind)
        assert spec.kind == kind and Path(spec.data.path).is_file()


# --- YAML as written, duplicate keys, bounded numbers, where a value came from ----------------------


def write_spec(tmp_path, good: dict, text: str) -> Path:
    """`good` as YAML, then `text` written as is (safe_dump would quote what these tests need plain)."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good) + text)
    return path


def test_the_command_line_cannot_change_the_kind(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, good, "--set", "kind=finetune", capsys=capsys)
    assert code == 2 and err == (
        "llmbatch: error: --set kind=finetune: kind: the command chose 'infer'; run the "
        "finetune command for a finetune job\n"
    )
    code, err = run_cli(tmp_path, good, "--set", "kind=infer", kind="finetune", capsys=capsys)
    assert code == 2 and err.startswith("llmbatch: error: --set kind=infer: kind: the command chose 'finetune'")
    assert not (tmp_path / "runs").exists()


def test_documented_values_that_yaml_1_1_reads_as_booleans_or_numbers_are_taken_as_written(tmp_path, good):
    path = write_spec(
        tmp_path,
        good,
        "train:\n  liger: off\nresources:\n  time: 10:00:00\n"
        "  sbatch_extra: {mail-type: on}\ncontainer:\n  env: {DEBUG: yes}\n"
        "generation:\n  do_sample: yes\n  max_new_tokens: 010\n",
    )
    spec = load_spec(path, "finetune", cwd=tmp_path)
    assert spec.train.liger == "off" and spec.resources.time == "10:00:00"  # not False, not 36000 (sexagesimal)
    assert spec.resources.sbatch_extra == {"mail-type": "on"} and spec.container.env == {"DEBUG": "yes"}
    assert spec.generation.do_sample is True and spec.generation.max_new_tokens == 10  # YAML 1.2: 010 is ten
    assert load_spec(path, "finetune", ["train.liger=off", "name=2024-01-01"], cwd=tmp_path).name == "2024-01-01"
    # What the run folder keeps reads back the same, here and under YAML 1.1.
    saved = dump_spec(spec)
    assert yaml.safe_load(saved)["train"]["liger"] == "off" and yaml.safe_load(saved)["resources"]["time"] == "10:00:00"
    assert load_resolved(write_text(tmp_path / "run" / "spec.yaml", saved)) == spec


def test_a_wrong_value_is_quoted_as_written(tmp_path, good, capsys):
    path = write_spec(tmp_path, good, "train:\n  liger: of\n")
    assert main(["finetune", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"llmbatch: error: {path}: train.liger: must be 'auto' or 'off', got 'of'\n"
    code, err = run_cli(tmp_path, good, "--set", "train.liger=On", kind="finetune", capsys=capsys)
    assert code == 2 and err.endswith("train.liger: must be 'auto' or 'off', got 'On'\n")


@pytest.mark.parametrize(
    "text,where,key,first",
    [
        ("generation:\n  temperature: 0.5\n  top_p: 0.9\n  temperature: 0.7\n", 11, "generation.temperature", 9),
        ("name: other\n", 8, "name", 5),
        ("resources:\n  sbatch_extra: {mail-type: END, mail-type: FAIL}\n", 9, "resources.sbatch_extra.mail-type", 9),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, good, capsys, text, where, key, first):
    path = write_spec(tmp_path, good, text)
    assert main(["infer", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"llmbatch: error: {path}:{where}: {key}: duplicate key (first at line {first})\n"


def test_a_duplicate_key_in_a_set_value_names_the_option(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, good, "--set", "container.env={A: 1, A: 2}", capsys=capsys)
    assert code == 2 and err == "llmbatch: error: --set container.env={A: 1, A: 2}: container.env.A: duplicate key\n"


def test_yaml_nested_too_deeply_is_one_line(tmp_path, good, capsys):
    path = write_spec(tmp_path, good, "model: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"llmbatch: error: {path}: nested too deeply to be a spec\n"


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("resources.collective_timeout_s", ".inf", "an integer in (0, 2592000]"),
        ("resources.collective_timeout_s", "1e30", "an integer in (0, 2592000]"),
        ("resources.collective_timeout_s", "10" + "0" * 30, "in (0, 2592000]"),
        ("generation.kv_cache_gb", ".inf", "in (0, 1048576]"),
        ("generation.kv_cache_gb", ".nan", "in (0, 1048576]"),
        ("generation.kv_cache_gb", "1e30", "in (0, 1048576]"),
        ("generation.temperature", "-.inf", "in (0, 100]"),
        ("generation.seed", "-1", "in [0, 4294967295]"),
        ("resources.signal_delay_s", "99999", "in (0, 65535]"),
        ("train.learning_rate", ".nan", "in (0, 100]"),
        ("train.seed", str(2**32), "in [0, 4294967295]"),
        ("train.save_every_minutes", "1e30", "in (0, 1000000000]"),
    ],
)
@pytest.mark.parametrize("where", ["file", "--set"])
def test_numbers_out_of_their_range_name_the_key_and_the_range(tmp_path, good, capsys, key, value, allowed, where):
    section, leaf = key.split(".")
    path = write_spec(tmp_path, good, f"{section}:\n  {leaf}: {value}\n" if where == "file" else "")
    extra = ["--set", f"{key}={value}"] if where == "--set" else []
    assert main(["finetune", str(path), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    source = str(path) if where == "file" else f"--set {key}={value}"
    assert err.startswith(f"llmbatch: error: {source}: {key}: must be ") and f" {allowed}, got " in err
    assert err.count("\n") == 1


def test_every_number_in_the_schema_has_a_finite_range():
    numeric = []
    for section, cls in typing.get_type_hints(JobSpec).items():
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],)):
                    numeric.append(f"{section}.{f.name}")
                    allowed = f.metadata.get("range")
                    assert allowed is not None and math.isfinite(allowed.high), f"{numeric[-1]}: no finite range"
    assert "resources.collective_timeout_s" in numeric and "generation.kv_cache_gb" in numeric


def test_an_integer_too_long_to_convert_is_one_line(tmp_path, good, capsys):
    path = write_spec(tmp_path, good, "generation:\n  max_new_tokens: " + "9" * 5000 + "\n")
    assert main(["infer", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"llmbatch: error: {path}: invalid YAML at line 9: an integer of 5000 digits\n")


@pytest.mark.parametrize(
    "option,message",
    [
        # a key below the one set
        (
            "resources.sbatch_extra={array: 0-3}",
            "resources.sbatch_extra.array: set by the spec, not through sbatch_extra: use resources.array",
        ),
        ("container.binds=[data]", "container.binds[0]: host path must be absolute: 'data'"),
        # a rule between two keys, one of them set on the command line
        (
            "resources.time=2",
            "resources.signal_delay_s: the preemption warning (120 s) must come before the time limit ('2' = 120 s)",
        ),
        ("data.chat_template=false", "data.system_prompt: a system message needs the chat template"),
        ("generation.temperature=abc", "generation.temperature: must be a number in (0, 100], got 'abc'"),
    ],
)
def test_errors_from_set_values_name_the_option(tmp_path, good, capsys, option, message):
    good["data"] |= {"system_prompt": "Be brief.", "chat_template": True}
    code, err = run_cli(tmp_path, good, "--set", option, capsys=capsys)
    assert code == 2 and err.startswith(f"llmbatch: error: --set {option}: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args,shown",
    [
        (["--set", "name=a\nb"], "--set name=a\\nb: name: use letters"),
        (
            ["--set", "data.path=/no\nsuch.jsonl"],
            "--set data.path=/no\\nsuch.jsonl: data.path: no such file: /no\\nsuch.jsonl",
        ),
        (["--set", "name=x\u202ey\udcff"], "--set name=x\\u202ey\\udcff: name: use letters"),
        (["--gpus", "1\n2"], "argument --gpus: invalid int value: '1\\n2'"),
        (["--array", "4\r\n"], "--array 4\\r\\n: expected N or N%M"),
    ],
)
def test_control_characters_in_values_never_split_the_error_line(tmp_path, good, capsys, args, shown):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(good))
    try:
        code = main(["infer", str(path), "--executor", "slurm", "--dry-run", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmbatch: error: ") and shown in err
    assert "\r" not in err and "\u202e" not in err


def test_printable_escapes_what_would_split_or_reorder_a_line():
    from llmbatch.text import printable

    assert printable("a\nb\tc\x1b[31m\u2028\u202e\ud800 é ok") == "a\\nb\\tc\\x1b[31m\\u2028\\u202e\\ud800 é ok"
