"""Kill a real ``soft`` run part-way, for the resume tests (tile bands and global layer passes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.synthetic import ONE_THREAD_ENV


def one_thread_env() -> dict[str, str]:
    """The environment of a killed run: this checkout's softcli, one thread, no --debug from the outside."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **ONE_THREAD_ENV}
    env.pop("SOFTCLI_DEBUG", None)
    return env


def kill_after_recorded(args: list[str], state: Path, count: int, cwd: Path, timeout: float = 300) -> int:
    """Start ``soft ARGS``; SIGKILL it once ``count`` steps (bands or passes) are recorded in ``state/done``.

    Returns how many were recorded when it died (a step may finish between the check and the kill)."""
    proc = subprocess.Popen([sys.executable, "-m", "softcli", *args], env=one_thread_env(), cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ((state / "done").is_dir() and len(list((state / "done").glob("*.json"))) >= count):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, f"{count} steps were not recorded in {timeout:.0f} s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return len(list((state / "done").glob("*.json")))
