"""Stages side by side: ``perpair run`` with ``workers: N`` keeps up to N stages running, each in a worker process.

On a CPU two stages with one core each finish sooner than the same stages one after the other with two cores
each: a small model's work (attention over short rows, elementwise kernels, generating token by token) gains
well under 2× from a second thread, and the local teacher scores with one (README, "The whole job: `perpair
run`": 0.79× the wall time of the demo's job on 2 cores, benchmarks/run_workers.py). So the
run's independent work goes through a pool of N spawned processes (nothing of the run's own process is shared),
each with cores / N PyTorch threads: the annotation pass beside the reference pass the arms share and the base
model's evaluation, then the arms, each arm's training and evaluations in order, N stages at a time.

The run's own process stays the one that decides: it checks and writes the stamps and starts each stage's work
(a module-level function and picklable arguments, called with a ``log``). What a worker logs comes back to the
run's log, named by its stage. A stage that fails stops new stages from starting; the running ones finish (their
work is kept) and the first failure is the error the run reports. A worker dies with the run (Linux), so a killed
run never leaves one writing into its workdir; SIGTERM or SIGUSR1 (a job scheduler) to the run goes to every worker
instead, whose stage stops as in the run's own process (a training after its step, with a checkpoint), and the run
waits for them. ``workers: 1`` runs everything in the run's process, in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from perpair import signals
from perpair.errors import PerpairError, StoppedBySignal

Log = Callable[[str], None]

CHAIN_THREADS = 10_000  # more than any run's chains (each waits on a worker process, or on another chain)
_log_queue = None  # in a worker process: where its stages' log lines go
_in_stage = False  # in a worker process: whether a stage runs (a stop signal stops it)


class Stopped(PerpairError):
    """A stage not started because another one failed (that one is the run's error) or the run was stopped."""


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """``side(chain, ...)`` runs a chain of stages beside the others; inside it, ``call(name, why, action, ...)``
    runs one stage's work in a worker process. With one worker both run at once, in the caller's process."""

    def __init__(self, workers: int, log: Log):
        self.workers, self.log = workers, log
        self.threads = max(1, available_cores() // workers)  # PyTorch threads of each worker process
        self._errors: list[BaseException] = []
        self._stop = threading.Event()
        self.signalled = 0  # the stop signal the run got while its workers ran; 0: none
        self._noted = signals.received  # (one worker) the stop signal noted before: see _stop_noted
        self._sides: list[Future] = []  # every chain started

    def __enter__(self) -> Workers:
        if self.workers > 1:
            import multiprocessing

            from perpair.preload import children_preloaded

            with contextlib.ExitStack() as stack:
                stack.enter_context(children_preloaded())  # the workers preload what the run does (tcmalloc & co., MKL)
                context = multiprocessing.get_context("spawn")
                _start_resource_tracker()
                self._queue = context.SimpleQueue()
                self._processes = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                                      initargs=(self._queue, self.threads, os.getpid()))
                # A thread per chain waiting (threads start only when none is idle): a chain waits for the chains it
                # starts (an arm's for its held-out evaluation), so a bound (the default: cores + 4) let as many arms
                # take every thread, each waiting for a chain queued behind them, and the run hung
                self._chains = ThreadPoolExecutor(max_workers=CHAIN_THREADS, thread_name_prefix="perpair-chain",
                                                  initializer=_block_stop_signals)
                self._printed = threading.Event()
                self._printer = threading.Thread(target=self._print, name="perpair-log", daemon=True)
                self._printer.start()
                if threading.current_thread() is threading.main_thread():  # (where handlers can be set)
                    previous = {number: signal.signal(number, self._forward) for number in signals.STOP_SIGNALS}
                    stack.callback(lambda: [signal.signal(number, h) for number, h in previous.items()])
                self._environment = stack.pop_all()  # put back in __exit__
        return self

    def side(self, chain: Callable[..., Any], *args) -> Future:
        """``chain(*args)`` (stages in order) beside the other chains; with one worker, now."""
        if self.workers == 1:
            done: Future = Future()
            done.set_result(chain(*args))
            return done
        done = self._chains.submit(self._chain, chain, *args)
        self._sides.append(done)
        return done

    def call(self, name: str, why: str, action: Callable[..., Any], *args) -> tuple[Any, float]:
        """``action(*args, log=…)``, logged as stage ``name`` running for ``why``; returns its result and seconds."""
        if self.workers == 1:
            self._stop_noted()
            return _timed(name, why, action, args, self.log)
        if self._stop.is_set() or self.signalled:
            raise Stopped(f"{name}: not started, as another stage failed or the run was stopped")
        try:
            done = self._processes.submit(_in_worker, name, why, action, args)
            if self.signalled:  # it came as the pool started a worker for this stage, maybe after _forward's list
                self._signal_workers(self.signalled)
            return done.result()
        except BrokenProcessPool:  # a worker killed (the out-of-memory killer, by hand) or crashed: the pool is gone
            raise PerpairError(f"{name}: a worker process of the run died abruptly (killed, e.g. by the "
                               "out-of-memory killer, or crashed); finished stages are kept: re-run to continue"
                               ) from None

    def __exit__(self, kind, exc, traceback) -> bool:
        if self.workers == 1:
            if exc is None:
                self._stop_noted()
            return False
        if exc is not None:
            self._stop.set()
        if isinstance(exc, KeyboardInterrupt):  # the workers ignore Ctrl-C: the run stops them (as a SIGTERM does)
            for process in self._worker_processes():
                process.terminate()
        # running stages finish; chains start nothing new once stopped. The chains' threads end after the workers:
        # a worker dies with the thread that started it (PR_SET_PDEATHSIG), and one whose chain was over (a stage
        # that failed, or stopped by a signal) was killed running another chain's stage ("died abruptly")
        while not all(side.done() for side in self._sides):  # (a chain may start another)
            wait(self._sides)
        self._processes.shutdown(wait=True, cancel_futures=True)
        self._chains.shutdown(wait=True)
        self._printed.set()  # not a sentinel put on the queue: a worker killed while writing a line holds its lock
        self._printer.join()
        self._queue.close()
        self._environment.close()
        if isinstance(exc, KeyboardInterrupt):
            return False
        first = next((e for e in self._errors if not isinstance(e, (Stopped, StoppedBySignal))), None)
        if first is not None and first is not exc:
            raise first
        stops = [e for e in self._errors if isinstance(e, StoppedBySignal)]  # (a training's: TrainingStopped)
        if first is None and (stops or self.signalled) and stops != [exc]:
            # a line for each stage the signal stopped (what it kept), or the run's own if it stopped none
            lines = [str(e) for e in stops] or [str(signals.stopped(self.signalled))]
            raise StoppedBySignal("\n".join(lines), self.signalled or stops[0].exit_code - 128)
        return False

    def _forward(self, signum: int, frame) -> None:
        """SIGTERM / SIGUSR1 to the run (a scheduler, ``timeout``, ``kill``): no stage starts any more, and the
        signal goes to every worker, whose stage stops as in the run's own process (a training after its step, with
        a checkpoint); the run waits for them. Its default, ending the run, killed them with it (PR_SET_PDEATHSIG),
        a checkpoint half written. Once: a copy (``scancel`` also signals the workers) changes nothing."""
        signals.note(signum)
        if self.signalled:
            return
        self.signalled = signum  # (not _stop.set(): the main thread may hold its lock, and a handler runs there)
        self._signal_workers(signum)

    def _signal_workers(self, signum: int) -> None:
        """The signal to every worker process; again to one that has it already changes nothing."""
        for process in self._worker_processes():
            with contextlib.suppress(ProcessLookupError):  # one that just ended
                os.kill(process.pid, signum)

    def _stop_noted(self) -> None:
        """(One worker) A stop signal that a training took during its last step (it ended, saving what it would
        have saved anyway) stops the run there: no stage starts after it, and the run does not end as done."""
        if signals.received != self._noted:
            raise signals.stopped(signals.received)

    def _worker_processes(self) -> list:
        return list((getattr(self._processes, "_processes", None) or {}).values())

    def _chain(self, chain: Callable[..., Any], *args) -> Any:
        try:
            return chain(*args)
        except BaseException as exc:
            if exc not in self._errors:  # (a chain that waited for another raises that one's again)
                self._errors.append(exc)
            self._stop.set()
            raise

    def _print(self) -> None:
        """The workers' lines, until the run is over and every line is read. The queue's write lock is shared with
        the workers, and a worker stopped by Ctrl-C (or killed) while writing keeps it forever: putting an end
        marker on the queue hung the run there, so the run says it is over through an event."""
        while True:
            if not self._queue.empty():
                self.log(self._queue.get())  # a line is written whole (one write under the pipe's atomic size)
            elif self._printed.is_set():
                return
            else:
                time.sleep(0.05)


def _start_resource_tracker() -> None:
    """Start spawn's resource tracker (it unlinks the semaphores of queues and locks left at exit) without its
    warning about them: the libraries the workers import leave two, which the user can do nothing about. It
    ignores SIGTERM and SIGINT but not SIGUSR1, which ``scancel --signal=USR1`` and SLURM's ``--signal=USR1@N``
    send every process of the job: it died of it, and the run's end printed "resource_tracker: process died
    unexpectedly" and a KeyError traceback for each semaphore. Started with SIGUSR1 blocked, which it keeps (a
    blocked signal stays pending: the tracker lives until the run's end, as with SIGTERM)."""
    from multiprocessing import resource_tracker

    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning"
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)  # (one to the run meanwhile waits)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = before


