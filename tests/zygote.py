"""Run ``soft`` as real processes forked from one warm process, for the tests that need a process.

A test that caps memory (``RLIMIT_AS``), kills a run part-way or sends it a
signal needs a process of its own, but not a fresh interpreter: starting
Python and importing torch and softcli costs ~1.3 s of CPU per run. The
*zygote* is one helper process per session (per set of import-time thread
variables) that has imported torch and softcli's CLI and task modules and
then only waits; each run is a ``fork()`` of it that sets up its own stdin/
stdout/stderr, working directory, environment, rlimits and signal handlers,
runs :func:`softcli.cli.app.main` and exits with its status. The child is a
real process: its own PID, exit status (negative when a signal killed it),
signals delivered by ``kill``; only interpreter start-up is shared.

Fork safety: the zygote never runs a tensor operation (torch creates its
intra-op thread pool lazily, on the first parallel op) and it is started with
``OPENBLAS_NUM_THREADS=1``, so numpy's OpenBLAS starts no thread either
(:func:`zygote_for`): it checks it has
exactly one thread before serving, and refuses to start otherwise (a forked
child gets only the forking thread, so locks held by another thread would stay
held forever in the child).

Any ``python -c CODE ARGS`` can run this way (:func:`run_python`); ``soft ARGS``
is one such code (:data:`SOFT_MAIN`). Linux only (``fork``, ``pidfd_open``,
``SCM_RIGHTS``); elsewhere runs fall back to a plain ``python -c`` subprocess
doing the same. A zygote serves one set of import-time variables
(:data:`IMPORT_TIME_PREFIXES`); another set starts another zygote.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]

#: Variables read once, at import or library load (thread pools, the allocator, the interpreter): a zygote
#: serves only runs whose values of these equal its own, since a forked child cannot change them any more.
#: (The Hub client's HF_* variables are not among them: the zygote never imports huggingface_hub, so each
#: forked run imports it afresh under its own environment, as a new process would.)
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "PYTHON", "LD_", "MALLOC_", "TORCH_",
                        "CUDA_", "PYTORCH_")
#: ... except these, read only when used (torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING for its ranks).
_READ_WHEN_USED = ("TORCH_NCCL_",)
#: Imported by the zygote before it forks: what ``soft classify|features|segment`` imports.
PRELOAD = ("torch", "numpy", "PIL.Image", "tifffile", "safetensors.torch", "softcli", "softcli.cli.app",
           "softcli.classify", "softcli.features", "softcli.segment", "softcli.engine", "softcli.cluster",
           "softcli.checkpoint", "softcli.io.readers", "softcli.io.writers", "softcli.context.run")
#: What ``soft ARGS`` is, as ``python -c`` code (the arguments are ``sys.argv[1:]``).
SOFT_MAIN = "import sys; from softcli.cli.app import main; main(sys.argv[1:])"
#: A fresh interpreter's version of the cap a forked run sets before running its code (the fallback).
_CAP_PREFIX = "import resource; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE


def import_time_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(IMPORT_TIME_PREFIXES) and not k.startswith(_READ_WHEN_USED)))


def supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "fork") and hasattr(os, "pidfd_open") \
        and hasattr(socket, "send_fds")


# -- the client side (in pytest) -----------------------------------------------------------------

class ForkedProcess:
    """A :class:`subprocess.Popen`-like handle on one forked run (``pid``, ``poll``, ``wait``,
    ``send_signal``, ``kill``, ``communicate``); stdout/stderr, when captured, go to temporary files,
    so a run that writes a lot never blocks on a full pipe."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket, outputs: dict[str, IO[bytes] | None]):
        self.args, self.pid, self._conn, self._outputs = args, pid, conn, outputs
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._receive_status()
            except BlockingIOError:
                pass
            finally:
                if self.returncode is None:
                    self._conn.setblocking(True)
        return self.returncode

    def _receive_status(self) -> None:
        data = self._conn.recv(4096)
        if not data:
            raise RuntimeError(f"the zygote ended before reporting on pid {self.pid}")
        report = json.loads(data)
        self.returncode = os.waitstatus_to_exitcode(int(report["status"]))
        _account(report["cpu"])
        self._conn.close()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._receive_status()
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended in the meantime (as Popen.send_signal)
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _read(self, name: str) -> bytes | None:
        fh = self._outputs.get(name)
        if fh is None:
            return None
        fh.seek(0)
        data = fh.read()
        fh.close()
        self._outputs[name] = None
        return data

    def communicate(self, timeout: float | None = None) -> tuple[bytes | None, bytes | None]:
        self.wait(timeout)
        return self._read("stdout"), self._read("stderr")


