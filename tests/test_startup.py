"""Fast start (issue 16): ``soft --help``/``--version`` and every command's ``--help`` never import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

#: Every command and group of the app; a new command belongs here (the test below also checks the list is whole).
HELP_COMMANDS = [
    [], ["classify"], ["features"], ["segment"], ["profile"],
    ["weights"], ["weights", "list"], ["weights", "pull"], ["weights", "info"], ["weights", "convert"],
    ["weights", "push"], ["fit"], ["fit", "segment"], ["fit", "classify"],
]

PROBE = """
import contextlib, io, json, sys
from softcli.cli.app import app, main

def run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(args)
        except SystemExit as exc:
            return exc.code, out.getvalue()
    return None, out.getvalue()

results = {" ".join(args): run(args + ["--help"]) for args in json.loads(sys.argv[1])}
results["--version"] = run(["--version"])
import typer.main
group = typer.main.get_command(app)
commands = sorted(group.commands)
nested = sorted(f"{name} {sub}" for name, cmd in group.commands.items() for sub in getattr(cmd, "commands", {}))
heavy = sorted(m for m in ("torch", "numpy", "PIL", "huggingface_hub", "safetensors") if m in sys.modules)
print(json.dumps({"results": results, "commands": commands, "nested": nested, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """One fresh interpreter (sys.modules must start empty) that runs every ``--help`` in-process."""
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HELP_COMMANDS)], capture_output=True, text=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "100"},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_and_version_never_import_torch(probe):
    assert "torch" not in probe["heavy"], probe["heavy"]
    assert probe["results"]["--version"][0] == 0 and probe["results"]["--version"][1].startswith("softcli ")


def test_every_command_help_works_without_torch(probe):
    for args, (code, text) in probe["results"].items():
        if args == "--version":
            continue
        assert code == 0, args
        assert "Usage: soft" in text, (args, text[:200])
    names = {" ".join(a) for a in HELP_COMMANDS}
    assert set(probe["commands"]) <= names and set(probe["nested"]) <= names, "add new commands to HELP_COMMANDS"


def test_import_softcli_is_lazy_but_complete():
    code = ("import sys, softcli; lazy = 'torch' not in sys.modules; "
            "names = [n for n in softcli.__all__ if getattr(softcli, n) is None]; "
            "print(lazy, names, 'SoftModel' in dir(softcli), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "[]", "True", "True"]


def test_unknown_attribute_is_an_attribute_error():
    import softcli

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        softcli.nope  # noqa: B018
