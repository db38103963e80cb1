"""A faster memory allocator for CPU work: the ``perpair`` command re-executes itself once under tcmalloc,
mimalloc or jemalloc, whichever is installed.

Why: a training step on a CPU allocates and frees thousands of activation-sized buffers. glibc's ``malloc`` either
keeps freed buffers in a heap that fragments (resident memory grows by hundreds of MiB between gradients and
optimizer states) or, for buffers above its mmap threshold, maps fresh pages that the kernel faults in and zeroes
at every use: on ``benchmarks/vs_trl.py`` about a million page faults and a third of a second to a second of kernel
time per optimizer step. tcmalloc, mimalloc and jemalloc reuse freed memory without either cost (the allocators
PyTorch's CPU performance guide recommends preloading).

How: ``malloc`` can only be replaced when a process starts, so the program re-executes itself with the chosen
allocator preloaded (:mod:`perpair.preload`, which also says what the processes it starts inherit). Choose with
``PERPAIR_MALLOC``: ``auto`` (the default: the first found of tcmalloc, mimalloc, jemalloc), ``tcmalloc``,
``mimalloc``, ``jemalloc``, the path of a shared library, or ``system`` (glibc's, no re-execution). Linux only;
elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import sysconfig
from pathlib import Path

from perpair.errors import PerpairError

ENV = "PERPAIR_MALLOC"
# Library names (``ctypes.util.find_library`` spelling) in the order tried by "auto".
ALLOCATORS = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "mimalloc": ("mimalloc",),
    "jemalloc": ("jemalloc",),
}


# Settings given to an allocator unless the user set them. mimalloc hands freed memory back to the OS (its purge, by
# default 10 ms after a free), and a training step frees and touches again hundreds of MB, each page then faulted in
# anew (~18 us a page on a virtual machine): 8 steps of the demo's dpo arm (one thread, AMD EPYC, 15:30 UTC 3 Dec
# 2026) took 67.9 s with 14.9 s in the kernel, 56.7 s (4.1 s) never purging, 68.7 s (12.9 s) purging after 1 s, and
# 55.5 s (2.2 s) under tcmalloc, which keeps freed memory as well. The whole demo with mimalloc: 701.5 s, 171 s of it
# in the kernel; with tcmalloc 605.5 s, 38 s.
SETTINGS = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"}}
# Given under every allocator: Arrow allocates through it too, instead of through the mimalloc heap pyarrow bundles,
# which kept 34 MB at a training run's peak for the 6 MB table of pairs it had read (tcmalloc, 5 Dec 2026).
COMMON_SETTINGS = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def allocator_name(library: str) -> str | None:
    """Which of :data:`ALLOCATORS` a library file is, by the rule :func:`active_allocator` reads the process's
    mapped files with, or ``None``."""
    return next((name for name in ALLOCATORS if f"lib{name}" in Path(library).name), None)


def find_allocator(choice: str = "auto") -> str | None:
    """The shared library for ``choice`` (a name of :data:`ALLOCATORS`, ``auto`` or a path), or ``None``."""
    if choice not in ALLOCATORS and choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise PerpairError(f"{ENV}={choice}: no such library; use auto, system, "
                               f"{', '.join(ALLOCATORS)} or the path of a shared library")
        return str(path.resolve())
    for name in ALLOCATORS if choice == "auto" else (choice,):
        for library in ALLOCATORS[name]:
            found = _in_python_prefix(library) or ctypes.util.find_library(library)
            if found:
                return found
    return None


def _in_python_prefix(library: str) -> str | None:
    """A library installed by pip into this environment (``cmeel-mimalloc`` puts it in ``cmeel.prefix/lib``)."""
    for folder in (Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib", Path(sys.prefix) / "lib"):
        candidates = sorted(folder.glob(f"lib{library}.so*")) if folder.is_dir() else []
        if candidates:
            return str(candidates[0])
    return None


def choice_library() -> str | None:
    """The allocator library the program should preload (:mod:`perpair.preload`) for ``PERPAIR_MALLOC``: ``None``
    for ``system``, off Linux, where an allocator is already loaded, or where ``auto`` finds none installed."""
    choice = os.environ.get(ENV, "auto").strip() or "auto"
    if sys.platform != "linux" or choice == "system" or active_allocator():
        return None
    library = find_allocator(choice)
    if library is None and choice != "auto":
        raise PerpairError(f"{ENV}={choice}: the library is not installed (e.g. apt install "
                           "libtcmalloc-minimal4, or pip install cmeel-mimalloc)")
    return library


def active_allocator() -> str | None:
    """The name of the replacement allocator this process runs with (``None``: the C library's own)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return None


def tcmalloc_hint(active: str, device: str) -> str:
    """What to say beside a run's allocator when it trained on a CPU (``device``: the type of the device it trained
    on) under mimalloc because tcmalloc is not installed: mimalloc without its purge (:data:`SETTINGS`) keeps freed
    memory it cannot always reuse, so tcmalloc's peak was 6–19% lower on the workloads measured (README
    "Quickstart: ``perpair train``"). Empty otherwise."""
    if active != "mimalloc" or device != "cpu" or find_allocator("tcmalloc") is not None:
        return ""
    return "; tcmalloc would peak 6–19% lower: apt install libtcmalloc-minimal4"
