"""Scoring (llmbatch.scoring, output.scoring): what each mode counts as a correct output."""

from __future__ import annotations

import pytest

from llmbatch.scoring import is_correct, normalize

from helpers import run_cli


def test_normalize_drops_case_punctuation_and_extra_spacing():
    assert normalize("  The Capital\tof FRANCE\n is  Paris. ") == "the capital of france is paris"
    assert normalize("«Straße», New-York; (it's) ¿ok?") == "strasse newyork its ok"
    assert normalize("$5 + 3 = 8 | ~x^2 <y>") == "$5 + 3 = 8 | ~x^2 <y>"  # symbols stay
    assert normalize("Café") == "café" and normalize(" ... ") == ""


@pytest.mark.parametrize(
    "output, reference, exact, normalized, contains",
    [
        ("Paris", "Paris", True, True, True),
        (" Paris\n", "Paris ", True, True, True),
        ("paris.", "Paris", False, True, True),
        ("The capital of France is Paris.", "Paris", False, False, True),
        ("The capital of France is Paris.", "france is PARIS", False, False, True),
        ("Paris, France", "France, Paris", False, False, False),  # the words in order
        ("14", "4", False, False, False),  # whole words only
        ("Parisian", "Paris", False, False, False),
        ("odd", "even", False, False, False),
        ("", "Paris", False, False, False),
        ("...", "!", False, True, True),  # a reference that normalizes to nothing: equal to nothing
        ("Paris", "?", False, False, False),
    ],
)
def test_each_mode(output, reference, exact, normalized, contains):
    assert is_correct(output, reference, "exact") is exact
    assert is_correct(output, reference, "normalized") is normalized
    assert is_correct(output, reference, "contains") is contains


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown scoring mode 'fuzzy'"):
        is_correct("a", "a", "fuzzy")


def test_output_scoring_is_one_of_the_modes(tmp_path, good, capsys):
    good["output"]["scoring"] = "fuzzy"
    code, err = run_cli(tmp_path, good, capsys=capsys)
    assert code == 2 and "output.scoring: must be 'exact' or 'normalized' or 'contains', got 'fuzzy'" in err, err
    good["output"]["scoring"] = "contains"
    assert run_cli(tmp_path, good, capsys=capsys)[0] == 0
