"""The command line: version, help, info."""

import subprocess
import sys

import pytest

from sclref import __version__
from sclref.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sclref {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sclref", "info"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"sclref {__version__}") and "numba" in out
