"""The ``perpair`` command line: a thin layer over each stage's entry point.

Each stage's commands live in a module of this package and register themselves on ``app``.
Errors perpair knows how to explain are printed as one message and exit with status 2.
"""

# ruff: noqa: I001  (stage commands are imported in pipeline order, which is their order in --help)
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import typer
import typer.main
from rich.console import Console
from rich.text import Text

from perpair.errors import FailedOnMainProcess, PerpairError, StoppedBySignal
from perpair.signals import stop_on_signals

app = typer.Typer(
    name="perpair",
    help="Per-pair preference optimization: prepare pairs, plan per-pair beta/route/order, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)  # errors and progress
# Results. Off a terminal (piped, redirected) rich would assume 80 columns (or $COLUMNS) and cut tables to fit:
# there a table gets the width its cells need, up to PIPED_WIDTH.
PIPED_WIDTH = 200
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else PIPED_WIDTH)

EXIT_OK = 0
EXIT_USER_ERROR = 2      # bad input, options or environment: one `error:` line says what
EXIT_TOO_FEW_ANNOTATED = 3  # annotate / run: too few pairs got a valid annotation (see errors.TooFewAnnotated)
EXIT_INTERRUPTED = 130   # Ctrl-C; finished work is kept
# stopped by SIGTERM (143) or SIGUSR1 (138), 128 + the signal: a training after its step with a checkpoint
# (errors.TrainingStopped), other work where it was, keeping what it finished (errors.StoppedBySignal)


