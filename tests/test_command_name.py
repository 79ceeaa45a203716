"""The command's name comes from one constant (`llmbatch.COMMAND`): the hints of the command line and
of the ranks give it, and so do --help and argparse's errors."""

from __future__ import annotations

import pytest

from llmbatch import COMMAND
from llmbatch.cli import build_parser, main


def test_help_and_usage_errors_name_the_command_the_hints_name(capsys):
    assert build_parser().prog == COMMAND
    with pytest.raises(SystemExit) as e:
        main(["list", "--limit", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(f"(see {COMMAND} list --help)\n")
