"""Work the main process of a launch does alone, its failure shared with the others."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from perpair.errors import FailedOnMainProcess, PerpairError, StoppedBySignal

T = TypeVar("T")


def on_main_process(accelerator, work: Callable[[], T]) -> T | None:
    """``work()`` on the main process alone (its result; None elsewhere), the others waiting for it. Its refusal
    (a :class:`PerpairError` or an ``OSError``: a full disk, a folder it may not write), or a stop signal's
    :class:`StoppedBySignal`, is raised there as usual
    and as :class:`FailedOnMainProcess` on the others, so that every process exits with the main one's status
    instead of the others failing in their next collective, a traceback each, once it is gone."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (PerpairError, OSError, StoppedBySignal) as exc:  # (a stop signal: the others stop with it)
            failure = exc
    if accelerator.num_processes > 1:
        code = _main_process_status(accelerator, None if failure is None else getattr(failure, "exit_code", 2))
        if code is not None and not accelerator.is_main_process:
            raise FailedOnMainProcess(code)
    if failure is not None:
        raise failure
    return result


def _main_process_status(accelerator, code: int | None) -> int | None:
    """The main process's exit status (None: it succeeded), sent to every process; a collective, so also the
    others' wait for the main process."""
    import torch.distributed as dist

    status = torch.tensor([-1 if code is None else code], dtype=torch.int64, device=accelerator.device)
    dist.broadcast(status, src=0)  # the main process is rank 0
    value = int(status.item())
    return None if value < 0 else value


def let_collectives_finish(accelerator) -> None:
    """Call before the process group is destroyed (Accelerate's end_training) and the model wrapped for several
    processes freed. A process group's worker thread releases a finished collective's tensors just after the
    collective returns, and releasing a tensor Python created takes the GIL; freeing the DDP module tears the
    process group down holding the GIL and joins that thread: a deadlock, the second process of a two-process gloo
    launch hung at exit in about 1 run of 10 on 2 busy cores (py-spy: the main thread in ``~ProcessGroupGloo``
    joining, the worker in ``gil_scoped_acquire`` releasing a broadcast's tensors). A barrier (no tensors), then a
    pause without the GIL, in which that thread finishes."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
