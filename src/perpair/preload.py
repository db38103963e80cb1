"""What the ``perpair`` program preloads into itself: a faster memory allocator (:mod:`perpair.allocator`) and, on
an AMD CPU, the library that lets MKL choose its kernels by the CPU's features (:mod:`perpair.mkl`).

How: a library can only be preloaded when a process starts (the dynamic loader's ``LD_PRELOAD``), so
:func:`reexec_with_preloads` re-executes the command, before it does any work, with them preloaded. The new process
removes them from its environment again, so the programs it starts (a browser rendering a report, a llama.cpp
server) keep their own allocator, but for ``perpair run``'s worker processes (:func:`children_preloaded`). Linux
only; elsewhere nothing changes. Python code of one's own (a TRL script with the plug-in) gets the same with
``LD_PRELOAD="$(python -m perpair.preload)" python train.py``: run as a program, this module prints the libraries.
"""

from __future__ import annotations

import contextlib
import os
import sys

from perpair import allocator, mkl

_PRELOADED = "PERPAIR_PRELOADED"  # set for the re-executed process only, which removes it: the libraries it added
_preloaded: list[str] = []  # the libraries this process was re-executed with


def wanted_preloads() -> tuple[list[str], dict[str, str]]:
    """The libraries this process should be re-executed with (none already loaded) and the settings they take.
    Raises :class:`~perpair.errors.PerpairError` for a bad ``PERPAIR_MALLOC`` or ``PERPAIR_MKL_DISPATCH``."""
    libraries, settings = [], {}
    chosen = allocator.choice_library()
    if chosen is not None:
        libraries.append(chosen)
        settings = {**allocator.COMMON_SETTINGS, **allocator.SETTINGS.get(allocator.allocator_name(chosen) or "", {})}
    if mkl.wanted() and not mkl.active() and (dispatch := mkl.library()) is not None:
        libraries.append(dispatch)
    return libraries, settings


def reexec_with_preloads(argv: list[str]) -> None:
    """Replace this process by ``argv`` (a command line of this interpreter) with :func:`wanted_preloads` preloaded;
    return without doing anything when there is nothing to preload. In the re-executed process, clean the
    environment."""
    global _preloaded
    preloaded = os.environ.pop(_PRELOADED, None)
    if preloaded is not None:  # this is the re-executed process: children get the environment the user gave
        _preloaded = preloaded.split(os.pathsep)
        remove_preloads(_preloaded)
        return
    if sys.platform != "linux":
        return
    libraries, settings = wanted_preloads()
    if not libraries:
        return
    preload = ":".join(p for p in (*libraries, os.environ.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, argv,
              {**settings, **os.environ, "LD_PRELOAD": preload, _PRELOADED: os.pathsep.join(libraries)})


def remove_preloads(libraries: list[str]) -> None:
    """Take ``libraries`` out of this process's ``LD_PRELOAD``, keeping any other: the processes it starts then get
    the environment the user gave (the libraries stay loaded in this one)."""
    rest = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p not in libraries]
    if rest:
        os.environ["LD_PRELOAD"] = ":".join(rest)
    else:
        os.environ.pop("LD_PRELOAD", None)


@contextlib.contextmanager
def children_preloaded():
    """Inside, the processes this one starts get its preloads too (``perpair run``'s workers, which do the same
    work); outside, they keep their own."""
    if not _preloaded:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = ":".join(p for p in (*_preloaded, before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


if __name__ == "__main__":
    from perpair.errors import PerpairError

    try:
        print(":".join(wanted_preloads()[0]))
    except PerpairError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
