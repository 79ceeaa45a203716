"""Model references before queueing: hub ids from the local cache."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import yaml

from conftest import run_folder, submit_cli
from test_spec import good  # noqa: F401 (good is a fixture)

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

def test_a_hub_id_resolves_from_the_local_cache_only(tmp_path, good, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = save_in_hub_cache(model_dir, tmp_path / "hf" / "hub")
    good["model"] = {"path": REPO_ID}
    out = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", "--executor", "local").stdout
    assert f"path: {snapshot}\n" in out

    proc = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", "--set", "model.path=llmbatch/other",
                      check=False)
    assert (f"model.path: no folder at {Path.cwd() / 'llmbatch/other'}, and 'llmbatch/other' is not in the "
            f"Hugging Face cache {tmp_path / 'hf' / 'hub'} (HF_HOME, HF_HUB_CACHE); fetch it with: hf download "
            f"llmbatch/other") in one_error_line(proc)

    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    proc = submit_cli("infer", spec_file(tmp_path, good), "--dry-run", check=False)
    assert f"is not in the Hugging Face cache {tmp_path / 'elsewhere'} " in one_error_line(proc)


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