def _timed(name: str, why: str, action: Callable[..., Any], args: tuple, log: Log) -> tuple[Any, float]:
    log(f"[{name}] running ({why})")
    started = time.perf_counter()
    result = action(*args, log=log)
    return result, time.perf_counter() - started


def _block_stop_signals() -> None:
    """In the run's chain threads: SIGTERM and SIGUSR1 go to its main thread (where Python runs their handler in any
    case), and a worker process started from a chain (the pool starts them as stages come) holds them blocked from
    its start until it has its handlers, instead of dying of one at its start."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.STOP_SIGNALS)


def _start_worker(log_queue, threads: int, parent: int) -> None:
    global _log_queue
    _log_queue = log_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's: it stops its workers (no tracebacks here)
    for number in signals.STOP_SIGNALS:
        signal.signal(number, _stop_signal)
    sys.unraisablehook = signals.unswallowing(sys.unraisablehook)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.STOP_SIGNALS)  # (blocked since the start, as the chain's)
    if sys.platform.startswith("linux"):  # killed with the run: PR_SET_PDEATHSIG (with the thread that started it)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        if os.getppid() != parent:  # the run died before that took effect
            os._exit(1)
    import torch

    torch.set_num_threads(threads)


def _stop_signal(signum: int, frame) -> None:
    """SIGTERM / SIGUSR1 in a worker (the run forwards its own; ``scancel`` signals every process): the stage stops
    as in the run's own process (:mod:`perpair.signals`; a training takes them over: after its step, with a
    checkpoint). Between stages it is only noted, and no stage starts after it."""
    if _in_stage:  # (between stages nothing raises: the next one does not start)
        signals.raise_again()
    if signals.note(signum) and _in_stage:
        raise signals.stopped(signum)


def _in_worker(name: str, why: str, action: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    global _in_stage

    def log(line: str) -> None:  # the run's own lines name their stage; a stage's progress lines get its name
        _log_queue.put(line if line.startswith("[") else f"[{name}] {line.strip()}")

    _in_stage = True  # before the check: a signal in between stops the stage at once
    try:
        if signals.received:  # a signal between stages: this one does not start
            raise signals.stopped(signals.received)
        return _timed(name, why, action, args, log)
    finally:
        _in_stage = False
