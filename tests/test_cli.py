"""The ``aanas`` command line: exit codes and help that tells the truth (aanas.cli).

The help checks are independent of cli.py's tables: they read the recipe dataclasses with
``dataclasses.fields`` and parse the rendered ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from typing import Any

import pytest

from aanas.cli import main
from aanas.config import TrainRecipe
from aanas.search import SearchRecipe

COMMANDS = ("train", "profile", "search", "show", "export", "reproduce")


def _help(command: str, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch) -> str:
    mp.setenv("COLUMNS", "2000")  # one line per option entry (argparse reads COLUMNS)
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """``--flag`` -> its whole help entry (invocation + help, wrapped lines joined)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", line)
        if match:
            current = match.group(2)
            entries[current] = (match.group(2) + match.group(3)).strip()
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _expected_default(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _expected_metavar(annotation: Any) -> str:
    names = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return names[args[0]] + ",..."
    return names[args[0] if args else annotation]


def test_bare_aanas_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aanas")
    assert "aanas: error:" in err
    proc = subprocess.run([sys.executable, "-m", "aanas"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: aanas" in proc.stderr


def test_search_help_matches_searchrecipe_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _help("search", capsys, monkeypatch)
    entries = _entries(text)
    hints = typing.get_type_hints(SearchRecipe)
    checked = 0
    for f in dataclasses.fields(SearchRecipe):
        flag = "--" + f.name.replace("_", "-")
        if flag not in entries:
            continue
        entry = entries[flag]
        metavar = _expected_metavar(hints[f.name])
        assert entry.startswith(f"{flag} {metavar} "), entry
        default = _expected_default(f.default)
        assert entry.endswith(f"(default: {default})"), (entry, default)
        checked += 1
    assert checked >= 30  # nearly every field has a flag; the test is not vacuous
    assert "--trials" in entries and "--top-k" in entries
    # The description's trial count is the dataclass default too (it once said 20 for 40).
    assert f"{SearchRecipe().trials} trials" in " ".join(text.split())
    assert " V " not in text


def test_train_help_names_recipe_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = _entries(_help("train", capsys, monkeypatch))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainRecipe)}
    for name in ("model", "data", "epochs"):
        assert f"TrainRecipe's is {defaults[name]})" in entries[f"--{name}"]
    assert entries["--epochs"].startswith("--epochs INT ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_type_and_default(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aanas.cli import build_parser

    entries = _entries(_help(command, capsys, monkeypatch))
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    actions = subparsers.choices[command]._actions  # type: ignore[union-attr]
    for action in actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or long[0] == "--help":
            continue
        entry = entries[long[0]]
        if action.nargs != 0:  # takes a value: a metavar naming its type or meaning
            invocation = entry.split("  ")[0]
            assert invocation.split()[1:] and invocation.split()[1] != "V", entry
            if action.type is int:
                assert invocation.split()[1] == "INT", entry
            if action.type is float:
                assert invocation.split()[1] == "FLOAT", entry
        default = action.default
        if default is None or default is False or default == []:
            continue
        assert f"(default: {default})" in entry or (
            action.dest.startswith("search_") and "(default: " in entry
        ), entry


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        # the reproductions: a hang growing to 9 GB, and a raw allocation traceback
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r999999999_k3_s1_e3_c24:c0", "repeats"),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r1_k3_s1_e3_c999999999:c0", "out_channels"),
    ],
)
def test_huge_spec_is_a_one_line_usage_error(
    spec: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    import aanas.cost  # noqa: F401  (torch's import time is not the spec check's)

    start = time.perf_counter()
    assert main(["profile", spec, "--no-latency"]) == 2
    assert time.perf_counter() - start < 5.0  # parse + check only; nothing is built
    err = capsys.readouterr().err
    assert err.startswith(f"aanas: error: stage0.block0.{field}: must be <= ")
    assert err.count("\n") == 1
