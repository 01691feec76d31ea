"""The README's commands work as written after the quick start, with no virtual environment activated:
every program they run is a system one or this environment's `.venv/bin/...`, and every `dispatcher`
command line parses."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from dispatcher import cli
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
#: Programs a fresh machine with Python has (or the README says how to get).
SYSTEM = {"python3", "curl", "cat"}
_OPERATORS = {"&&", "||", ";", "|", "(", ")"}


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(sh|console)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _command_lines(kind: str, body: str) -> list[str]:
    """Whole command lines: continuation lines (an open quote) joined; in console blocks only `$ ` lines."""
    if kind == "console":
        return [line[2:] for line in body.splitlines() if line.startswith("$ ")]
    lines: list[str] = []
    pending = ""
    for line in body.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:
            continue  # a quote is still open
        if pending.strip() and not pending.lstrip().startswith("#"):
            lines.append(pending)
        pending = ""
    assert not pending, f"unbalanced quotes in the README: {pending!r}"
    return lines


def _commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    found = []
    for kind, body in _blocks(text):
        for line in _command_lines(kind, body):
            for command in _commands(line):
                while command and re.fullmatch(r"[A-Z_]+=.*", command[0], re.DOTALL):
                    command = command[1:]  # NAME=value before the program
                if command:
                    found.append(command)
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    programs = {command[0] for command in COMMANDS}
    assert {".venv/bin/dispatcher", ".venv/bin/pytest", ".venv/bin/honcho", "curl"} <= programs, programs


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command)[:60])
def test_a_readme_command_runs_without_an_activated_venv(command):
    program = command[0]
    if program.startswith(".venv/bin/"):
        assert (BIN / program.removeprefix(".venv/bin/")).exists(), f"{program} is not installed by the quick start"
    elif program.startswith(".ci/"):
        assert (ROOT / program).is_file(), f"{program} is not in the repository"
    else:
        assert program in SYSTEM, f"{program!r} needs an activated virtual environment (write .venv/bin/{program})"
    if program == ".venv/bin/dispatcher":
        name, *args = command[1:]
        assert name in cli.cli.commands, f"no command {name!r}"
        try:
            cli.cli.commands[name].make_context(name, list(args))
        except click.ClickException as exc:
            pytest.fail(f"dispatcher {' '.join(command[1:])}: {exc.format_message()}")
