"""A whole inference job step inside a real Docker container (private dockerd, local image)."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import run_folder, submit_cli

pytestmark = [pytest.mark.container, pytest.mark.slow]


def test_infer_step_runs_inside_docker(docker_env, cache_dir, tmp_path):
    container = {
        "runtime": "docker",
        "image": docker_env.image,
        "python": docker_env.python,
        "binds": [f"{b}:{b}:ro" for b in docker_env.binds],
        "env": {"PYTHONPATH": docker_env.pythonpath},
    }
    args = ["--gpus", "2", "--set", "data.max_samples=12", "--set", "generation.max_new_tokens=4"]
    proc = submit_cli(
        "infer",
        "--executor",
        "local",
        "--output",
        str(tmp_path / "docker"),
        *args,
        "--set",
        f"container={yaml.safe_dump(container, default_flow_style=True).strip()}",
    )
    run = run_folder(proc)
    (command,) = [json.loads(line) for line in run.commands_file.read_text().splitlines()]
    assert command["argv"][:3] == ["docker", "run", "--rm"] and docker_env.image in command["argv"]
    assert "--multi_gpu" in command["argv"]
    # The same inputs without a container give the same results: the step really ran, inside.
    plain = run_folder(submit_cli("infer", "--executor", "local", "--output", str(tmp_path / "plain"), *args))
    assert run.results_file.read_bytes() == plain.results_file.read_bytes()
    assert len(run.results_file.read_text().splitlines()) == 12
