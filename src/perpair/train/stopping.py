"""A run stopped by its job scheduler (SLURM preemption or time limit, Kubernetes eviction, ``timeout``,
``scancel``: SIGTERM; SLURM's ``--signal=USR1@SECONDS``: SIGUSR1 ahead of it) keeps its last step: the loop
finishes the step, every process saves the checkpoint of that step, and the run exits
``128 + the signal's number`` (143 for SIGTERM, 138 for SIGUSR1, as a shell reports a process a signal ended),
so that no scheduler takes it for a finished run."""

from __future__ import annotations

import signal
import threading
from contextlib import ExitStack

import torch

from perpair.errors import TrainingStopped
from perpair.signals import STOP_SIGNALS, note, raise_again, unswallowed


class StopSignals:
    """SIGTERM and SIGUSR1 during a run. Before :meth:`defer` (tokenizing, loading, the reference pass: nothing to
    save yet) the first stops it at once; after it they are only noted in :attr:`received`, for the loop to stop at
    the end of the step. A second one is only noted too: what the first one's stop is saving (the checkpoint, the
    reference log-probs) is finished. The previous handlers come back on exit, told of the signal
    (:func:`perpair.signals.note`: a later copy stops nothing again). Signal handlers can be set on the main thread
    alone: elsewhere (an arm of ``perpair run`` in a thread) the process's own stay."""

    def __init__(self) -> None:
        self.received = 0  # the first signal's number; 0: none
        self._deferred = False
        self._previous: dict[int, object] = {}
        self._hook = ExitStack()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            self._hook.enter_context(unswallowed())  # (a stop raised in a __del__)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._hook.close()

    def defer(self) -> None:
        self._deferred = True

    def _handle(self, signum: int, frame) -> None:
        if not self._deferred:
            raise_again()
        first = not self.received
        self.received = self.received or signum
        note(signum)
        if first and not self._deferred:
            raise TrainingStopped(f"stopped by {signal.Signals(signum).name} before training (tokenizing, loading, "
                                  "the reference pass); rerun with --resume to continue", signum)


def agreed(accelerator, received: int, due: bool) -> tuple[int, bool]:
    """The stop signal (0: none) and whether a timed checkpoint is due, the same on every process, so that they all
    stop, or save, after the same step: a signal may reach one process alone, and each process's clock would decide
    a little apart. The largest signal any process received, the main process's clock. One all-reduce of two
    numbers a step, next to the step's own."""
    if accelerator.num_processes == 1:
        return received, due
    values = torch.tensor([received, int(due and accelerator.is_main_process)], device=accelerator.device)
    received, due = accelerator.reduce(values, reduction="max").tolist()
    return int(received), bool(due)
