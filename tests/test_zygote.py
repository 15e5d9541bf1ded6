"""The test harness's fork-server (tests/zygote.py): its runs must behave as fresh ``python -c`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not zygote.supported(), reason="the zygote forks: Linux only")

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def fresh(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=ENV, **kwargs)


def forked(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return zygote.run_python(code, list(args), env=ENV, timeout=60, **kwargs)


@pytest.mark.parametrize("code,args", [
    ("import sys; print(sys.argv[1:]); sys.exit(3)", ["a", "b c"]),
    ("import sys; sys.exit('a message')", []),
    ("raise ValueError('boom')", []),
    ("import sys; sys.stdout.write(sys.stdin.read().upper())", []),
    ("import os; print(os.environ['SOFTCLI_ZYGOTE_PROBE'], os.path.basename(os.getcwd()))", []),
    ("raise KeyboardInterrupt", []),
], ids=["exit-status", "exit-message", "uncaught", "stdin", "env-and-cwd", "keyboard-interrupt"])
def test_a_forked_run_ends_like_a_fresh_interpreter(tmp_path, monkeypatch, code, args):
    monkeypatch.setitem(ENV, "SOFTCLI_ZYGOTE_PROBE", "seen")
    a = fresh(code, *args, input=b"piped", cwd=tmp_path)
    b = forked(code, *args, input=b"piped", cwd=tmp_path)
    assert b.returncode == a.returncode
    assert b.stdout == a.stdout
    assert b.stderr.splitlines()[-1:] == a.stderr.splitlines()[-1:]
    assert (b"Traceback" in b.stderr) == (b"Traceback" in a.stderr)


def test_the_zygote_stays_single_threaded_and_its_children_run_parallel_ops():
    """The zygote never starts a thread pool (so fork is safe); each child can start one of its own."""
    code = ("import torch, sys; torch.set_num_threads(2); x = torch.randn(512, 512); "
            "print(torch.get_num_threads(), float((x @ x).abs().sum()) > 0)")
    for _ in range(2):
        r = forked(code)
        assert (r.returncode, r.stdout) == (0, b"2 True\n"), r.stderr.decode()
    server = zygote.zygote_for(ENV)
    assert server is not None and server.threads == 1
    assert len(os.listdir(f"/proc/{server.process.pid}/task")) == 1


def test_a_forked_run_is_a_process_of_its_own(tmp_path):
    """Its own PID (not the zygote's, not the runner's), killed by a real signal, reported as Popen does."""
    code = "import os, time; print(os.getpid(), flush=True); open('ready', 'w').close(); time.sleep(60)"
    proc = zygote.python_process(code, [], env=ENV, cwd=tmp_path)
    server = zygote.zygote_for(ENV)
    assert server is not None and proc.pid not in (os.getpid(), server.process.pid)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and out == f"{proc.pid}\n".encode()


def test_the_memory_cap_applies_to_the_run_only():
    code = "b = bytearray(3 * 2**30)"
    r = zygote.run_python(code, [], env=ENV, cap=2 * 2**30, timeout=60)
    assert r.returncode == 1 and b"MemoryError" in r.stderr
    r = zygote.run_python("import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])", [], env=ENV,
                          timeout=60)
    assert r.stdout.strip() == str(resource_infinity()).encode()


def resource_infinity() -> int:
    import resource

    return resource.RLIM_INFINITY


def test_hub_variables_are_read_by_each_run():
    """huggingface_hub reads HF_* at import: the zygote never imports it, so every run sees its own."""
    code = "from huggingface_hub import constants; print(constants.ENDPOINT)"
    for port in (1234, 4321):
        r = zygote.run_python(code, [], env={**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}, timeout=60)
        assert r.stdout.strip() == f"http://127.0.0.1:{port}".encode(), r.stderr.decode()


def test_a_run_that_changes_import_time_variables_is_refused():
    """A forked run cannot change what was read at import (thread pools): that needs another zygote."""
    server = zygote.zygote_for(ENV)
    assert server is not None
    with pytest.raises(ValueError, match="variables read at import"):
        server.spawn("pass", [], env={**ENV, "OMP_NUM_THREADS": "2"})


def test_torchrun_ranks_are_forks_of_the_zygote():
    """torchrun starts the cheap forwarder per rank; each rank runs as a fork, with torchrun's variables."""
    code = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.getppid())"
    r = zygote.torchrun(2, [], ENV, timeout=120, code=code)
    assert r.returncode == 0, r.stderr.decode()
    server = zygote.zygote_for(ENV)
    assert server is not None
    assert sorted(r.stdout.decode().split("\n")[:-1]) == [f"{rank} 2 {server.process.pid}" for rank in (0, 1)]
