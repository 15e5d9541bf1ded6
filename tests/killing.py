"""Kill a real ``soft`` run part-way, for the resume tests (tile bands and global layer passes).

The run is a process of its own, forked from the session's warm zygote (tests/zygote.py), so SIGKILL
hits a real process without each test paying the interpreter and torch start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from softcli.band_state import state_folder
from tests.conftest import REPO, run_soft
from tests.synthetic import ONE_THREAD_ENV
from tests.zygote import soft_process


def one_thread_env() -> dict[str, str]:
    """The environment of a killed run: this checkout's softcli, one thread, no --debug from the outside."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **ONE_THREAD_ENV}
    env.pop("SOFTCLI_DEBUG", None)
    return env


def kill_after_recorded(args: list[str], state: Path, count: int, cwd: Path, timeout: float = 300) -> int:
    """Start ``soft ARGS``; SIGKILL it once ``count`` steps (bands or passes) are recorded in ``state/done``.

    Returns how many were recorded when it died (a step may finish between the check and the kill)."""
    proc = soft_process(args, env=one_thread_env(), cwd=cwd, stdout=subprocess.DEVNULL)
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


def clean_then_killed(common: list[str], clean_out: Path, out: Path, count: int, cwd: Path
                      ) -> tuple[subprocess.CompletedProcess, int]:
    """``soft COMMON --out CLEAN_OUT --no-resume`` to compare with, then ``soft COMMON --out OUT`` killed
    once ``count`` steps are recorded: (the clean run, the steps recorded); the output is not there yet."""
    clean = run_soft(*common, "--out", clean_out, "--no-resume", env=ONE_THREAD_ENV)
    assert clean.returncode == 0, clean.stderr.decode()
    done = kill_after_recorded([*common, "--out", str(out)], state_folder(out), count, cwd)
    assert not out.exists()
    return clean, done
