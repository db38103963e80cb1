"""Work the main process of a launch does alone, its failure shared with the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from perpair.errors import FailedOnMainProcess, PerpairError

T = TypeVar("T")


def on_main_process(accelerator, work: Callable[[], T]) -> T | None:
    """``work()`` on the main process alone (its result; None elsewhere), the others waiting for it. Its refusal
    (a :class:`PerpairError` or an ``OSError``: a full disk, a folder it may not write) is raised there as usual
    and as :class:`FailedOnMainProcess` on the others, so that every process exits with the main one's status
    instead of the others failing in their next collective, a traceback each, once it is gone."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (PerpairError, OSError) as exc:
            failure = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        code = None if failure is None else getattr(failure, "exit_code", 2)
        code = broadcast_object_list([code])[0]  # a collective: also the others' wait for the main process
        # gloo frees the broadcast's tensors on its own thread, which takes the GIL to do so; a process group torn
        # down before that (train()'s return frees the DDP module) joins that thread holding the GIL: a deadlock.
        # The barrier runs after that free on the same thread, and is waited on without the GIL.
        accelerator.wait_for_everyone()
        if code is not None and not accelerator.is_main_process:
            raise FailedOnMainProcess(code)
    if failure is not None:
        raise failure
    return result
