"""Task metrics for inputs with a reference answer.

The rule, exact match: an output is correct when, with leading and trailing whitespace removed, it
equals the reference with leading and trailing whitespace removed. Case, inner whitespace and
punctuation count. The whole output is compared, so a model must stop after its answer (end of
sequence) rather than run on; that is what fine-tuning teaches, and what its validation accuracy
measures too.
"""

from __future__ import annotations

RULE = "exact match after stripping leading and trailing whitespace"
"""The rule in one line, recorded in metrics.json next to the accuracy."""


def is_correct(output: str, reference: str) -> bool:
    return output.strip() == reference.strip()
