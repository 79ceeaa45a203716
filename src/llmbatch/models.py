"""Model references, resolved before anything is queued.

- `resolve_reference`: `model.path` and `model.adapter` name a local folder, or a Hugging Face hub id
  (`Qwen/Qwen2.5-1.5B-Instruct`) already in the local cache (`HF_HOME`, `HF_HUB_CACHE`). A hub id
  becomes its snapshot folder in the resolved spec, so jobs never ask the hub (they also run with
  `HF_HUB_OFFLINE=1`, see `jobstep.launch_env`). Nothing is downloaded: a missing id is an error that
  says how to fetch it.
"""

from __future__ import annotations

from pathlib import Path

from llmbatch.spec import SpecError

# What must be in a snapshot for the id to count as cached.
MARKER_FILES = {"model.path": "config.json", "model.adapter": "adapter_config.json"}


# --- references ----------------------------------------------------------------------------------

def resolve_reference(key: str, value: str, local: Path) -> Path:
    """The folder a `model.path` or `model.adapter` value names: `local` (the value as a path) if it
    exists or the value is no hub id, else the id's snapshot in the Hugging Face cache."""
    if local.exists() or not _is_repo_id(value):
        return local
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(value, MARKER_FILES[key])
    if isinstance(found, str):
        return Path(found).parent
    raise SpecError(key, f"no folder at {local}, and {value!r} is not in the Hugging Face cache "
                         f"{constants.HF_HUB_CACHE} (HF_HOME, HF_HUB_CACHE); fetch it with: hf download {value}")


def _is_repo_id(value: str) -> bool:
    if value.startswith(("/", ".", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def host_folder(model_folder: str) -> Path:
    """The folder a container must see for `model_folder` to load: a hub snapshot's files are links
    into the repository's `blobs/`, so for a snapshot that is the repository folder."""
    path = Path(model_folder)
    return path.parent.parent if path.parent.name == "snapshots" else path
