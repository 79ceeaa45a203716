"""Prompts: rendering (chat templates, system prompts, one BOS), fitting a prompt to the context,
and a chat run through `submit.py infer` against the same prompts rendered by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from llmbatch.data import Input
from llmbatch.prompts import encode_prompts, fit_to_context, prompt_texts
from llmbatch.spec import DataSpec

from helpers import CHATS, as_inputs, run_cli, run_folder, submit_cli, write_data, write_parquet

# --- rendering -----------------------------------------------------------------------------------


def prompt_text(tokenizer, input: Input, data: DataSpec) -> str:
    [text] = prompt_texts(tokenizer, [input], data)
    return text


def test_system_prompt_opens_every_chat_without_one(tokenizer):
    plain = Input("a", "Is 7 even or odd?", None, 1)
    assert (
        prompt_text(tokenizer, plain, DataSpec(chat_template=True, system_prompt="Be brief."))
        == "System: Be brief.\nUser: Is 7 even or odd?\nAssistant:"
    )
    assert prompt_text(tokenizer, plain, DataSpec(prompt_field="q")) == plain.prompt
    chats = DataSpec(messages_field="m", system_prompt="Be brief.")
    assert (
        prompt_text(tokenizer, Input("b", None, None, 2, CHATS[0]), chats)
        == "System: Be brief.\nUser: Is 7 even or odd?\nAssistant:"
    )
    assert (
        prompt_text(tokenizer, Input("c", None, None, 3, CHATS[1]), chats)
        == "System: Answer in one word.\nUser: Is 12 even or odd?\nAssistant:"
    )  # its own system message wins
    multi_turn = prompt_text(tokenizer, Input("d", None, None, 4, CHATS[2]), DataSpec(messages_field="m"))
    assert multi_turn == f"User: Is 3 even or odd?\nAssistant: odd{tokenizer.eos_token}\nUser: And 4?\nAssistant:"


def test_the_context_check_reads_the_rendered_chat(tmp_path, good, capsys, model_dir):
    """A short chat that its system prompt makes too long is refused by the dry run, naming its line."""
    path = write_data(tmp_path / "chats.jsonl", [{"id": i, "messages": chat} for i, chat in enumerate(CHATS)])
    good["model"] = {"path": str(model_dir)}
    good["data"] = {"path": str(path), "messages_field": "messages", "system_prompt": "Be brief. " * 400}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "chats.jsonl:1: the prompt is " in err and "exceeds the model's context" in err, err
    good["data"]["system_prompt"] = "Be brief."
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0


# --- runs ----------------------------------------------------------------------------------------


def infer_results(tmp_path: Path, name: str, data: dict, output_format: str = "jsonl") -> list[dict]:
    spec = {
        "name": name,
        "data": data,
        "generation": {"max_new_tokens": 6},
        "output": {"root": str(tmp_path / "runs"), "format": output_format},
    }
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(json.dumps(spec))
    run = run_folder(submit_cli("infer", str(spec_path), "--executor", "local"))
    assert run.gathered_results() == run.results_for(output_format)
    if output_format == "parquet":
        return pq.read_table(run.results_for("parquet")).to_pylist()
    return [json.loads(line) for line in run.results_file.read_text().splitlines()]


@pytest.mark.slow
def test_chats_run_like_the_same_prompts_rendered_by_hand(tmp_path, model_dir, tokenizer):
    """A chat run with a system prompt answers as a plain run of the text the template makes of it; the
    same plain data as Parquet, merged into results.parquet, gives the same records."""
    system = "Answer in one word."
    chats = write_data(tmp_path / "chats.jsonl", [{"id": f"c{i}", "messages": chat} for i, chat in enumerate(CHATS)])
    rendered = [
        {
            "id": f"c{i}",
            "text": tokenizer.apply_chat_template(
                chat if chat[0]["role"] == "system" else [{"role": "system", "content": system}, *chat],
                tokenize=False,
                add_generation_prompt=True,
            ),
        }
        for i, chat in enumerate(CHATS)
    ]
    as_chats = infer_results(
        tmp_path, "chats", {"path": str(chats), "messages_field": "messages", "system_prompt": system}
    )
    plain = {"prompt_field": "text"}
    as_text = infer_results(tmp_path, "text", {"path": str(write_data(tmp_path / "text.jsonl", rendered))} | plain)
    as_parquet = infer_results(
        tmp_path,
        "parquet",
        {"path": str(write_parquet(tmp_path / "text.parquet", rendered))} | plain,
        output_format="parquet",
    )

    assert [r["messages"] for r in as_chats] == CHATS  # as given: the system prompt is the spec's
    same = ("id", "output", "prompt_tokens", "output_tokens", "finish_reason")
    assert [{k: r[k] for k in same} for r in as_chats] == [{k: r[k] for k in same} for r in as_text]
    assert len({r["output"] for r in as_text}) > 1  # the prompts make a difference
    assert as_parquet == as_text


# --- encoding -------------------------------------------------------------------------------------


def test_a_chat_prompt_has_one_bos_whether_or_not_the_template_writes_it(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = DataSpec(chat_template=True)
    [ids] = encode_prompts(tokenizer, as_inputs(["Is 7 even or odd?"]), chat)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[1:]) == "User: Is 7 even or odd?\nAssistant:"
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    assert encode_prompts(tokenizer, as_inputs(["Is 7 even or odd?"]), chat) == [ids]


def test_fit_to_context_keeps_the_bos_and_the_end():
    assert fit_to_context([1, 10, 11, 12, 13], 3, bos_token_id=1) == [1, 12, 13]
    assert fit_to_context([10, 11, 12, 13], 3, bos_token_id=1) == [11, 12, 13]
    assert fit_to_context([1, 10, 11], 3, bos_token_id=1) == [1, 10, 11]
