"""Shared fixtures: where the golden reference lives, tiny models, a CLI runner (in-process by default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the internet and never touch the user's Hugging Face cache: unless a
# test points them elsewhere, the Hub and the Drive origin are a closed loopback port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("SOFTCLI_GDRIVE_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _golden_dir() -> Path:
    env = os.environ.get("SOFTCLI_GOLDEN")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "reference" / "golden"


GOLDEN = _golden_dir()
#: The one reason every golden test gives when the reference files are not there (a plain clone).
GOLDEN_MISSING = (f"golden reference files not found at {GOLDEN}: lay shared/reference/golden beside the "
                  "checkout or set SOFTCLI_GOLDEN")


def golden_available() -> bool:
    return (GOLDEN / "manifest.json").is_file()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the golden files, skip (with one reason) every test that uses the ``golden`` fixture or marker."""
    if golden_available():
        return
    skip = pytest.mark.skip(reason=GOLDEN_MISSING)
    for item in items:
        if "golden" in getattr(item, "fixturenames", ()) or item.get_closest_marker("golden") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden() -> Path:
    """The official reference outputs; CI lays shared/ beside the checkout (tests skip without them)."""
    if not golden_available():
        pytest.skip(GOLDEN_MISSING)
    return GOLDEN


@pytest.fixture(scope="session")
def manifest(golden: Path) -> dict:
    return json.loads((golden / "manifest.json").read_text())


#: A SOFT network small enough for fast tests (same code paths as the real ones).
TINY_CONFIG = {
    "embed_dims": [16, 32, 48, 64],
    "num_heads": [1, 2, 3, 2],
    "depths": [1, 1, 1, 1],
    "sr_ratios": [8, 4, 2],
    "num_classes": 10,
}


@pytest.fixture
def tiny_model():
    import torch

    import softcli

    torch.manual_seed(0)
    return softcli.create_model(TINY_CONFIG, num_classes=10)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A softcli folder of a random TINY_CONFIG backbone (no classes), made once per session."""
    import torch

    import softcli

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-backbone") / "tiny"
    softcli.save_pretrained(softcli.create_model(TINY_CONFIG, num_classes=0), folder)
    return folder


#: Variables huggingface_hub reads once, when it is imported: a run that sets them needs its own process.
_IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_")


def run_soft(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300,
             input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``soft ARGS`` through the real entry point (:func:`softcli.cli.app.main`) and capture it.

    In this process (no interpreter and torch start-up per call), with its own
    stdout/stderr/stdin, environment, working directory and exit code, so tests
    read the result exactly like a subprocess's (bytes, ``returncode``; an
    exception that escapes ``main`` becomes a traceback on stderr and status 1).
    A run whose ``env`` sets Hugging Face variables goes to a process of its own
    (forked from the warm zygote, tests/zygote.py): huggingface_hub reads them
    only at import. ``timeout`` applies to those runs only.
    """
    if env and any(name.startswith(_IMPORT_TIME_ENV) for name in env):
        from tests.zygote import run_soft_process

        full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        full_env.pop("SOFTCLI_DEBUG", None)
        return run_soft_process(list(args), env=full_env, cwd=cwd, timeout=timeout, input=input)
    return _run_in_process([str(a) for a in args], env or {}, cwd, input)


def run_soft_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300,
                        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m softcli ARGS`` as a user would, capturing output (the smoke tests of the real process)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("SOFTCLI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "softcli", *map(str, args)], capture_output=True,
                          env=full_env, cwd=cwd, timeout=timeout, input=input)


def _run_in_process(args: list[str], env: dict, cwd: Path | None,
                    input: bytes | None) -> subprocess.CompletedProcess:
    import io
    import traceback

    import torch

    from softcli.cli.app import main

    out, err = io.BytesIO(), io.BytesIO()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    wrappers = (io.TextIOWrapper(io.BytesIO(input or b""), encoding="utf-8"),
                io.TextIOWrapper(out, encoding="utf-8", write_through=True),
                io.TextIOWrapper(err, encoding="utf-8", write_through=True))
    sys.stdin, sys.stdout, sys.stderr = wrappers
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.pop("SOFTCLI_DEBUG", None)
    if "OMP_NUM_THREADS" in env:  # what the variable does to a fresh process
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if cwd is not None:
            os.chdir(cwd)
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would do: the traceback on stderr, status 1
        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdin, sys.stdout, sys.stderr = streams
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    result = subprocess.CompletedProcess(["soft", *args], code, out.getvalue(), err.getvalue())
    for wrapper in wrappers:
        wrapper.detach()  # leave the buffers open (a wrapper closes its buffer when collected)
    return result


@pytest.fixture
def soft():
    return run_soft


# -- CPU time per test: comparable on a busy machine, where wall-clock --durations are not ------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that used the most CPU time (this process and its children), "
                          "and the total; 0 lists all")


_CPU_SECONDS: dict[str, float] = {}


def _cpu_now() -> float:
    import resource

    from tests import zygote

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + zygote.cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    start = _cpu_now()
    yield
    _CPU_SECONDS[item.nodeid] = _cpu_now() - start


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    n = config.getoption("--cpu-durations")
    if n is None or not _CPU_SECONDS:
        return
    ranked = sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])
    terminalreporter.write_sep("=", f"CPU time per test (setup+call+teardown, with subprocesses), "
                                    f"total {sum(_CPU_SECONDS.values()):.1f} s over {len(ranked)} tests")
    for nodeid, seconds in ranked[:n or None]:
        terminalreporter.write_line(f"{seconds:8.2f}s  {nodeid}")
