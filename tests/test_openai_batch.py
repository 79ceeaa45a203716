"""OpenAI Batch API files (llmbatch.openai_batch): requests in (data.format: openai-batch, or detected),
a line's own settings where generation.allow_overrides lets them, every line the runner cannot answer
refused before queueing in one line naming file:line, and the output file (output.format: openai-batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmbatch.data import load_inputs
from llmbatch.fingerprint import changed_input, spec_fingerprint
from llmbatch.gather import IncompleteRun, gather_shards
from llmbatch.openai_batch import RequestSettings
from llmbatch.prompts import plain_prompt_warning
from llmbatch.rundir import RunDir, atomic_write
from llmbatch.runners.sampling import input_generation
from llmbatch.shards import ShardWriter, shard_for
from llmbatch.spec import DataSpec, GenerationSpec, OutputSpec, apply_override, dump_spec, load_spec

from helpers import JOBS, run_cli, run_folder, submit_cli, write_data

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_line(custom_id: str, content: str = "Is 7 even or odd?", **body) -> dict:
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-x", "messages": messages} | body,
    }


def completion_line(custom_id: str, prompt: str = "Is 7 even or odd?\nAnswer:", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "gpt-x", "prompt": prompt} | body,
    }


def batch_spec(tmp_path: Path, lines: list, data: dict | None = None, **generation) -> dict:
    path = write_data(tmp_path / "batch.jsonl", lines)
    spec = {"name": "t", "data": {"path": str(path)} | (data or {}), "output": {"root": str(tmp_path / "runs")}}
    if generation:
        spec["generation"] = generation
    return spec


def refused(tmp_path, capsys, spec: dict, kind: str = "infer") -> str:
    """The single error line of a dry run of `spec`; nothing was queued."""
    code, err = run_cli(tmp_path, spec, kind=kind, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmbatch: error: "), err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    return err


# --- reading -------------------------------------------------------------------------------------


def test_a_jsonl_of_requests_is_detected_and_custom_id_is_the_id(tmp_path):
    lines = [
        chat_line("req-1", max_tokens=4, temperature=0.5, top_p=0.9, seed=11),
        {
            "custom_id": "req-2",
            "method": "POST",
            "url": CHAT,
            "body": {
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": [{"type": "text", "text": "Is 12"}, {"type": "text", "text": "even?"}]},
                ],
                "n": 1,
                "stream": False,
                "logprobs": None,
            },
        },
    ]
    path = write_data(tmp_path / "batch.jsonl", lines)
    first, second = load_inputs(DataSpec(path=str(path)))  # data.format: auto
    assert (first.id, first.prompt, first.line) == ("req-1", None, 1)
    assert first.messages == [{"role": "user", "content": "Is 7 even or odd?"}]
    assert first.settings == RequestSettings(max_tokens=4, temperature=0.5, top_p=0.9, seed=11)
    assert second.id == "req-2" and second.settings == RequestSettings()
    assert second.messages[1] == {"role": "user", "content": "Is 12\neven?"}  # text parts, joined as vLLM does
    assert load_inputs(DataSpec(path=str(path), format="openai-batch")) == [first, second]


def test_a_plain_file_with_fields_named_like_a_request_is_read_as_plain_when_the_spec_says_how(tmp_path):
    path = write_data(tmp_path / "plain.jsonl", [{"id": 1, "custom_id": "x", "body": "b", "q": "Is 7 even?"}])
    [item] = load_inputs(DataSpec(path=str(path), prompt_field="q"))
    assert (item.id, item.prompt, item.settings) == ("1", "Is 7 even?", None)


def test_completion_requests_keep_their_prompt_as_written(tmp_path):
    path = write_data(tmp_path / "batch.jsonl", [completion_line("a"), completion_line("b", prompt="Q: 2?\nA:")])
    inputs = load_inputs(DataSpec(path=str(path)))
    assert [(i.id, i.prompt, i.messages) for i in inputs] == [
        ("a", "Is 7 even or odd?\nAnswer:", None),
        ("b", "Q: 2?\nA:", None),
    ]


def test_a_batch_file_passes_the_checks_before_queueing(tmp_path, capsys, model_dir):
    spec = batch_spec(
        tmp_path,
        [chat_line("a", temperature=0, max_tokens=4), chat_line("b")],
        allow_overrides=["temperature", "max_tokens"],
    )
    assert run_cli(tmp_path, spec, capsys=capsys)[0] == 0
    spec = batch_spec(tmp_path, [completion_line("a"), completion_line("b")], data={"format": "openai-batch"})
    assert run_cli(tmp_path, spec, capsys=capsys)[0] == 0


# --- refusals, each naming the line --------------------------------------------------------------


def without(line: dict, *path: str) -> dict:
    line = json.loads(json.dumps(line))
    target = line
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return line


REFUSED_LINES = {
    "tools": (
        chat_line("b", tools=[{"type": "function", "function": {"name": "f"}}]),
        "body.tools: tool calls are not supported",
    ),
    "functions": (chat_line("b", functions=[{"name": "f"}]), "body.functions: function calls are not supported"),
    "tool message": (
        chat_line("b") | {"body": {"messages": [{"role": "tool", "content": "x"}]}},
        'body.messages[0].role must be system, user or assistant, got "tool" (tool calls are not supported)',
    ),
    "n > 1": (chat_line("b", n=2), "body.n: one completion per line: n must be 1"),
    "stream": (chat_line("b", stream=True), "body.stream: streaming is not supported"),
    "logprobs": (chat_line("b", logprobs=True), "body.logprobs: log probabilities are not supported"),
    "top_logprobs": (chat_line("b", top_logprobs=2), "body.top_logprobs: log probabilities are not supported"),
    "response_format": (
        chat_line("b", response_format={"type": "json_object"}),
        "body.response_format: response formats",
    ),
    "stop": (chat_line("b", stop=["\n"]), "body.stop: stop sequences are not supported"),
    "unknown body key": (chat_line("b", mystery=1), "body.mystery: not supported by llmbatch for /v1/chat/completions"),
    "another url": (chat_line("b") | {"url": "/v1/embeddings"}, 'url "/v1/embeddings" is not supported'),
    "a second url": (
        completion_line("b"),
        "url '/v1/completions' differs from the first line's '/v1/chat/completions'",
    ),
    "method": (chat_line("b") | {"method": "GET"}, "method must be 'POST', got \"GET\""),
    "no body": (without(chat_line("b"), "body"), "no body (a request line holds custom_id, method, url, body)"),
    "no custom_id": (without(chat_line("b"), "custom_id"), "no custom_id"),
    "unknown line key": (chat_line("b") | {"priority": 1}, "unknown key 'priority'"),
    "no messages": (without(chat_line("b"), "body", "messages"), "no body.messages"),
    "body not an object": (chat_line("b") | {"body": ["x"]}, "body must be an object, got a list"),
    "custom_id not text": (chat_line("b") | {"custom_id": 7}, "custom_id must be a string, got a int"),
    "empty custom_id": (chat_line(" "), "id field 'custom_id' is empty"),
    "messages not a list": (chat_line("b") | {"body": {"messages": "hi"}}, "body.messages must be a non-empty list"),
    "content not text": (
        chat_line("b") | {"body": {"messages": [{"role": "user", "content": 5}]}},
        "body.messages[0].content must be text (or a list of text parts), got a int",
    ),
    "image part": (
        chat_line("b")
        | {"body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}},
        "body.messages[0].content[0] must be a text part {type: text, text}, got a 'image_url' part",
    ),
    "temperature not a number": (chat_line("b", temperature="hot"), "body.temperature must be a number, got text"),
    "temperature out of range": (chat_line("b", temperature=2.5), "body.temperature must be in [0, 2], got 2.5"),
    "max_tokens not an integer": (chat_line("b", max_tokens=1.5), "body.max_tokens must be an integer, got a float"),
    "seed too large": (chat_line("b", seed=2**40), "body.seed must be in [0, 4.29497e+09]"),
    "lone surrogate": (chat_line("b", content="\ud800"), "body.messages[0].content holds a lone surrogate"),
}


@pytest.mark.parametrize("case", REFUSED_LINES)
def test_a_line_the_runner_cannot_answer_is_refused_naming_it(tmp_path, capsys, case):
    line, message = REFUSED_LINES[case]
    err = refused(tmp_path, capsys, batch_spec(tmp_path, [chat_line("a"), line]))
    assert f"batch.jsonl:2: {message}" in err


def test_a_completion_line_without_a_prompt_or_with_a_list_of_prompts_is_refused(tmp_path, capsys):
    err = refused(
        tmp_path, capsys, batch_spec(tmp_path, [completion_line("a"), without(completion_line("b"), "body", "prompt")])
    )
    assert "batch.jsonl:2: no body.prompt" in err
    err = refused(
        tmp_path, capsys, batch_spec(tmp_path, [completion_line("a"), completion_line("b", prompt=["x", "y"])])
    )
    assert "batch.jsonl:2: body.prompt must be text (one prompt per line), got a list" in err
    err = refused(tmp_path, capsys, batch_spec(tmp_path, [completion_line("a"), completion_line("b", messages=[])]))
    assert "batch.jsonl:2: body.messages: not supported by llmbatch for /v1/completions" in err


def test_a_duplicate_custom_id_names_both_lines(tmp_path, capsys):
    err = refused(tmp_path, capsys, batch_spec(tmp_path, [chat_line("a"), chat_line("b"), chat_line("a")]))
    assert "batch.jsonl:3: duplicate custom_id 'a' (first at line 1)" in err


def test_a_plain_file_said_to_be_a_batch_file_names_its_first_line(tmp_path, capsys):
    spec = batch_spec(tmp_path, [{"id": 1, "question": "q"}], data={"format": "openai-batch"})
    assert "batch.jsonl:1: no custom_id" in refused(tmp_path, capsys, spec)


# --- what the spec allows a line -----------------------------------------------------------------


def test_a_line_setting_what_the_spec_does_not_allow_is_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, batch_spec(tmp_path, [chat_line("a"), chat_line("b", temperature=0.7)]))
    assert (
        "batch.jsonl:2: body.temperature: the spec does not let a line set temperature (add it to "
        "generation.allow_overrides, or drop it from the line)"
    ) in err
    spec = batch_spec(tmp_path, [chat_line("a", max_tokens=64)], max_new_tokens=32, allow_overrides=["max_tokens"])
    err = refused(tmp_path, capsys, spec)
    assert "batch.jsonl:1: body.max_tokens: 64 is more than generation.max_new_tokens (32)" in err


@pytest.mark.parametrize(
    ("data", "generation", "message"),
    [
        ({"format": "openai-batch", "prompt_field": "q"}, {}, "data.prompt_field: not used with"),
        ({"format": "openai-batch", "messages_field": "m"}, {}, "data.messages_field: not used with"),
        ({"id_field": "key"}, {}, "data.id_field: not used with"),
        ({"chat_template": True}, {}, "data.chat_template: not used with"),
        ({"on_bad_record": "skip"}, {}, "data.on_bad_record: not used with"),
        ({}, {"allow_overrides": ["seed", "seed"]}, "generation.allow_overrides[1]: 'seed' twice"),
        ({}, {"allow_overrides": ["stop"]}, "generation.allow_overrides[0]: must be 'max_tokens' or 'temperature'"),
    ],
)
def test_spec_keys_that_contradict_a_batch_file_are_refused(tmp_path, capsys, data, generation, message):
    assert message in refused(tmp_path, capsys, batch_spec(tmp_path, [chat_line("a")], data=data, **generation))


def test_allow_overrides_without_a_batch_file_and_a_batch_file_to_finetune_on_are_refused(tmp_path, capsys, good):
    good["generation"] = {"allow_overrides": ["seed"]}
    err = refused(tmp_path, capsys, good)
    assert "generation.allow_overrides: only the lines of an OpenAI batch file carry their own settings" in err
    err = refused(tmp_path, capsys, batch_spec(tmp_path, [chat_line("a")]), kind="finetune")
    assert "data.format: " in err and "holds requests to answer, not training data" in err
    spec = batch_spec(tmp_path, [chat_line("a")], data={"format": "openai-batch"})
    csv = tmp_path / "batch.csv"
    csv.write_text("id,q\n1,x\n")
    spec["data"]["path"] = str(csv)
    assert "data.path: an OpenAI batch file is JSONL (.jsonl)" in refused(tmp_path, capsys, spec)


def test_a_batch_file_to_a_model_with_a_chat_template_gets_no_plain_prompt_warning(tmp_path):
    # Its chat lines go through the template and its completion lines are plain on purpose.
    batch = DataSpec(path=str(write_data(tmp_path / "batch.jsonl", [completion_line("a")])))
    assert plain_prompt_warning(batch, has_template=True) is None
    plain = DataSpec(path=str(write_data(tmp_path / "plain.jsonl", [{"id": "a", "q": "x"}])), prompt_field="q")
    assert "data.chat_template" in plain_prompt_warning(plain, has_template=True)


def test_a_lines_settings_apply_only_where_allowed_and_temperature_0_is_greedy():
    spec = GenerationSpec(max_new_tokens=32, seed=1, allow_overrides=["max_tokens", "temperature", "seed"])
    own = input_generation(spec, RequestSettings(max_tokens=5, temperature=0.7, top_p=0.5, seed=9))
    assert (own.max_new_tokens, own.do_sample, own.temperature, own.seed) == (5, True, 0.7, 9)
    assert own.top_p == 1.0  # not allowed: the spec's
    sampling = GenerationSpec(do_sample=True, temperature=1.5, allow_overrides=["temperature"])
    assert not input_generation(sampling, RequestSettings(temperature=0)).do_sample
    assert input_generation(spec, RequestSettings()) == spec and input_generation(spec, None) is spec


def test_runs_submitted_before_data_format_existed_still_resume(tmp_path, good):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(good))
    spec = load_spec(path, "infer")
    saved = spec_fingerprint(spec)
    del saved["data.format"]
    assert changed_input(saved, spec) is None
    saved["data.format"] = "openai-batch"
    assert "data.format" in changed_input(saved, spec)


# --- the output file -----------------------------------------------------------------------------


def batch_run(tmp_path: Path, model_dir: Path, lines: list) -> RunDir:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(batch_spec(tmp_path, lines) | {"output": {"format": "openai-batch"}}))
    spec = apply_override(load_spec(spec_path, "infer"), "model.path", str(model_dir), tmp_path)
    run = RunDir.create(tmp_path / "runs", spec.name)
    atomic_write(run.spec_file, dump_spec(spec))
    return run


def record(item, output: str, finish_reason: str = "eos") -> dict:
    given = {"messages": item.messages} if item.messages is not None else {"prompt": item.prompt}
    return {
        "id": item.id,
        **given,
        "output": output,
        "prompt_tokens": 7,
        "output_tokens": 3,
        "finish_reason": finish_reason,
        "truncated": False,
    }


def test_the_output_file_has_one_response_per_custom_id_with_stable_ids(tmp_path, model_dir):
    run = batch_run(tmp_path, model_dir, [chat_line("x-1"), chat_line("x-2"), chat_line("x-3")])
    inputs = load_inputs(load_spec(run.spec_file, "infer").data)
    with ShardWriter(shard_for(run, 0, 0)) as writer:
        writer.append([record(inputs[2], "even", "length"), record(inputs[0], "odd")])
    with pytest.raises(IncompleteRun, match="x-2"):
        gather_shards(run, inputs, OutputSpec(format="openai-batch"))
    assert run.gathered_results() is None
    with ShardWriter(shard_for(run, 1, 0)) as writer:  # a resumed attempt: x-1 again, then x-2
        writer.append([record(inputs[0], "other"), record(inputs[1], "even")])
    gather_shards(run, inputs, OutputSpec(format="openai-batch"))
    path = run.results_for("openai-batch")
    assert run.gathered_results() == path and path.name == "results.openai-batch.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["x-1", "x-2", "x-3"]
    first = lines[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    response = first["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == model_dir.name and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "odd"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert lines[2]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert len({line["id"] for line in lines}) == 3 and all(line["id"].startswith("batch_req_") for line in lines)
    before = path.read_bytes()
    gather_shards(run, inputs, OutputSpec(format="openai-batch"))
    assert path.read_bytes() == before  # ids derive from the run and the custom_id


def test_completion_lines_come_back_as_text_completions(tmp_path, model_dir):
    run = batch_run(tmp_path, model_dir, [completion_line("c")])
    inputs = load_inputs(load_spec(run.spec_file, "infer").data)
    with ShardWriter(shard_for(run, 0, 0)) as writer:
        writer.append([record(inputs[0], " odd")])
    gather_shards(run, inputs, OutputSpec(format="openai-batch"))
    [line] = [json.loads(line) for line in run.results_for("openai-batch").read_text().splitlines()]
    body = line["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": " odd", "finish_reason": "stop", "logprobs": None}]


# --- real runs -----------------------------------------------------------------------------------


def submit_batch(tmp_path: Path, name: str, lines: list, engine: str) -> list[dict]:
    spec = batch_spec(
        tmp_path, lines, max_new_tokens=8, engine=engine, allow_overrides=["max_tokens", "temperature", "seed"]
    )
    spec |= {"name": name, "output": {"root": str(tmp_path / "runs"), "format": "openai-batch"}}
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(json.dumps(spec))
    run = run_folder(submit_cli("infer", str(spec_path), "--executor", "local"))
    return [json.loads(line) for line in run.results_for("openai-batch").read_text().splitlines()]


@pytest.mark.slow
def test_a_batch_file_runs_end_to_end_alike_in_the_engine_and_in_generate(tmp_path):
    lines = [
        chat_line("greedy-1", "Is 7 even or odd?"),
        chat_line("greedy-2", "Is 12 even or odd?", max_tokens=3),
        chat_line("sampled-1", "Is 9 even or odd?", temperature=1.5, seed=4),
        chat_line("sampled-2", "Is 9 even or odd?", temperature=1.5, seed=5),
        chat_line("greedy-3", "Is 100 even or odd?", temperature=0),
    ]
    engine = submit_batch(tmp_path, "fast", lines, "fast")
    again = submit_batch(tmp_path, "again", lines, "fast")
    generate = submit_batch(tmp_path, "hf", lines, "hf")

    def contents(results: list[dict]) -> dict:
        return {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in results}

    assert [r["custom_id"] for r in engine] == [line["custom_id"] for line in lines]
    assert contents(engine) == contents(generate) == contents(again)  # a line's seed: the same tokens each time
    usage = {r["custom_id"]: r["response"]["body"]["usage"]["completion_tokens"] for r in engine}
    assert usage["greedy-2"] <= 3 and max(usage.values()) <= 8
    assert engine[0]["id"] != again[0]["id"]  # another run, other ids


def test_the_example_spec_passes_the_checks(capsys, model_dir):
    code, err = run_cli(None, None, str(JOBS / "examples" / "openai-batch.yaml"), capsys=capsys)
    assert code == 0, err
