"""Run the ``perpair`` command line inside the test process: ``perpair.cli.main``, the code the program runs
once it has chosen its memory allocator (``perpair.__main__``), with ``sys.argv`` set and stdout/stderr
captured. A fresh process spends 2-5 s importing torch, transformers and the stages before the command
starts; in the test process those imports are done once, so a command costs what the command itself costs.

What a command changes in the process is put back afterwards, so that one call cannot leak into the next:
environment variables, the working folder, warning filters, the root logger's handlers, signal handlers,
torch's thread count, default dtype and global RNG, and Accelerate's process-wide state (an ``Accelerator``
made for a bf16 run would otherwise refuse the next fp32 run). ``tests/test_cli_inprocess.py`` checks that
commands answer here exactly as in a fresh process."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from unittest import mock

from perpair.cli import main

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _restored_process_state():
    import torch

    environ, cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signals = {number: signal.getsignal(number) for number in SIGNALS}
    threads, dtype, rng = torch.get_num_threads(), torch.get_default_dtype(), torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        root.handlers[:], root.level = handlers, level
        for number, handler in signals.items():
            signal.signal(number, handler)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)
        if "accelerate" in sys.modules:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)


def run_cli_inprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``perpair ARGS`` in this process: its exit status and what it printed, as a ``CompletedProcess``.
    An exception the command line does not handle ends it as it would end the program: status 1, the
    traceback on stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with _restored_process_state(), mock.patch.object(sys, "argv", ["perpair", *map(str, args)]), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        os.environ.update(env or {})
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        except Exception:  # noqa: BLE001  (what the interpreter would print before exiting with 1)
            traceback.print_exc()
            code = 1
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        stderr.write(code + "\n")
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["perpair", *map(str, args)], returncode, stdout.getvalue(),
                                       stderr.getvalue())
