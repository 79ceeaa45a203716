"""How long validating and planning a big data file takes, and how much memory: CPU only, no GPU.

Writes data files of --rows rows (JSONL and Parquet, plain prompts and chats) into --dir, then, for each,
measures in a fresh process (wall time, peak RSS from wait4):

- `dry-run`: `submit.py infer SPEC --dry-run --executor local`: the spec, every record, the context check
  of every prompt against the embedded model (built first, so the check runs), the plan;
- `split`: what one rank of --ranks does before its first batch, minus the model: read the records,
  count the tokens of every --ranks-th prompt (`prompt_lengths`; the other ranks' counts, which
  `all_gather` brings on a real job, are computed beforehand and their time is left out), take its share
  (`token_balanced_share`) and encode it (`encode_share`), as the runner does.

    python bench/plan_1m.py --dir /tmp/plan-1m --no-split   # 1,000,000 rows; ~2 GB of files
    python bench/plan_1m.py --dir /tmp/plan-1m --rows 10000 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a of to and in is it that for on with as at by from this be or an are".split()


def question(i: int) -> str:
    """A prompt of 40 to 120 words, different for every row."""
    words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(40 + i % 80)]
    return f"Question {i}: " + " ".join(words) + f"? Is {i * 7919 % 100003} even or odd?"


def write_files(folder: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "jsonl": folder / f"plain-{rows}.jsonl",
        "parquet": folder / f"plain-{rows}.parquet",
        "chat-jsonl": folder / f"chat-{rows}.jsonl",
        "chat-parquet": folder / f"chat-{rows}.parquet",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    chunk = 100_000
    with paths["jsonl"].open("w") as plain, paths["chat-jsonl"].open("w") as chat:
        plain_writer = chat_writer = None
        for start in range(0, rows, chunk):
            ids = range(start, min(rows, start + chunk))
            plain_rows = [{"id": i, "question": question(i), "answer": "odd" if i % 2 else "even"} for i in ids]
            chat_rows = [{"id": i, "messages": [{"role": "user", "content": question(i)}]} for i in ids]
            plain.writelines(json.dumps(r) + "\n" for r in plain_rows)
            chat.writelines(json.dumps(r) + "\n" for r in chat_rows)
            plain_table, chat_table = pa.Table.from_pylist(plain_rows), pa.Table.from_pylist(chat_rows)
            plain_writer = plain_writer or pq.ParquetWriter(paths["parquet"], plain_table.schema)
            chat_writer = chat_writer or pq.ParquetWriter(paths["chat-parquet"], chat_table.schema)
            plain_writer.write_table(plain_table)
            chat_writer.write_table(chat_table)
        plain_writer.close()
        chat_writer.close()
    return paths


def spec_for(folder: Path, name: str, data: Path) -> Path:
    fields = (
        {"messages_field": "messages"}
        if name.startswith("chat")
        else {"prompt_field": "question", "reference_field": "answer"}
    )
    spec = {
        "name": "plan",
        "data": {"path": str(data), **fields},
        "output": {"root": str(folder / "runs")},
        "resources": {"gpus_per_node": 8},
    }
    path = folder / f"spec-{name}.yaml"
    path.write_text(json.dumps(spec))
    return path


def measure(argv: list[str], prints_others_s: bool = False) -> dict:
    """Wall time and peak RSS of one process (its own rusage, from wait4); with `prints_others_s`, less
    the seconds it prints as not its own (a `split` child's simulation of the other ranks)."""
    started = time.monotonic()
    # Both pipes are read after the exit: a few lines at most (the dry run's output is dropped).
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE if prints_others_s else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if prints_others_s and proc.returncode == 0:
        wall -= float(proc.stdout.read())
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{err[-2000:]}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


def split_only(spec_path: str, ranks: int) -> None:
    """Rank 0's steps before the model's first batch, without the model; prints the seconds spent on
    the other ranks' token counts (their own work on a real job)."""
    from transformers import AutoTokenizer

    from llmbatch import embedded
    from llmbatch.data import load_inputs
    from llmbatch.runners.infer import encode_share, prompt_lengths, token_balanced_share
    from llmbatch.spec import load_spec

    spec = load_spec(spec_path, "infer", [])
    tokenizer = AutoTokenizer.from_pretrained(embedded.ensure_embedded_model(embedded.default_cache_dir()))
    inputs = load_inputs(spec.data)
    started = time.monotonic()
    others = [
        prompt_lengths(tokenizer, inputs[rank::ranks], spec.data, None, 0, 1, lambda c: [c]) for rank in range(1, ranks)
    ]
    print(time.monotonic() - started)
    lengths = prompt_lengths(tokenizer, inputs, spec.data, None, 0, ranks, lambda counts: [counts, *others])
    share = token_balanced_share(lengths, 0, ranks, spec.generation.max_new_tokens)
    assert len(encode_share(tokenizer, [inputs[i] for i in share], spec.data, None)) == len(share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the data files go (kept for reruns)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--only", default="jsonl,parquet,chat-jsonl,chat-parquet")
    parser.add_argument("--no-split", action="store_true", help="only the dry runs (the split encodes every row)")
    parser.add_argument("--split-only", help=argparse.SUPPRESS)  # the measured child of `split`
    args = parser.parse_args()
    if args.split_only:
        return split_only(args.split_only, args.ranks)

    from llmbatch import embedded

    embedded.ensure_embedded_model(embedded.default_cache_dir())  # so the dry run checks prompt lengths
    paths = write_files(args.dir, args.rows)
    print(f"| file | MB | dry-run s | dry-run MiB | split ({args.ranks} ranks) s | split MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.only.split(","):
        spec = spec_for(args.dir, name, paths[name])
        dry = measure([sys.executable, str(REPO / "submit.py"), "infer", str(spec), "--dry-run", "--executor", "local"])
        split = (
            {"wall_s": "-", "peak_rss_mib": "-"}
            if args.no_split
            else measure(
                [
                    sys.executable,
                    __file__,
                    "--dir",
                    str(args.dir),
                    "--ranks",
                    str(args.ranks),
                    "--split-only",
                    str(spec),
                ],
                prints_others_s=True,
            )
        )
        size = paths[name].stat().st_size / 1e6
        print(
            f"| {paths[name].name} | {size:.0f} | {dry['wall_s']} | {dry['peak_rss_mib']} | {split['wall_s']} | "
            f"{split['peak_rss_mib']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
