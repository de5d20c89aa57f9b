"""Every help text of the command line reads as plain text in an 80-column terminal.

The command list is read from the typer app, so a new command is checked without editing this file.
Each screen is rendered the way a user sees it, by the console entry point in a child process with
``COLUMNS=80``: ``diffit-toolkit --help``, ``diffit-toolkit COMMAND --help`` for every command and
group, and ``diffit-toolkit plugins``. The screens must show no raw reStructuredText / markdown
markup, no private names, no word cut short by an ellipsis, no flag that looks like it takes a value
and no plural spelled by a blind "+s" ("processs"). The help strings themselves must not hide a
hard line break inside a paragraph (typer prints it as is, so a sentence breaks mid-line) nor rich
markup that would swallow text (``[cluster]`` in ``pip install 'diffit-toolkit[cluster]'``).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
import typer.main
from rich.text import Text

from diffit_toolkit.cli import app
from diffit_toolkit.registry import KIND_LABELS

WIDTH = 80
#: Wide enough that no help line and no table cell wraps: checks that must see whole words use it.
UNWRAPPED = 1000
MARKER = "=== help screen: "

# Screens with known, accepted problems: command name -> the exact problem strings.
KNOWN_FAILURES: dict[str, set[str]] = {}


def _commands() -> dict[str, object]:
    """Every command and group of the app, by its words after ``diffit-toolkit`` ("" for the app)."""
    found: dict[str, object] = {}

    def walk(command, words: tuple[str, ...]) -> None:
        found[" ".join(words)] = command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if not getattr(sub, "hidden", False):
                walk(sub, (*words, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = _commands()
SCREENS = [(f"{name} --help".strip(), [*name.split(), "--help"]) for name in COMMANDS] + [("plugins", ["plugins"])]

# One child process per width renders every screen through the console entry point, one after the
# other (a process per screen would start the interpreter thirty times).
RENDER = f"""
import sys
from diffit_toolkit.cli import main

