"""The sample task: "Is 4817 even or odd?" -> "odd".

Small enough that LoRA on the embedded model learns it in a minute or two on a CPU (the tokenizer
splits numbers into single digits, so the answer depends only on the last digit token), with answers
checkable by exact match: the untrained model scores about 0, a fine-tuned one close to 100%.

    python -m llmbatch.sampledata OUT_DIR     # writes train.jsonl, val.jsonl, test.jsonl

The committed copy is `jobs/data/parity/`; the output is deterministic, byte for byte, and no number
appears in two splits.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240601
SPLITS = {"train": 2000, "val": 200, "test": 200}
MIN_DIGITS, MAX_DIGITS = 2, 6


def numbers(count: int, seed: int = SEED) -> list[int]:
    """`count` distinct numbers, the digit count uniform over MIN_DIGITS..MAX_DIGITS."""
    rng = random.Random(seed)  # same sequence on every Python 3 version and platform
    seen: set[int] = set()
    out = []
    while len(out) < count:
        digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
        n = rng.randrange(10 ** (digits - 1), 10**digits)
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def record(split: str, index: int, n: int) -> dict:
    return {"id": f"{split}-{index:04d}", "question": f"Is {n} even or odd?", "answer": "odd" if n % 2 else "even"}


def splits() -> dict[str, list[dict]]:
    """{split: records}; one pool of distinct numbers cut into consecutive slices, so no overlap."""
    pool = numbers(sum(SPLITS.values()))
    out, start = {}, 0
    for split, size in SPLITS.items():
        out[split] = [record(split, i, n) for i, n in enumerate(pool[start : start + size])]
        start += size
    return out


def write(out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in splits().items():
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmbatch.sampledata OUT_DIR", file=sys.stderr)
        return 2
    for path in write(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