def given_path(option: str) -> Callable[[str | Path], Path]:
    """The ``parser`` of a path option: the path as typed. An empty one (``-o ''``, an unset variable in a script)
    is refused: ``Path('')`` is ``Path('.')``, and an empty path must never mean the current folder."""

    def parse(value: str | Path) -> Path:
        if isinstance(value, Path):  # the option's default
            return value
        if not value.strip():
            raise PerpairError(f"{option}: an empty path; give the path to write")
        return Path(value)

    return parse


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"perpair {version('perpair')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            out.print("perpair (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _options(ctx: typer.Context,
             version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print perpair's version and exit.")) -> None:
    """Per-pair preference optimization: prepare pairs, plan per-pair beta/route/order, train, evaluate."""
    one_process_only(ctx.invoked_subcommand)


def one_process_only(command: str | None) -> None:
    """Refuse any command but ``train`` under a launch of several processes (torchrun, accelerate launch set
    WORLD_SIZE): each process would do the whole work again into the same outputs (``perpair run``: the second
    one was refused as 'another perpair run' using the workdir, its own sibling). The first process says so; the
    others exit with it without a word."""
    processes = os.environ.get("WORLD_SIZE", "1")
    if command in (None, "train") or not processes.isdigit() or int(processes) <= 1:
        return
    if os.environ.get("RANK", "0") != "0":
        raise FailedOnMainProcess(EXIT_USER_ERROR)
    raise PerpairError(f"perpair {command} runs in one process, and this launch started {processes} (WORLD_SIZE of "
                       "torchrun / accelerate launch), each of which would do all its work again; only perpair train "
                       "takes several: run the other stages without a launcher, as examples/*/run.sh do")


# Stage commands register on `app` when imported (order = order in --help).
from perpair.cli import data as _data  # noqa: E402,F401
from perpair.cli import annotate as _annotate  # noqa: E402,F401
from perpair.cli import plan as _plan  # noqa: E402,F401
from perpair.cli import train as _train  # noqa: E402,F401
from perpair.cli import eval as _eval  # noqa: E402,F401
from perpair.cli import run as _run  # noqa: E402,F401
from perpair.cli import bench as _bench  # noqa: E402,F401


@functools.cache
def click_command() -> click.Command:
    """The command tree built from ``app`` (what ``app()`` builds on every call, ~20 ms), built once, so
    that tests can run the command line in-process many times at the cost of the command alone. Each command
    refuses an option given twice (Click keeps the last, without a word)."""
    root = typer.main.get_command(app)
    _refuse_repeated_options(root)
    return root


def _refuse_repeated_options(command) -> None:
    """Every command of the tree (groups take no option but ``--version``) refuses a single-valued option given twice,
    or with its opposite (``--lr 1e-5 … --lr 1e-6``, ``--shuffle … --no-shuffle``): one of the two would be dropped."""
    for sub in getattr(command, "commands", {}).values():
        _refuse_repeated_options(sub)
    if getattr(command, "commands", None) is not None:
        return
    names = {}
    for param in command.params:
        if param.param_type_name == "option" and not param.multiple and not getattr(param, "count", False):
            names.update({name: param.name for name in (*param.opts, *param.secondary_opts) if name.startswith("-")})
    parse = command.parse_args

    def parse_args(ctx, args):
        given: dict[str, str] = {}
        for token in args:
            if token == "--":
                break
            name = token.split("=", 1)[0] if token.startswith("--") else token
            if (param := names.get(name)) is not None:
                if param in given:
                    raise PerpairError(f"{given[param]} and {name} both given: one would be dropped without a word; "
                                       f"give the option once (see '{ctx.command_path} --help')")
                given[param] = name
        return parse(ctx, args)

    command.parse_args = parse_args


def main() -> None:
    """Run the command line. Whatever goes wrong, the user sees one ``error:`` line and an exit status
    (see EXIT_CODES), never a traceback. SIGTERM and SIGUSR1 (a job scheduler) stop it with one line and status
    128 + the signal, until that status is decided (a later copy of the signal does not end it without a word)."""
    with stop_on_signals():
        try:
            _command_line()
        except StoppedBySignal as exc:  # one that came while an error was being reported: its line, not a traceback
            _stopped(exc)


def _stopped(exc: StoppedBySignal) -> None:
    """What a scheduler asked, not an error: its line (once for a launch: every process stopped) and status."""
    if os.environ.get("RANK", "0") == "0":
        console.print(Text(str(exc)), soft_wrap=True)
    sys.exit(exc.exit_code)


def _command_line() -> None:
    try:
        try:
            # not standalone: a bad option or value comes here as an exception (Typer would draw a box around
            # it), Ctrl-C as Typer's status 130, a command's own typer.Exit as its status
            status = click_command().main(prog_name="perpair", standalone_mode=False)
        except typer.TyperException as exc:  # Typer's click: a usage error, a bad value
            if type(exc).__name__ == "NoArgsIsHelpError":  # `perpair` or `perpair eval` alone: the help
                exc.show()
                sys.exit(exc.exit_code)
            fail(usage_error(exc), exc.exit_code)
        except typer.Abort:  # end of input at a prompt
            fail("input ended")
        if status == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if isinstance(status, int) and status != EXIT_OK:
            sys.exit(status)
    except FailedOnMainProcess as exc:  # another process of the launch, whose main process prints the error:
        # not gone first, so that the launcher does not stop the main process before it has printed; the launcher
        # ends this one with SIGTERM once the main one has exited: with the main one's status, without a word
        with contextlib.suppress(StoppedBySignal):
            time.sleep(3)
        sys.exit(exc.exit_code)
    except StoppedBySignal as exc:  # (a training's too: TrainingStopped)
        _stopped(exc)
    except PerpairError as exc:
        fail(str(exc), getattr(exc, "exit_code", EXIT_USER_ERROR))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished work is kept; re-run to continue")
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        # Permission denied, a folder where a file was expected, a full disk: name the path and the reason.
        where = exc.filename or ""
        reason = exc.strerror or str(exc)
        fail(f"{where}: {reason}" if where else reason)
    except RecursionError:
        fail("the input is nested too deeply to read")
    except UnicodeError as exc:
        fail(f"text encoding: {exc}")


def usage_error(exc: typer.TyperException) -> str:
    """Click's message for a bad option or value, with the command whose ``--help`` lists what it takes."""
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return exc.format_message()
    return f"{exc.format_message()} (see '{ctx.command_path} --help')"


def fail(message: str, status: int = EXIT_USER_ERROR) -> None:
    """Print ``error: MESSAGE`` on one line and exit with ``status`` (2: the user's input). The message is
    printed as plain text: it holds user-derived strings (paths, field names, row content) that rich would
    read as markup."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(message.splitlines())), soft_wrap=True)
    sys.exit(status)
