"""Model references (`model.path`, `model.adapter`): parsing keeps them as written, and the models side
resolves them after it, against the folder each was written for, or in the Hugging Face cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmbatch.cli import main
from llmbatch.models import resolve_models
from llmbatch.spec import SpecError, load_resolved, load_spec


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
