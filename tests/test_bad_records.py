"""data.on_bad_record: `error` (the default) refuses the spec at the first bad record; `skip` leaves
every bad record out, lists it in the run folder's rejected.jsonl (file, line or row, reason) and counts
it in state.json, metrics.json, the summary and `status`. Decided at submission: the ranks read the same
file the same way, so they see the same good inputs.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from llmbatch import data as data_module
from llmbatch.data import BadRecord, DataError, load_inputs
from llmbatch.fingerprint import changed_input, spec_fingerprint
from llmbatch.spec import DataSpec, load_resolved

from helpers import SMALL, run_cli, run_folder, status, submit_local, write_data, write_parquet, write_text

GOOD = [{"id": i, "question": f"q{i}"} for i in range(3)]


def skip_spec(path, **data) -> DataSpec:
    return DataSpec(path=str(path), prompt_field="question", on_bad_record="skip", **data)


def read(spec: DataSpec) -> tuple[list[str], list[dict]]:
    rejected = []
    inputs = load_inputs(spec, rejected=rejected)
    return [i.id for i in inputs], [r.as_json() for r in rejected]


def test_skip_leaves_out_every_kind_of_bad_jsonl_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_RECORD_BYTES", 200)
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": 0, "question": "q0"}\n'
        b"{not json\n"
        b"[1, 2]\n"
        b'{"id": 3, "question": "caf\xe9"}\n'
        b'{"id": 4, "question": "' + b"x" * 300 + b'"}\n'
        b'{"id": 5}\n'
        b'{"id": 6, "question": null}\n'
        b'{"id": "a\\u0007b", "question": "q"}\n'
        b'{"id": 0, "question": "again"}\n'
        b'{"id": 9, "question": "\\ud800"}\n'
        b'{"id": 10, "question": "q10"}\n'
    )
    ids, rejected = read(skip_spec(path))
    assert ids == ["0", "10"]
    assert [(r["file"], r["line"]) for r in rejected] == [(str(path), n) for n in range(2, 11)]
    reasons = [r["reason"] for r in rejected]
    assert reasons[0].startswith("not valid JSON") and reasons[1] == "a line must be a JSON object"
    assert reasons[2].startswith("not UTF-8 text: byte 0xe9")
    assert reasons[3] == "the line is longer than 0.000190735 MiB, the most a record may hold"
    assert reasons[4] == "no prompt field 'question' (data.prompt_field)"
    assert reasons[5] == "field 'question' (data.prompt_field) must be text or a number, got null"
    assert "holds a control character" in reasons[6]
    assert reasons[7] == "duplicate id '0' (first at line 1)"
    assert "lone surrogate" in reasons[8]


def test_error_stops_at_the_first_bad_record_as_before(tmp_path):
    path = write_data(tmp_path / "in.jsonl", [GOOD[0], "{not json", GOOD[1]])
    with pytest.raises(BadRecord, match=r"in\.jsonl:2: not valid JSON"):
        load_inputs(DataSpec(path=str(path), prompt_field="question"))


def test_a_bad_record_does_not_claim_its_id(tmp_path):
    """A record left out for another mistake is no first occurrence: a later good one with its id stays."""
    path = write_data(tmp_path / "in.jsonl", [{"id": 1, "question": None}, {"id": 1, "question": "q"}])
    assert read(skip_spec(path))[0] == ["1"]


def test_skip_in_csv_names_the_record_and_still_stops_at_damage_that_hides_where_records_end(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,question\n1,a\n2,"two\nlines \xff"\n3,b,extra\n4,c\n')
    ids, rejected = read(skip_spec(path))
    assert ids == ["1", "4"]
    assert [(r["line"], r["reason"][:22]) for r in rejected] == [
        (3, "not UTF-8 text: byte 0"),
        (5, "wrong number of column"),
    ]
    open_quote = write_text(tmp_path / "open.csv", 'id,question\n1,a\n2,"b\n3,c\n')
    with pytest.raises(DataError, match="a quoted field opened in this record runs to the end"):
        load_inputs(skip_spec(open_quote))


def test_skip_in_parquet_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", [{"id": 1, "question": "a"}, {"id": 2, "question": None}])
    assert read(skip_spec(path)) == (
        ["1"],
        [
            {
                "file": str(path),
                "row": 2,
                "reason": "field 'question' (data.prompt_field) must be text or a number, got null",
            }
        ],
    )


def test_max_inputs_counts_good_inputs_only(tmp_path):
    path = write_data(tmp_path / "in.jsonl", [GOOD[0], "{bad", GOOD[1], "{bad", GOOD[2]])
    ids, rejected = read(skip_spec(path, max_inputs=2))
    assert ids == ["0", "1"] and [r["line"] for r in rejected] == [2]


def test_a_file_of_bad_records_only_is_refused_with_skip_too(tmp_path, good, capsys):
    path = write_data(tmp_path / "bad.jsonl", ["{x", "[]", '{"id": 1}'])
    good["data"] = {"path": str(path), "prompt_field": "question", "on_bad_record": "skip"}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{path}: no good record: all 3 are bad; the first: {path}:1: not valid JSON" in err
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_says_how_many_records_skip_leaves_out(tmp_path, good, capsys):
    path = write_data(tmp_path / "in.jsonl", [GOOD[0], "{x", GOOD[1], "[]"])
    good["data"] = {"path": str(path), "prompt_field": "question", "on_bad_record": "skip"}
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 0, err
    assert f"warning: data.on_bad_record: skip leaves out 2 bad records, the first: {path}:2: not valid JSON" in err
    good["data"]["on_bad_record"] = "drop"
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "data.on_bad_record: must be 'error' or 'skip', got 'drop'" in err, err


def test_fine_tuning_data_goes_through_the_same_setting(tmp_path, good, capsys):
    """Train and validation records left out are counted together, before anything is queued."""
    rows = [{"id": i, "question": f"q{i}", "answer": "a"} for i in range(4)]
    train = write_data(tmp_path / "train.jsonl", [*rows, "{x"])
    val = write_data(tmp_path / "val.jsonl", [rows[0], '{"id": 9, "question": "q"}'])
    good["data"] = {
        "path": str(train),
        "val_path": str(val),
        "prompt_field": "question",
        "reference_field": "answer",
        "on_bad_record": "skip",
    }
    code, err = run_cli(tmp_path, good, kind="finetune", capsys=capsys)
    assert code == 0, err
    assert "skip leaves out 2 bad records, the first: " in err and "train.jsonl:5: not valid JSON" in err


def test_resume_needs_the_same_setting_and_older_runs_read_as_error(make_run):
    run = make_run("infer")
    spec = load_resolved(run.spec_file)
    recorded_before_the_key = {k: v for k, v in spec_fingerprint(spec).items() if k != "data.on_bad_record"}
    assert changed_input(recorded_before_the_key, spec) is None
    skipping = spec_fingerprint(spec) | {"data.on_bad_record": "skip"}
    assert "submitted with data.on_bad_record='skip', but it is now 'error'" in changed_input(skipping, spec)


@pytest.mark.slow
def test_a_run_with_skip_answers_the_good_inputs_and_lists_the_rest(tmp_path):
    """End to end, on the local executor: the ranks read the file with the bad lines and answer the
    good inputs only; rejected.jsonl, state.json, metrics.json, the summary and status count the rest."""
    rows = [{"id": i, "question": f"Is {i} even or odd?", "answer": "even" if i % 2 == 0 else "odd"} for i in range(6)]
    path = write_data(
        tmp_path / "in.jsonl", [rows[0], "{broken", *rows[1:4], '{"id": 1, "question": "dup"}', *rows[4:]]
    )
    old = os.umask(0o002)
    try:
        proc = submit_local(
            "infer",
            tmp_path / "runs",
            *[f"--set={o}" for o in SMALL],
            f"--set=data.path={path}",
            "--set=data.on_bad_record=skip",
        )
    finally:
        os.umask(old)
    run = run_folder(proc)
    lines = run.rejected_file.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file": str(path), "line": 2, "reason": "not valid JSON (Expecting property name enclosed in double quotes)"},
        {"file": str(path), "line": 6, "reason": "duplicate id '1' (first at line 3)"},
    ]
    assert stat.S_IMODE(run.rejected_file.stat().st_mode) == 0o664
    results = [json.loads(line) for line in run.results_file.read_text().splitlines()]
    assert [r["id"] for r in results] == [str(i) for i in range(6)]
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["rejected_records"] == 2 and metrics["inputs"] == 6
    assert "rejected records (rejected.jsonl)  2" in proc.stdout
    assert "leaves out 2 bad records" in proc.stderr
    assert status(run)["progress"]["rejected_records"] == 2
