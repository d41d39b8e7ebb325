"""The README and --help stay true to the code."""

from __future__ import annotations

import re

from click.testing import CliRunner

import lipcert
from lipcert.cli import main
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_ops_table_equals_the_registry():
    table = README.split("<!-- ops-table:start -->")[1].split("<!-- ops-table:end -->")[0]
    ops = re.findall(r"^\| (\w+) \|", table, flags=re.M)
    assert sorted(o for o in ops if o != "op") == lipcert.supported_ops()


def test_every_command_has_help_and_is_in_the_readme():
    for name, cmd in main.commands.items():
        assert cmd.help, name
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0
        assert f"lipcert {name}" in README, f"`lipcert {name}` is not documented in the README"


def test_readme_setup_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    install_and_run, tests = block
    for part in install_and_run.split(" && "):
        assert part.strip() in ci, part
    assert tests.strip() in ci
