"""Task metrics for inputs with a reference answer: whether an output counts as the reference, by the
rule `output.scoring` names (the same rule for inference results and fine-tuning's validation accuracy).

- `exact` (the default): the output equals the reference once leading and trailing whitespace is
  removed from both. Case, inner whitespace and punctuation count. The whole output is compared, so a
  model must stop after its answer (end of sequence) rather than run on; that is what fine-tuning
  teaches.
- `normalized`: both texts `normalize`d, then equal.
- `contains`: both texts `normalize`d; the reference's words appear in the output, in order and side by
  side, as whole words (reference `paris` is in `the capital of france is paris`, `4` is not in `14`). A
  reference that normalizes to nothing counts only against an output that does too.
"""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """`text` lowercased (`str.casefold`: also ß -> ss), every punctuation character (Unicode category
    P*; in ASCII . , ; : ! ? ' " ( ) [ ] { } - _ / \\ % # & * @, beyond it « » “ ” — ¿ and the like)
    removed, and whitespace runs (any Unicode whitespace, newlines included) made one space, none at
    either end. Symbols ($ + = < > | ~ ^ `), digits and letters, accented or not, are kept."""
    kept = "".join(ch for ch in text.casefold() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def is_correct(output: str, reference: str, mode: str) -> bool:
    """Whether `output` counts as `reference` under `mode` (output.scoring)."""
    if mode == "exact":
        return output.strip() == reference.strip()
    if mode not in ("normalized", "contains"):
        raise ValueError(f"unknown scoring mode {mode!r}")  # the spec's schema allows only the three
    output, reference = normalize(output), normalize(reference)
    if mode == "contains" and reference:
        return f" {reference} " in f" {output} "
    return output == reference
