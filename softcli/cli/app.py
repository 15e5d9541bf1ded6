"""The ``soft`` Typer app and the one place that turns exceptions into ``error:`` lines.

Each command lives in its own module and registers itself on :data:`app` when
imported (see :data:`COMMAND_MODULES`). Commands parse, call one library
function and render; they never print tracebacks: :func:`main` maps
:class:`~softcli.errors.SoftError` to ``error: ...`` on stderr with its exit
code (1 for failed work, 2 for usage), and ``--debug`` shows the traceback.
Ctrl-C ends with ``error: interrupted`` (130), SIGTERM with ``error: terminated``
(143), after ``finally`` blocks removed temporaries; so does a KeyboardInterrupt
raised inside the process (``_thread.interrupt_main``, an embedding program).
The vocabulary every command shares (options, short flags, units, size order)
is in ``softcli/cli/README.md``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import typer

try:  # typer >= 0.20 vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc  # type: ignore[no-redef]

from .. import __version__
from ..errors import SoftError

app = typer.Typer(
    name="soft",
    help="SOFT softmax-free vision transformers on images of any size.\n\n"
         "Example: [bold]soft classify photo.jpg[/bold]",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_group(name: str, help: str, example: str) -> typer.Typer:
    """A ``soft NAME SUBCOMMAND`` group registered on :data:`app`, with its one-line help and example."""
    group = typer.Typer(name=name, help=f"{help}\n\nExample: [bold]{example}[/bold]", rich_markup_mode="rich",
                        no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


#: Command modules, imported by :func:`main` so each can register on :data:`app`.
COMMAND_MODULES: tuple[str, ...] = ("classify", "features", "segment", "weights", "profile", "fit")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"softcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """SOFT softmax-free vision transformers on images of any size."""


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"softcli.cli.{name}")


def error_line(message: str) -> None:
    """One ``error: ...`` line on stderr; the only way commands report failures (file names made UTF-8)."""
    from ..io.inputs import safe_text

    text = safe_text(" ".join(str(message).split()))
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def split_debug(args: Sequence[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before a ``--`` (before or after the subcommand) → (the other args, True)."""
    end = list(args).index("--") if "--" in args else len(args)
    head, tail = list(args[:end]), list(args[end:])
    rest = [a for a in head if a != "--debug"]
    return rest + tail, len(rest) != len(head)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks remove temporary files as on Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


#: Exit status of an interrupted run (128 + SIGINT); no command exits with it for anything else.
INTERRUPTED_EXIT = 130


class Interrupted(BaseException):
    """Ctrl-C (SIGINT). Not a KeyboardInterrupt: Typer turns those into a silent exit 130."""


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is a plain KeyboardInterrupt
    raise Interrupted()


def _install(signum: int, handler: Callable[[int, FrameType | None], None]) -> Any:
    """Install ``handler`` unless the signal is ignored (nohup, a background job); the previous handler or None."""
    try:
        if signal.getsignal(signum) == signal.SIG_IGN:
            return None
        return signal.signal(signum, handler)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        return None


def main(argv: Sequence[str] | None = None) -> None:
    args, debug_flag = split_debug(sys.argv[1:] if argv is None else argv)
    debug = debug_flag or os.environ.get("SOFTCLI_DEBUG") == "1"
    if debug_flag:
        args = ["--debug", *args]  # the root option, so the app sees it in its usual place
    _register_commands()
    previous = _install(signal.SIGTERM, _on_sigterm)
    previous_int = _install(signal.SIGINT, _on_sigint)
    try:
        rv = app(args=args, prog_name="soft", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Terminated:
        error_line("terminated")
        sys.exit(143)
    except click_exc.UsageError as exc:
        if debug:
            raise
        hint = f" (see 'soft {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else " (see 'soft --help')"
        error_line(exc.format_message() + hint)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt, Interrupted):
        error_line("interrupted")
        sys.exit(INTERRUPTED_EXIT)
    except SoftError as exc:
        if debug:
            raise
        from .advice import with_advice

        error_line(with_advice(exc))
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        from ..resources import is_oom

        if is_oom(exc):  # an allocation the memory checks did not foresee (a ulimit, other processes)
            detail = " ".join(str(exc).split())[:200]
            error_line(f"out of memory ({detail}); lower --max-memory, --tile or --batch-size, or free memory "
                       "(run with --debug for the traceback)")
        else:
            error_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    if rv == INTERRUPTED_EXIT:  # Typer returns 130 for a KeyboardInterrupt raised in a command, silently
        error_line("interrupted")
    sys.exit(rv if isinstance(rv, int) else 0)