class Zygote:
    """One warm process that forks a child per run (see the module docstring)."""

    def __init__(self, env: dict[str, str], serves: tuple[tuple[str, str], ...] | None = None):
        """Start a zygote in ``env``; it serves runs whose :func:`import_time_key` is ``serves`` (default:
        ``env``'s own)."""
        self.env = dict(env)
        self.serves = import_time_key(env) if serves is None else serves
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._folder = tempfile.TemporaryDirectory(prefix="soft-zygote-")
        self.listen_path = os.path.join(self._folder.name, "socket")
        fd = theirs.fileno()
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.zygote import serve; "
                f"serve({fd}, {self.listen_path!r}, {json.dumps(self.serves)!r})")
        # Its own session: the runner's Ctrl-C goes to the runner, not to the zygote or a run in flight.
        self.process = subprocess.Popen([sys.executable, "-c", code], env=self.env, cwd=REPO,
                                        pass_fds=[fd], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        ready = self._sock.recv(4096)  # the zygote says it is ready (or why not) once its imports are done
        if not ready:
            self.process.wait(timeout=30)
            raise RuntimeError(f"the zygote did not start (exit status {self.process.returncode})")
        info = json.loads(ready)
        if "error" in info:
            self.close()
            raise RuntimeError(f"the zygote refused to start: {info['error']}")
        self.threads: int = info["threads"]
        _account(info["cpu"])  # its start-up: what each fresh interpreter would have paid

    def spawn(self, code: str, args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
              cap: int | None = None, stdin: bytes | None = None, stdout: int | None = PIPE,
              stderr: int | None = PIPE) -> ForkedProcess:
        """Fork a run of ``python -c CODE ARGS``; ``stdout``/``stderr``: PIPE (captured), DEVNULL or None
        (this process's own)."""
        env = dict(self.env if env is None else env)
        if import_time_key(env) != self.serves:
            raise ValueError("this environment changes variables read at import: start a zygote with it")
        files: dict[str, IO[bytes] | None] = {}
        fds: list[int] = []
        stdin_file = tempfile.TemporaryFile()
        stdin_file.write(stdin or b"")
        stdin_file.seek(0)
        fds.append(stdin_file.fileno())
        devnull = None
        for name, how in (("stdout", stdout), ("stderr", stderr)):
            if how == PIPE:
                files[name] = tempfile.TemporaryFile()
                fds.append(files[name].fileno())  # type: ignore[union-attr]
            elif how == DEVNULL:
                devnull = devnull if devnull is not None else os.open(os.devnull, os.O_WRONLY)
                fds.append(devnull)
            else:
                fds.append(1 if name == "stdout" else 2)  # this process's own
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = {"code": code, "args": args, "cwd": str(cwd or os.getcwd()), "env": env, "cap": cap}
        try:
            socket.send_fds(self._sock, [json.dumps(request).encode()], [theirs.fileno(), *fds])
        finally:
            theirs.close()
            stdin_file.close()
            if devnull is not None:
                os.close(devnull)
        line = b""
        while not line.endswith(b"\n"):
            chunk = ours.recv(1)
            if not chunk:
                raise RuntimeError("the zygote ended without starting the run")
            line += chunk
        return ForkedProcess([sys.executable, "-c", code, *args], int(json.loads(line)["pid"]), ours, files)

    def run(self, code: str, args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            cap: int | None = None, input: bytes | None = None, timeout: float | None = None
            ) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(..., capture_output=True)``: run to the end (killed after ``timeout`` s)."""
        proc = self.spawn(code, args, cwd=cwd, env=env, cap=cap, stdin=input)
        try:
            out, err = proc.communicate(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)  # type: ignore[arg-type]

    def forward_env(self, env: dict[str, str], code: str = SOFT_MAIN) -> dict[str, str]:
        """``env`` plus where :func:`forward` finds this zygote and the code it asks for (for a launcher that
        starts :data:`FORWARD`)."""
        return {**env, SOCKET_ENV: self.listen_path, CODE_ENV: code}

    def close(self) -> None:
        self._sock.close()  # the zygote ends when its socket closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._folder.cleanup()


_ZYGOTES: dict[tuple[tuple[str, str], ...], Zygote | None] = {}
_CPU_SECONDS = [0.0]


def _account(seconds: float) -> None:
    _CPU_SECONDS[0] += seconds


def cpu_seconds() -> float:
    """CPU time (user + sys) of the zygotes' start-up and of every forked run that ended: processes the test
    runner does not reap itself, so ``RUSAGE_CHILDREN`` does not count them (``--cpu-durations`` adds this)."""
    return _CPU_SECONDS[0]


def zygote_for(env: dict[str, str]) -> Zygote | None:
    """The session's zygote for this environment's import-time variables (started on first use), or None
    where forking is not supported or the zygote could not start (callers then start a fresh interpreter).

    The zygote is started with ``OPENBLAS_NUM_THREADS=1`` unless ``env`` sets it (numpy's BLAS would otherwise
    start threads at import, and a process with threads cannot fork safely); its runs still see exactly
    ``env``, and torch's own thread pool is untouched (sized from ``env`` as usual, in each run)."""
    if not supported():
        return None
    key = import_time_key(env)
    if key not in _ZYGOTES:
        try:
            _ZYGOTES[key] = Zygote({"OPENBLAS_NUM_THREADS": "1", **env}, serves=key)
        except RuntimeError as exc:
            print(f"tests/zygote.py: {exc}; these runs start fresh interpreters", file=sys.stderr)
            _ZYGOTES[key] = None
    return _ZYGOTES[key]


@atexit.register
def _close_all() -> None:
    for zygote in _ZYGOTES.values():
        if zygote is not None:
            zygote.close()
    _ZYGOTES.clear()


def _fresh_argv(code: str, args: list[str], cap: int | None) -> list[str]:
    """``python -c CODE ARGS`` for a fresh interpreter, capping its address space first when ``cap`` is set."""
    prefix = _CAP_PREFIX.format(cap=cap) if cap is not None else ""
    return [sys.executable, "-c", prefix + code, *args]


def python_process(code: str, args: list[str | os.PathLike[str] | bytes], *, env: dict[str, str],
                   cwd: Path | str | None = None, cap: int | None = None, stdout: int | None = PIPE,
                   stderr: int | None = PIPE) -> ForkedProcess | subprocess.Popen:
    """Start ``python -c CODE ARGS`` in ``env`` and ``cwd``, capped at ``cap`` bytes of address space: forked
    from the zygote where it can serve ``env``, else a fresh interpreter. The handle is Popen-like either
    way; SIGINT in the run acts as Ctrl-C in a terminal."""
    str_args = [os.fsdecode(a) for a in args]
    zygote = zygote_for(env)
    if zygote is not None:
        return zygote.spawn(code, str_args, cwd=cwd, env=env, cap=cap, stdout=stdout, stderr=stderr)
    return subprocess.Popen(_fresh_argv(code, str_args, cap), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, preexec_fn=_default_sigint)


def run_python(code: str, args: list[str | os.PathLike[str] | bytes], *, env: dict[str, str],
               cwd: Path | str | None = None, cap: int | None = None, timeout: float | None = None,
               input: bytes | None = None) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, "-c", CODE, *ARGS], capture_output=True)`` (see :func:`python_process`)."""
    str_args = [os.fsdecode(a) for a in args]
    zygote = zygote_for(env)
    if zygote is not None:
        return zygote.run(code, str_args, cwd=cwd, env=env, cap=cap, timeout=timeout, input=input)
    return subprocess.run(_fresh_argv(code, str_args, cap), capture_output=True, cwd=cwd, env=env,
                          timeout=timeout, input=input, preexec_fn=_default_sigint)


def soft_process(args: list[str | os.PathLike[str] | bytes], **kwargs: Any) -> ForkedProcess | subprocess.Popen:
    """Start ``soft ARGS`` in a process of its own (keywords as :func:`python_process`)."""
    return python_process(SOFT_MAIN, args, **kwargs)


def run_soft_process(args: list[str | os.PathLike[str] | bytes], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``soft ARGS`` to the end in a process of its own, capturing output (keywords as :func:`run_python`)."""
    return run_python(SOFT_MAIN, args, **kwargs)


