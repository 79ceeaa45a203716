"""Shared fixtures: the embedded model in a per-session cache, and ready-made run folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session, also seen by the CLI and the ranks it starts."""
    path = tmp_path_factory.mktemp("llmbatch-cache")
    os.environ["LLMBATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir) -> Path:
    from llmbatch.embedded import ensure_embedded_model

    return ensure_embedded_model(cache_dir)


@pytest.fixture
def make_run(tmp_path, model_dir):
    """make_run("infer", spec_path=None, overrides=[...]) -> RunDir holding a resolved spec.

    What the CLI does before launching, minus the launch: tests of a runner start from here.
    """
    from llmbatch.rundir import RunDir, atomic_write
    from llmbatch.spec import apply_override, dump_spec, load_spec

    def make(kind: str, spec_path: str | Path | None = None, overrides: list[str] = ()) -> RunDir:
        spec_path = spec_path or JOBS / f"{kind}.yaml"
        spec = load_spec(spec_path, kind, list(overrides))
        spec = apply_override(spec, "model.path", str(model_dir), tmp_path)
        run = RunDir.create(tmp_path / "runs", spec.name)
        atomic_write(run.spec_file, dump_spec(spec))
        return run

    return make
