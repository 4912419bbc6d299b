"""The README tells the truth: its commands are the ones CI runs, its tables list every setting."""

from __future__ import annotations

import dataclasses
import re

from app.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readmes_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_documents_every_setting():
    for field in dataclasses.fields(Settings):
        assert f"`JUPYTER_{field.name.upper()}`" in README, field.name


def test_readme_documents_every_command_line_flag():
    from app.cli import build_parser

    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    for flag in flags - {"-h", "--help", "--version"}:
        assert flag in README, flag
