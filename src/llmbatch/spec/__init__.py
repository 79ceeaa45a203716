"""Job specs: YAML in, typed dataclasses out, every mistake caught before anything runs.

The package's face: importers take these names from `llmbatch.spec`. Inside: `schema` (the sections,
their ranges and checks), `loading` (YAML, overrides, the spec written back), `templates` (prompt
templates), `slurm_formats` (Slurm's time and memory formats, the sbatch options the spec owns).
"""

from llmbatch.spec.loading import (
    OLD_KEYS,
    apply_override,
    blame,
    dump_spec,
    load_resolved,
    load_spec,
    local_path,
    parse_override,
    with_model_folders,
    written_in,
)
from llmbatch.spec.schema import (
    EMBEDDED_MODEL,
    ENV_NAME,
    ContainerSpec,
    DataSpec,
    GenerationSpec,
    JobSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    SpecError,
    TrainSpec,
)
from llmbatch.spec.slurm_formats import slurm_time_seconds
from llmbatch.spec.templates import template_fields

__all__ = [
    "EMBEDDED_MODEL",
    "OLD_KEYS",
    "ENV_NAME",
    "ContainerSpec",
    "DataSpec",
    "GenerationSpec",
    "JobSpec",
    "LoraSpec",
    "ModelSpec",
    "OutputSpec",
    "ResourcesSpec",
    "SpecError",
    "TrainSpec",
    "apply_override",
    "blame",
    "dump_spec",
    "load_resolved",
    "load_spec",
    "local_path",
    "parse_override",
    "slurm_time_seconds",
    "template_fields",
    "with_model_folders",
    "written_in",
]
