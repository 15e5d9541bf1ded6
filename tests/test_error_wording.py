"""Library errors name Python parameters; the command line writes them as its options (softcli.errors, cli.advice)."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softcli.cli.advice import cli_message, option_for
from softcli.errors import InputError, NoSegmentationModel, ParameterError, SoftError, UsageError

SOFTCLI = Path(__file__).resolve().parents[1] / "softcli"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
#: Calls whose text reaches the user: error classes, warnings and log records.
_SPEAKING = re.compile(r"(Error|Exception|Interrupted|Terminated|NotCached|Unavailable|Model|File|Folder)$"
                       r"|^(warn|warning|info|error|debug|critical|exception|_fail|fail)$")


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _shape(node: ast.expr) -> str:
    """A message expression as text, each formatted value as ``x`` (``f"`{name}` must"`` → ``"`x` must"``)."""
    if isinstance(node, ast.JoinedStr):
        return "".join(_shape(v) if isinstance(v, ast.Constant) else "x" for v in node.values)
    if isinstance(node, ast.BinOp):  # "a" "b" + f"..."
        return _shape(node.left) + _shape(node.right)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "x"


def flag_sites(path: Path, root: Path = SOFTCLI.parent) -> list[str]:
    """``file:line: text`` of every string in a raise, or in an error/warning/log call, that names a CLI flag."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: dict[str, None] = {}  # a raise of an error call is seen twice: once each
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            texts = _strings(node.exc)
        elif isinstance(node, ast.Call) and _SPEAKING.search(_name(node.func)):
            texts = [t for arg in [*node.args, *(k.value for k in node.keywords)] for t in _strings(arg)]
        else:
            continue
        found |= {f"{path.relative_to(root)}:{node.lineno}: {t!r}": None for t in texts if FLAG.search(t)}
    return sorted(found, key=lambda site: int(site.split(":")[1]))


def test_the_library_never_names_a_cli_flag():
    library = [p for p in SOFTCLI.rglob("*.py") if "cli" not in p.relative_to(SOFTCLI).parts[:1]]
    assert len(library) > 50
    offenders = [site for p in sorted(library) for site in flag_sites(p)]
    assert not offenders, "library messages name CLI flags; name the parameter in backticks instead " \
                          "(softcli.errors):\n" + "\n".join(offenders)


