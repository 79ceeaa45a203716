"""Hugging Face datasets as data.path: a folder written by `save_to_disk` (a Dataset or a DatasetDict),
or a dataset id already in the local datasets cache (never downloaded). data.split picks a split (the
only one by default); rows are read as Parquet's are, and errors name `<folder>[split] row N`.

The datasets are built here, from local rows: save_to_disk, and the cache layout that
`datasets.load_dataset` leaves for an id (made by loading a local JSON file, then moved where the id's
cache folder goes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from llmbatch.data import load_inputs
from llmbatch.fingerprint import changed_input, spec_fingerprint
from llmbatch.spec import DataSpec

from helpers import SMALL, run_cli, run_folder, submit_local

ROWS = [{"id": i, "question": f"Is {i} even or odd?", "answer": "even" if i % 2 == 0 else "odd"} for i in range(4)]


def save(tmp_path, splits: dict[str, list[dict]] | list[dict], name: str = "ds") -> Path:
    """A save_to_disk folder: a DatasetDict of `splits`, or one Dataset of rows."""
    path = tmp_path / name
    if isinstance(splits, list):
        datasets.Dataset.from_list(splits).save_to_disk(str(path))
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def spec_for(good: dict, path, **data) -> dict:
    good["data"] = {"path": str(path), "prompt_template": "Q: {question}", "reference_field": "answer"} | data
    return good


def test_a_dataset_folder_reads_like_a_data_file(tmp_path):
    folder = save(tmp_path, ROWS)
    inputs = load_inputs(DataSpec(path=str(folder), prompt_template="Q: {question}", reference_field="answer"))
    assert [(i.id, i.prompt, i.reference, i.line) for i in inputs] == [
        (str(r["id"]), f"Q: {r['question']}", r["answer"], n) for n, r in enumerate(ROWS, 1)
    ]


def test_chats_come_from_a_list_of_structs(tmp_path):
    chat = [{"role": "user", "content": "Is 7 even or odd?"}]
    folder = save(tmp_path, [{"key": "a", "messages": chat}])
    [item] = load_inputs(DataSpec(path=str(folder), id_field="key", messages_field="messages"))
    assert (item.id, item.messages) == ("a", chat)


def test_split_picks_one_the_only_one_is_the_default(tmp_path, good, capsys):
    folder = save(tmp_path, {"train": ROWS[:3], "test": ROWS[3:]})
    code, err = run_cli(tmp_path, spec_for(good, folder), capsys=capsys)
    assert code == 2 and err.endswith(f"data.split: {folder} has the splits train, test: choose one\n"), err
    code, err = run_cli(tmp_path, spec_for(good, folder, split="dev"), capsys=capsys)
    assert code == 2 and err.endswith(f"data.split: no split 'dev' in {folder}; it has train, test\n"), err
    out = dry_run_out(tmp_path, spec_for(good, folder, split="test"), capsys)
    assert f"path: {folder}\n" in out and "split: test\n" in out
    only = save(tmp_path, {"validation": ROWS}, name="only")
    assert "split: validation\n" in dry_run_out(tmp_path, spec_for(good, only), capsys)
    code, err = run_cli(tmp_path, spec_for(good, save(tmp_path, ROWS, name="one"), split="train"), capsys=capsys)
    assert code == 2 and "data.split: " in err and "is one Dataset (save_to_disk of a Dataset), with no splits" in err


def test_split_is_only_for_a_dataset(tmp_path, good, capsys):
    code, err = run_cli(tmp_path, spec_for(good, good["data"]["path"], split="train"), capsys=capsys)
    assert code == 2 and "data.split: only for a Hugging Face dataset; data.path is a file: " in err, err


def test_a_bad_row_is_named_by_folder_split_and_row(tmp_path, good, capsys):
    rows = [*ROWS[:2], {"id": 9, "question": None, "answer": "odd"}]
    folder = save(tmp_path, {"train": rows})
    code, err = run_cli(tmp_path, spec_for(good, folder), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{folder}[train] row 3: field 'question' of data.prompt_template must be text or a number, got null" in err
    rejected = []
    inputs = load_inputs(
        DataSpec(path=str(folder), split="train", prompt_template="{question}", on_bad_record="skip"), rejected=rejected
    )
    assert [i.id for i in inputs] == ["0", "1"]
    assert [r.as_json() for r in rejected] == [
        {
            "file": str(folder),
            "split": "train",
            "row": 3,
            "reason": "field 'question' of data.prompt_template must be text or a number, got null",
        }
    ]


def test_a_folder_that_is_no_dataset_is_one_line(tmp_path, good, capsys):
    (tmp_path / "plain").mkdir()
    code, err = run_cli(tmp_path, spec_for(good, tmp_path / "plain"), capsys=capsys)
    assert code == 2 and "data.path: must be a .jsonl, .csv or .parquet file, a Hugging Face dataset folder" in err
    broken = save(tmp_path, ROWS, name="broken")
    next(broken.glob("*.arrow")).write_bytes(b"not arrow")
    code, err = run_cli(tmp_path, spec_for(good, broken), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and f"{broken}: not a readable Hugging Face dataset (" in err, err


def test_a_changed_dataset_stops_a_resume(tmp_path):
    folder = save(tmp_path, {"train": ROWS})
    spec = DataSpec(path=str(folder), split="train", prompt_template="{question}")
    from llmbatch.spec import JobSpec

    job = JobSpec(kind="infer", name="t", data=spec)
    saved = spec_fingerprint(job)
    assert changed_input(saved, job) is None
    save(tmp_path, {"train": ROWS[:3]})  # the same folder, rewritten with one row less
    assert "the run's data file (data.path) changed since it was submitted" in changed_input(saved, job)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache for this test (the CLI reads it in this process)."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def cache_id(cache: Path, dataset_id: str, splits: dict[str, list[dict]], work: Path) -> Path:
    """Put `dataset_id` in the datasets cache as load_dataset leaves it: loaded once from local JSON files
    (a cache folder of the `json` builder), moved to the id's folder, its files named for the id."""
    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = datasets.load_dataset("json", data_files=files, cache_dir=str(work / "build"))
    source = Path(next(iter(built.values())).cache_files[0]["filename"]).parent
    owner, name = dataset_id.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / source.name
    shutil.copytree(source, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-", 1))
    return target


def test_a_dataset_id_in_the_local_cache(tmp_path, good, capsys, datasets_cache):
    folder = cache_id(datasets_cache, "acme/parity", {"train": ROWS[:3], "test": ROWS[3:]}, tmp_path)
    out = dry_run_out(tmp_path, spec_for(good, "acme/parity", split="test"), capsys)
    assert f"path: {folder}\n" in out and "split: test\n" in out  # the resolved spec: the folder, the split
    inputs = load_inputs(DataSpec(path=str(folder), split="test", prompt_field="question"))
    assert [(i.id, i.line) for i in inputs] == [("3", 1)]
    code, err = run_cli(tmp_path, spec_for(good, "acme/missing"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.path: no file or folder 'acme/missing', and no dataset 'acme/missing' in the Hugging Face" in err
    assert str(datasets_cache) in err and "nothing is downloaded" in err


def dry_run_out(tmp_path, spec: dict, capsys) -> str:
    import yaml

    from llmbatch.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["infer", str(path), "--executor", "local", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.slow
def test_infer_end_to_end_on_a_save_to_disk_folder(tmp_path):
    folder = save(tmp_path, {"train": ROWS, "test": ROWS[:2]})
    proc = submit_local(
        "infer",
        tmp_path / "runs",
        *[f"--set={o}" for o in SMALL],
        f"--set=data.path={folder}",
        "--set=data.split=train",
    )
    run = run_folder(proc)
    results = [json.loads(line) for line in run.results_file.read_text().splitlines()]
    assert [(r["id"], r["reference"]) for r in results] == [(str(r["id"]), r["answer"]) for r in ROWS]
    assert json.loads(run.metrics_file.read_text())["inputs"] == 4
