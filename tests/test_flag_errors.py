"""A misspelled flag: one short line suggesting the closest flag, not the whole usage (issue 15: 9)."""

from __future__ import annotations

import pytest

import main as main_module
from cli.arguments import get_args_parser


def test_misspelled_flag_suggests_the_closest_one_in_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        get_args_parser().parse_args(["--lr_dorp", "5", "--epochz=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert "unknown flag --lr_dorp; did you mean --lr_drop?" in err and "did you mean --epochs?" in err


def test_other_argparse_errors_are_short_too(capsys):
    with pytest.raises(SystemExit):
        main_module.cli(["--epochs", "x"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --epochs: invalid int value: 'x'" in err


def test_valid_command_lines_still_parse():
    args = get_args_parser().parse_args(["--lr_drop", "5", "--model", "dino"])
    assert args.lr_drop == 5 and args.epochs == 12  # the family default for what was not given