def test_every_parameter_error_names_its_parameter():
    """``ParameterError`` refuses a message without a parameter in backticks: no raise site may hit that."""
    bare = []
    for path in sorted(SOFTCLI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _name(node.func) == "ParameterError" and node.args:
                if not re.search(r"`[a-z][a-z0-9_]*(=[^`]*)?`", _shape(node.args[0])):
                    bare.append(f"{path.relative_to(SOFTCLI.parent)}:{node.lineno}")
    assert not bare, bare


#: Parameters some library message names that no command sets (reachable from Python only).
PYTHON_ONLY = {"max_samples", "local_kernel"}


def test_every_parameter_a_message_names_is_an_option_of_some_command():
    """The mapping cannot send the command line to a flag that does not exist."""
    from typer.main import get_command

    from softcli.cli.app import _register_commands, app
    from softcli.errors import param_names

    _register_commands()
    options: set[str] = set()
    for cmd in get_command(app).commands.values():  # type: ignore[attr-defined]
        for sub in getattr(cmd, "commands", {}).values() or [cmd]:
            options |= {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
    named = {name for path in SOFTCLI.rglob("*.py") if "cli" not in path.relative_to(SOFTCLI).parts[:1]
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Raise) and node.exc is not None
             for name in param_names(_shape(node.exc.args[0]) if isinstance(node.exc, ast.Call) and node.exc.args
                                     else "")}
    assert {"overlap", "clusters", "weights", "timeout_s", "max_memory_bytes"} <= named
    missing = {name: option_for(name) for name in named - PYTHON_ONLY - {"x"}  # x: a formatted name
               if not set(option_for(name).split("/")) <= options}
    assert not missing, missing


def test_the_flag_check_finds_a_flag(tmp_path):
    """The walk above can fail: a raise, an error call and a warning naming a flag are all found."""
    bad = tmp_path / "probe.py"
    bad.write_text('def f(x):\n    if x:\n        raise UsageError(f"--tile must be {x}")\n'
                   '    warnings.warn("use --max-memory")\n    e = InputError("pass --weights FILE")\n'
                   '    raise ValueError("`tile` is fine") from None\n')
    assert [s.split(":")[1] for s in flag_sites(bad, tmp_path)] == ["3", "4", "5"]


def test_parameter_error_reads_as_python_and_as_the_command_line():
    exc = ParameterError("`overlap` must be a multiple of 32 (0, 32, 64, ...), not 48")
    assert isinstance(exc, UsageError) and exc.exit_code == 2
    assert str(exc) == "overlap must be a multiple of 32 (0, 32, 64, ...), not 48"
    assert exc.param == "overlap" and exc.params == ("overlap",)
    assert cli_message(exc) == "--overlap must be a multiple of 32 (0, 32, 64, ...), not 48"
    two = ParameterError("`dim` 48 is not divisible by `heads` 5; `timeout_s` and `max_memory_bytes` too")
    assert two.params == ("dim", "heads", "timeout_s", "max_memory_bytes")
    assert cli_message(two) == "--dim 48 is not divisible by --heads 5; --timeout and --max-memory too"
    valued = NoSegmentationModel("pass `weights` with a checkpoint, or `clusters=K`")
    assert str(valued) == "pass weights with a checkpoint, or clusters=K"
    assert cli_message(valued) == "pass --weights/--model with a checkpoint, or --clusters K"
    assert option_for("cluster_stages") == "--cluster-stages" and option_for("timeout_s") == "--timeout"
    copy = pickle.loads(pickle.dumps(exc))  # a worker's error crosses processes whole
    assert type(copy) is ParameterError and copy.template == exc.template and str(copy) == str(exc)
    with pytest.raises(ValueError, match="backticks"):
        ParameterError("tile must be at least 64")
    plain = InputError("a.png: `not a param` and file`name`.png")  # only lower-case identifiers are parameters
    assert str(plain) == "a.png: `not a param` and filename.png"  # the one limit: `identifier` in a value


@pytest.fixture
def rgb_png(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_features_overlap_api_message_vs_cli_line(tiny_backbone, rgb_png, tmp_path, soft):
    import softcli
    from softcli.features import extract_features

    model = softcli.load_model(tiny_backbone)
    with pytest.raises(ParameterError) as info:
        extract_features(model, rgb_png, tmp_path / "f.npz", overlap=48)
    assert str(info.value) == "overlap must be a multiple of 32 (0, 32, 64, ...), not 48"
    assert info.value.param == "overlap"
    r = soft("features", rgb_png, "--out", tmp_path / "f.npz", "--model", tiny_backbone, "--overlap", "48")
    assert r.returncode == 2
    assert r.stderr.decode() == "error: --overlap must be a multiple of 32 (0, 32, 64, ...), not 48\n"


def test_segment_without_a_model_api_message_vs_cli_line(rgb_png, tmp_path, soft):
    from softcli.segment import segment

    with pytest.raises(NoSegmentationModel) as info:
        segment(rgb_png, tmp_path / "m.png")
    assert str(info.value) == ("no segmentation model given: pass weights with a segmentation checkpoint, "
                               "or clusters=K to cluster the default backbone's features")
    r = soft("segment", rgb_png, "--out", tmp_path / "m.png")
    assert r.returncode == 2
    assert r.stderr.decode() == ("error: no segmentation model given: pass --weights/--model with a segmentation "
                                 "checkpoint, or --clusters K to cluster the default backbone's features\n")


def test_landmarks_and_device_name_the_parameter():
    import softcli
    from softcli.api import landmark_policy

    with pytest.raises(ParameterError) as info:
        landmark_policy("many")
    assert str(info.value) == "landmarks takes auto, official or a positive number, not 'many'"
    assert cli_message(info.value).startswith("--landmarks takes auto")
    assert isinstance(info.value.__cause__, ValueError)  # chained, not hidden
    with pytest.raises(ParameterError, match="^unknown device 'gpu7'") as info:
        softcli.resolve_device("gpu7")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_every_library_error_is_a_soft_error_with_its_template():
    exc = InputError("`max_pixels` guard")
    assert isinstance(exc, SoftError) and exc.template == "`max_pixels` guard" and str(exc) == "max_pixels guard"


def test_a_keyboard_interrupt_inside_a_command_says_interrupted(monkeypatch, rgb_png, soft):
    """Not only SIGINT: a KeyboardInterrupt raised in the process (Typer alone would exit 130 silently)."""
    import softcli.cli.classify as cli_classify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_classify.common, "load_cli_model", interrupted)
    r = soft("classify", rgb_png)
    assert (r.returncode, r.stderr.decode(), r.stdout) == (130, "error: interrupted\n", b"")
    r = soft("--debug", "classify", rgb_png)
    assert (r.returncode, r.stderr.decode()) == (130, "error: interrupted\n")


@pytest.mark.parametrize("exc,expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 805306368 bytes"), "error: out of memory ("),
    (MemoryError(), "error: out of memory ("),
    (RuntimeError("something else broke"), "error: unexpected RuntimeError: something else broke"),
])
def test_an_allocation_that_fails_says_out_of_memory(monkeypatch, rgb_png, soft, exc, expected):
    """A failed allocation the memory checks did not foresee (a ulimit, other processes) is named as such."""
    import softcli.cli.classify as cli_classify

    def fails(*args, **kwargs):
        raise exc

    monkeypatch.setattr(cli_classify.common, "load_cli_model", fails)
    r = soft("classify", rgb_png)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith(expected) and err.count("\n") == 1, err
    assert ("--max-memory" in err) == expected.startswith("error: out of memory")