for line in sys.stdin.read().splitlines():
    print({MARKER!r} + line, flush=True)
    sys.argv = ["diffit-toolkit", *line.split()]
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print("exit status", exc.code)
    sys.stdout.flush()
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _render(width: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    # rich reads COLUMNS; typer sizes its help console from TERMINAL_WIDTH.
    env.update(COLUMNS=str(width), TERMINAL_WIDTH=str(width), NO_COLOR="1")
    stdin = "\n".join(" ".join(args) for _, args in SCREENS) + "\n"
    proc = subprocess.run([sys.executable, "-c", RENDER], input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    screens: dict[str, str] = {}
    for chunk in ANSI.sub("", proc.stdout).split(MARKER)[1:]:
        line, _, text = chunk.partition("\n")
        screens[line] = text
    names = dict(SCREENS)
    assert sorted(screens) == sorted(" ".join(args) for args in names.values()), proc.stderr[-3000:]
    return {title: screens[" ".join(args)] for title, args in SCREENS}


@pytest.fixture(scope="module")
def screens() -> dict[str, str]:
    return _render(WIDTH)


@pytest.fixture(scope="module")
def unwrapped() -> dict[str, str]:
    return _render(UNWRAPPED)


# -- the checks: each returns the offending strings -------------------------------------------

MARKUP = [
    re.compile(r"``[^`\n]*(``)?|`[^`\n]*`|`"),  # ``literal`` / `code` / a lone backtick left by a wrap
    re.compile(r"\[[^\[\]\n]+\]\[[^\[\]\n]*\]"),  # mkdocstrings cross-reference [text][target]
    re.compile(r"\*\*[^*\n]+\*\*"),  # **bold**
    re.compile(r":[a-z]+:`"),  # a Sphinx role such as :func:`name`
]
PRIVATE = re.compile(r"(?<![\w-])_[A-Za-z]\w*")  # _private, module._private; not snake_case, not a flag
TRIPLE_S = re.compile(r"\b[A-Za-z]*sss\b", re.IGNORECASE)  # "processs", "classs"
CUT = re.compile(r"\S*…|\S*\w\.\.\.(?=\s*(│|$))")  # rich's ellipsis, or "word..." where a line or cell ends
BAD_PLURALS = [label + "s" for label in KIND_LABELS.values() if label.endswith("s")]


def content_problems(text: str) -> list[str]:
    """Raw markup, private names and "+s" plurals (needs whole words: run it on unwrapped text too)."""
    found = [f"markup: {m.group(0)!r}" for pattern in MARKUP for m in pattern.finditer(text)]
    found += [f"private name: {m.group(0)!r}" for m in PRIVATE.finditer(text)]
    found += [f"plural: {m.group(0)!r}" for m in TRIPLE_S.finditer(text)]
    found += [f"plural: {word!r}" for word in BAD_PLURALS if re.search(rf"\b{re.escape(word)}\b", text)]
    return found


def layout_problems(text: str, allowed: set[str]) -> list[str]:
    """Lines wider than the terminal, words cut by an ellipsis, flags shown with a value type."""
    found = []
    for line in text.splitlines():
        if len(line.rstrip()) > WIDTH:
            found.append(f"wider than {WIDTH} columns: {line!r}")
        if line.lstrip().startswith("Usage:"):
            continue  # "COMMAND [ARGS]..." and "{recipes}...": the framework's notation for repeatable words
        found += [f"cut word: {m.group(0)!r}" for m in CUT.finditer(line) if m.group(0) not in allowed]
        if "<bool>" in line:
            found.append(f"flag shown with a value: {line.strip()!r}")
    return found


def _help_strings(command) -> list[str]:
    """The help strings typer prints for a command: its own help, short help and every parameter's."""
    texts = [command.help, command.short_help, *(getattr(p, "help", None) for p in command.params)]
    return [text for text in texts if text]


def source_problems(command) -> list[str]:
    """Hard line breaks inside a paragraph (typer keeps them in the command list and in every
    paragraph after the first) and rich markup that would swallow text when printed."""
    found = []
    for text in _help_strings(command):
        for paragraph in inspect.cleandoc(text).partition("\f")[0].split("\n\n"):
            if paragraph.startswith("\b"):
                continue  # typer's own marker for a paragraph printed line by line
            found += [f"line break: {line.strip()!r}" for line in paragraph.splitlines()[:-1]]
        shown = Text.from_markup(text).plain
        if shown != text.replace("\\[", "["):
            found.append(f"rich markup swallows text: {text!r} prints as {shown!r}")
    return found


def _argument_words(name: str) -> set[str]:
    """``recipes...``: how typer names a repeatable argument, not a cut word."""
    command = COMMANDS.get(name)
    params = getattr(command, "params", []) if command is not None else []
    return {f"{p.name}..." for p in params if p.param_type_name == "argument" and p.nargs != 1}


def _unexpected(name: str, problems: list[str]) -> list[str]:
    return [problem for problem in problems if problem not in KNOWN_FAILURES.get(name, set())]


@pytest.mark.parametrize("title", [title for title, _ in SCREENS])
def test_help_screen_is_plain_text_at_80_columns(title, screens, unwrapped):
    name = title.removesuffix("--help").strip()
    text = screens[title]
    assert text.strip(), f"`diffit-toolkit {title}` printed nothing"
    problems = layout_problems(text, _argument_words(name)) + content_problems(text)
    problems += [p for p in content_problems(unwrapped[title]) if p not in problems]
    assert not _unexpected(name, problems), f"diffit-toolkit {title}:\n" + "\n".join(_unexpected(name, problems))


@pytest.mark.parametrize("name", list(COMMANDS), ids=lambda name: name or "diffit-toolkit")
def test_help_strings_have_no_hard_line_breaks_or_rich_markup(name):
    problems = source_problems(COMMANDS[name])
    assert not _unexpected(name, problems), f"{name or 'diffit-toolkit'}:\n" + "\n".join(_unexpected(name, problems))


def test_the_checks_catch_what_they_should():
    """Each check fires on the faults named in the module docstring and stays quiet on plain text."""
    assert content_problems("see ``--npz`` or `recipe validate`")
    assert content_problems("the [`Launcher`][diffit_toolkit.eval.jobs.Launcher] of the sweep")
    assert content_problems("(see _diffusers_scheduler);") and content_problems("module._private")
    assert content_problems("diffusion processs") and not content_problems("diffusion processes")
    assert layout_problems("│ 'diffit-toolkit[xforme… │", set())
    assert layout_problems("pip install 'diffit-toolkit[xforme...", set())
    assert layout_problems("│ --version   <bool>  Print the version and exit. │", set())
    assert not layout_problems("│ *    recipes...      Recipe files │", {"recipes..."})
    plain = "seed_<s>, DIFFIT_TOOLKIT_TRACEBACK=1, --no-progress, 0..4, 'pkg[cluster]'"
    assert not content_problems(plain) and not layout_problems(plain, set())
