"""One CLI vocabulary (softcli/cli/README.md): the same option names, short flags and argument names everywhere."""

from __future__ import annotations

import re

import pytest
from typer.main import get_command

from softcli.cli.app import _register_commands, app, main

MODEL_COMMANDS = ("classify", "features", "segment")


def _params(command: str) -> dict[str, object]:
    """Option/argument name → click parameter of ``soft COMMAND``."""
    _register_commands()
    cmd = get_command(app).commands[command]  # type: ignore[attr-defined]
    return {name: p for p in cmd.params for name in (*p.opts, *p.secondary_opts)} | {
        p.name: p for p in cmd.params if p.param_type_name == "argument"}


def test_short_flags_mean_one_thing():
    meaning: dict[str, set[str]] = {}
    _register_commands()
    group = get_command(app)
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for sub in getattr(cmd, "commands", {}).values() or [cmd]:
            for p in sub.params:
                longs = [o for o in p.opts if o.startswith("--")]
                for short in (o for o in p.opts if re.fullmatch(r"-[a-zA-Z]", o)):
                    meaning.setdefault(short, set()).update(longs)
    assert {s: m for s, m in meaning.items() if len(m) > 1} == {}
    assert meaning["-k"] == {"--top-k"}


def test_k_is_top_k_not_clusters(capsys):
    assert "-k" in _params("classify")["--top-k"].opts  # type: ignore[attr-defined]
    assert "-k" not in _params("segment")
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.png", "--out", "m.png", "-k", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: No such option: -k"), err


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_shared_inputs_and_model_options(command):
    params = _params(command)
    assert params["inputs"].metavar == "INPUT"  # type: ignore[attr-defined]  (usage: [INPUT]...)
    for option in ("--landmarks", "--max-memory", "--max-pixels", "--context", "--model", "--weights",
                   "--device", "--json", "--mpp", "--magnification"):
        assert option in params, (command, option)
    assert params["--max-memory"].metavar == "SIZE"  # type: ignore[attr-defined]