def test_max_memory_has_one_default_half_the_available_ram(monkeypatch):
    """extract_features, segment and classify: ``max_memory=None`` is memory_budget(None), not a fixed 2 GiB."""
    import softcli.context.modes as modes
    from softcli.context import memory_budget
    from softcli.features import plan_features

    monkeypatch.setattr(modes, "available_memory", lambda: 2**34)
    assert memory_budget(None) == 2**33 and memory_budget(2**30) == 2**30
    channels, strides = [64, 128, 320, 512], [4, 8, 16, 32]
    plan = plan_features(4096, 4096, channels, strides)[1]
    assert plan.max_memory_bytes == 2**33 and plan.sink == "memory"
    monkeypatch.setattr(modes, "available_memory", lambda: 2**31)
    plan = plan_features(4096, 4096, channels, strides)[1]
    assert plan.max_memory_bytes == 2**30 and plan.sink == "disk"  # half of 2 GiB, not a fixed 2 GiB


def test_per_input_errors_use_cli_words_on_the_command_line_and_python_names_in_data(tmp_path, rgb_png, soft):
    """A failed input's reason: ``--max-pixels`` on stderr (classify, a cohort), ``max_pixels`` in the manifest."""
    import json

    import torch

    import softcli
    from softcli.classify import classify

    from .conftest import TINY_CONFIG

    torch.manual_seed(0)
    net = softcli.create_model(TINY_CONFIG, num_classes=10)
    folder = softcli.save_pretrained(net, tmp_path / "tiny")
    hint = "(a decompression-bomb guard; raise it with {})"
    [result] = classify(net, [rgb_png], max_pixels=100)
    assert result.error is not None and result.error.endswith(hint.format("max_pixels"))
    r = soft("classify", rgb_png, "--model", folder, "--max-pixels", "100")
    assert r.returncode == 1 and r.stderr.decode().splitlines()[-2].endswith(hint.format("--max-pixels"))
    second = rgb_png.with_name("img2.png")
    second.write_bytes(rgb_png.read_bytes())
    r = soft("features", rgb_png, second, "--out-dir", tmp_path / "out", "--model", folder,
             "--max-pixels", "100")
    assert r.returncode == 1
    lines = [line for line in r.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(line.endswith(hint.format("--max-pixels")) for line in lines), r.stderr.decode()
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert any(rec.get("error", "").endswith(hint.format("max_pixels")) for rec in records), records
