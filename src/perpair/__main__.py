"""The ``perpair`` program: the console script and ``python -m perpair``.

It chooses what to preload first (a memory allocator, MKL's CPU dispatch: :mod:`perpair.preload`),
re-executing itself with them before the command line's modules are imported, so those imports (about 0.7 s)
run once, in the process that does the work; then it runs the command line, and exits without tearing the
interpreter down (:func:`finish`).
"""

import sys


def main() -> None:
    try:
        from perpair.errors import PerpairError
        from perpair.preload import reexec_with_preloads

        try:
            reexec_with_preloads([sys.executable, *sys.orig_argv[1:]])
        except PerpairError as exc:
            sys.stderr.write(f"error: {exc}\n")
            sys.exit(2)
        from perpair.cli import main as command_line
    except KeyboardInterrupt:  # Ctrl-C while the modules load (perpair train's import torch: seconds): no traceback
        sys.stderr.write("interrupted: finished work is kept; re-run to continue\n")
        sys.exit(130)  # (the command line's EXIT_INTERRUPTED, not imported yet)

    try:
        command_line()
    except SystemExit as exc:
        finish(exc.code)
    finish(0)


def finish(code: int | str | None) -> None:
    """Exit as ``sys.exit(code)`` would, without the interpreter's teardown: freeing the objects of torch,
    Transformers and a model one by one took 0.7-1.0 s after every command here, where the OS frees the process's
    memory at once. What an exit owes others still happens: the exit handlers run (logging, trackers, child
    processes, file locks) and standard output and error are flushed. Python does not promise that objects still
    alive at exit are finalized, and nothing here relies on it. With a non-daemon thread still running, the usual
    exit, which waits for it."""
    import atexit
    import os
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or not hasattr(atexit, "_run_exitfuncs"):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1
        sys.stderr.write(f"{code}\n")
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a closed pipe: nothing more can reach the reader
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