def _default_sigint() -> None:
    """Ctrl-C acts as in a terminal, even when the test runner was started in the background (a
    non-interactive shell starts background jobs with SIGINT ignored, and softcli rightly keeps an
    inherited ignore, as under nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- the zygote side ---------------------------------------------------------------------------

def serve(control_fd: int, listen_path: str, serves: str) -> None:
    """The zygote's loop: import, check it is single-threaded, then fork one child per request and report
    each child's wait status on the request's own socket when it ends.

    Requests come from the test runner (``control_fd``) and from :func:`forward` (connections to
    ``listen_path``); ``serves`` is the JSON of the import-time variables runs must have (else refused)."""
    import importlib
    import select

    control = socket.socket(fileno=control_fd)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a module renamed since: the run imports what it needs, as a fresh one would
            pass
    from softcli.cli.app import _register_commands

    _register_commands()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        control.sendall(json.dumps({"error": f"{threads} threads after the imports; fork would be unsafe"}).encode())
        return
    if "huggingface_hub" in sys.modules:  # it reads HF_* at import: each run must import it under its own env
        control.sendall(json.dumps({"error": "huggingface_hub was imported before forking"}).encode())
        return
    import resource

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(8)
    key = [list(kv) for kv in json.loads(serves)]
    own = resource.getrusage(resource.RUSAGE_SELF)
    control.sendall(json.dumps({"threads": threads, "cpu": own.ru_utime + own.ru_stime}).encode())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner's Ctrl-C is for the runner; children reset it
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, report socket)
    while True:
        ready, _, _ = select.select([control.fileno(), listener.fileno(), *children], [], [])
        for fd in ready:
            if fd in (control.fileno(), listener.fileno()):
                conn = control if fd == control.fileno() else listener.accept()[0]
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
                except ConnectionResetError:
                    msg, fds = b"", []
                if conn is not control:
                    conn.close()
                if not msg:
                    if conn is control:  # the test session ended: leave the children to finish on their own
                        return
                    continue
                report = socket.socket(fileno=fds[0])
                request = json.loads(msg)
                if [list(kv) for kv in import_time_key(request["env"])] != key:
                    report.sendall(json.dumps({"error": "variables read at import differ"}).encode() + b"\n")
                    report.close()
                    for fd_ in fds[1:]:
                        os.close(fd_)
                    continue
                keep = [control, listener, *(sock for _, sock in children.values()), report]
                pid = _fork_run(request, fds[1:], keep)
                for fd_ in fds[1:]:
                    os.close(fd_)
                report.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[os.pidfd_open(pid)] = (pid, report)
            else:
                pid, report = children.pop(fd)
                _, status, usage = os.wait4(pid, 0)
                os.close(fd)
                try:
                    report.sendall(json.dumps({"status": status, "cpu": usage.ru_utime + usage.ru_stime}).encode())
                except OSError:
                    pass  # the test no longer listens
                report.close()


#: Where :func:`forward` finds its zygote, and the code it runs (set by :meth:`Zygote.forward_env`).
SOCKET_ENV, CODE_ENV = "SOFTCLI_TEST_ZYGOTE", "SOFTCLI_TEST_ZYGOTE_CODE"
#: ``python -c`` code that runs ``soft ARGS`` as a fork of the zygote named in ``SOFTCLI_TEST_ZYGOTE``.
FORWARD = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.zygote import forward; forward()"


def forward() -> None:
    """Be ``python -c CODE ARGS`` (CODE from ``SOFTCLI_TEST_ZYGOTE_CODE``, ARGS ``sys.argv[1:]``) by asking the
    zygote for a fork with this process's stdin/stdout/stderr, directory and environment, passing on
    SIGTERM/SIGINT/SIGHUP, and ending as it ends (its exit status, or death by the same signal). A launcher
    such as torchrun then starts this cheap process (no torch import) where it would start a fresh
    interpreter. If the zygote cannot serve this environment, become a fresh interpreter running CODE."""
    args, code = sys.argv[1:], os.environ[CODE_ENV]
    request = {"code": code, "args": args, "cwd": os.getcwd(), "env": dict(os.environ), "cap": None}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.environ[SOCKET_ENV])
        socket.send_fds(sock, [json.dumps(request).encode()], [theirs.fileno(), 0, 1, 2])
    theirs.close()
    line = b""
    while not line.endswith(b"\n"):
        chunk = ours.recv(1)
        if not chunk:
            break
        line += chunk
    reply = json.loads(line) if line else {"error": "no answer"}
    if "error" in reply:
        os.execv(sys.executable, [sys.executable, "-c", code, *args])
    pid = int(reply["pid"])
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
    data = ours.recv(4096)
    status = os.waitstatus_to_exitcode(int(json.loads(data)["status"])) if data else 1
    if status < 0:  # die of the same signal
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        time.sleep(1)
    sys.exit(status)


def _fork_run(request: dict[str, Any], fds: list[int], close_in_child: list[socket.socket]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sock in close_in_child:
            sock.close()
        code = _child(request, fds)
    finally:
        os._exit(code)


def _child(request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become ``python -c CODE ARGS`` as a fresh interpreter would run it; the status."""
    import resource
    import traceback

    import torch

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter installs
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cap"] is not None:
        resource.setrlimit(resource.RLIMIT_AS, (request["cap"], request["cap"]))
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = ["-c", *request["args"]]
    try:
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as the interpreter does: the traceback, then die of SIGINT
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        code = 130
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    _finish()
    return code


def _finish() -> None:
    """Interpreter shutdown, as far as a test can see it: join threads, run atexit handlers, flush."""
    import atexit as atexit_
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit_._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def torchrun(nproc: int, args: list[str | os.PathLike[str]], env: dict[str, str], timeout: float = 600,
             code: str = SOFT_MAIN) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m softcli ARGS`` (or ``python -c CODE ARGS``), captured.

    The launcher is the real one; each rank it starts is :data:`FORWARD` (``--no-python``), which runs as a
    fork of the zygote (a fresh interpreter where there is none, or where torchrun's variables change an
    import-time one). The ranks' CPU time is the zygote's, not counted per test by ``--cpu-durations``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "--no-python", sys.executable, "-c"]
    str_args = [os.fsdecode(a) for a in args]
    zygote = zygote_for(env)
    if zygote is None:
        cmd, run_env = [*launcher, code, *str_args], env
    else:
        cmd, run_env = [*launcher, FORWARD, *str_args], zygote.forward_env(env, code)
    return subprocess.run(cmd, env=run_env, capture_output=True, timeout=timeout, check=False)
