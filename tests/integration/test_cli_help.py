"""Every command's --help: a line for every option, and the default of every option that has one."""

from __future__ import annotations

import argparse

import pytest

from nestlm.cli import COMMANDS, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> parser, nested ones (``data prepare``) as ``data prepare``."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                out[name] = sp
                out |= {f"{name} {k}": v for k, v in _subparsers(sp).items()}
    return out


PARSERS = _subparsers(build_parser())


def test_every_command_is_covered() -> None:
    assert set(COMMANDS) <= set(PARSERS) and "data prepare" in PARSERS and "data show" in PARSERS


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    sp = PARSERS[name]
    text = sp.format_help()
    fmt = sp._get_formatter()
    for action in sp._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        shown = fmt._expand_help(action) if action.help else ""
        assert shown.strip(), f"nestlm {name} {label} has no help"
        assert (action.option_strings[0] if action.option_strings else action.metavar or action.dest) in text
        d = action.default
        if d is not None and d is not False and d != [] and d is not argparse.SUPPRESS:
            assert str(d) in shown, f"nestlm {name} {label}: the default {d!r} is not in its help {shown!r}"
        assert "(default: None)" not in shown and "(default: False)" not in shown


def test_defaults_appear_in_the_printed_help(capsys: pytest.CaptureFixture) -> None:
    from nestlm.cli import main

    with pytest.raises(SystemExit):
        main(["importance", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # lines joined as argparse wrapped them
    assert "--seq-len SEQ_LEN" in out and "(default: 512)" in out and "(default: 1024)" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tokens to generate, >= 1 (default: 64)" in out and r"\n, \t and \\ are read as escapes" in out
