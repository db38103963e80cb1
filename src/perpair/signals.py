"""SIGTERM and SIGUSR1 (a job scheduler: SLURM's preemption, time limit or ``scancel``, a Kubernetes eviction,
``timeout``; SLURM's ``--signal=USR1@SECONDS`` ahead of them) outside a training: the work stops where it is, as
Ctrl-C stops it, keeping what it finished (annotation and evaluation commit every answer as it comes, the reference
pass saves what it computed), and the command exits with one line and ``128 + the signal's number``, never 0. A
training takes the signals over while it runs (:class:`perpair.train.stopping.StopSignals`: it stops after its
step, with a checkpoint)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from perpair.errors import StoppedBySignal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
received = 0  # the process's first stop signal, whoever handled it; 0: none
_again: StoppedBySignal | None = None  # a stop Python swallowed, for the next handler to raise: see unswallowing


def note(signum: int) -> bool:
    """Note a stop signal; whether it is the process's first. Only the first stops anything: ``scancel`` signals
    every process of a job, ``perpair run`` forwards the signal to its workers and torchrun to its processes, and a
    second copy must not cut short what the first one's stop is finishing (a checkpoint, reference log-probs)."""
    global received
    first = not received
    received = received or signum
    return first


def stopped(signum: int) -> StoppedBySignal:
    return StoppedBySignal(f"stopped by {signal.Signals(signum).name}: finished work is kept; re-run to continue",
                           signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, the first SIGTERM or SIGUSR1 raises :class:`StoppedBySignal` where the main thread is; the previous
    handlers come back after. (Handlers are the main thread's to set: from another thread, nothing changes.)"""
    global received, _again
    received, _again = 0, None
    main = threading.current_thread() is threading.main_thread()
    previous = {number: signal.signal(number, _stop) for number in STOP_SIGNALS} if main else {}
    try:
        with unswallowed():
            yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop(signum: int, frame) -> None:
    raise_again()
    if note(signum):
        raise stopped(signum)


@contextmanager
def unswallowed() -> Iterator[None]:
    """Inside, :func:`unswallowing`'s hook over the process's own; that one back after (unless another was set
    over it meanwhile, which keeps passing other unraisables on)."""
    hook = sys.unraisablehook = unswallowing(sys.unraisablehook)
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = hook.previous


def unswallowing(previous):
    """An ``unraisablehook`` (over ``previous``) for a stop that a handler raised where Python cannot raise: the
    signal came during a ``__del__`` (the regex module's, as a tokenizer loads) or a weakref callback. Python
    swallowed it, printing 'Exception ignored in …' and a traceback, and the work went on as if no signal had
    come (the first one is the one that stops). The signal comes again a moment later, to the main thread, whose
    handler raises the stop (:func:`raise_again`) where the work is then. (Not at once: its handler would run in
    this hook, where the stop is swallowed again.)"""

    def hook(unraisable) -> None:
        global _again
        if not isinstance(unraisable.exc_value, StoppedBySignal):
            return previous(unraisable)
        _again = unraisable.exc_value
        threading.Timer(0.01, _send_again, (_again,)).start()

    hook.previous = previous
    return hook


def _send_again(stop: StoppedBySignal) -> None:
    """The signal of ``stop`` again to the main thread, if no copy of it raised the stop yet and a handler still
    takes it. Not once the work is over and the default handlers are back (a command's status decided): the
    signal killed the process, without a word, after it had done its work."""
    signum = stop.exit_code - 128
    if _again is stop and signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.pthread_kill(threading.main_thread().ident, signum)


def raise_again() -> None:
    """(First in a stop handler that raises.) The stop Python swallowed (:func:`unswallowing`), raised now."""
    global _again
    if _again is not None:
        stop, _again = _again, None
        raise stop
