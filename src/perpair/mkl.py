"""MKL's float32 kernels chosen by what an AMD CPU can do, not by its maker.

Why: PyTorch's CPU build computes float32 matrix products with Intel's MKL, which picks its kernels by the CPU's
vendor before its features: on a CPU that is not Intel's it runs generic ones, without AVX-512. On the AMD EPYC
(Zen 4) of ``benchmarks/vs_trl.py``, one core did 94 GFLOP/s of 2048³ float32 products with them and 112 with the
kernels MKL runs on an Intel CPU of the same features, and a training step of that benchmark was 1.08-1.15x
faster (README, "MKL on an AMD CPU"). Matrix products are three quarters of a CPU step.

How: MKL asks its function ``mkl_serv_intel_cpu_true`` whether the CPU is Intel's. A library that defines that
function to answer yes, preloaded (``LD_PRELOAD``) by :mod:`perpair.preload` when the command starts, is found
first, so MKL then chooses among its kernels by the CPU's features (cpuid), as it does on Intel's CPUs. The library
is built once with the system's C compiler into ``$PERPAIR_CACHE/mkl/``; where it cannot be (no compiler, a
read-only cache) nothing changes and ``perpair train`` says so beside its peak memory. With it, float32 layers are
no longer packed for oneDNN (:mod:`perpair.onednn`), whose AVX-512 kernels they were for. Only on an AMD x86-64 CPU
under Linux, where it was measured; on an Intel CPU MKL already does this. Results differ from the generic kernels'
in the last bits (another summation order), as between any two machines. ``PERPAIR_MKL_DISPATCH``: ``auto`` (the
default) or ``vendor`` (MKL's own rule: its generic kernels on an AMD CPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path

from perpair.errors import PerpairError
from perpair.paths import cache_root

ENV = "PERPAIR_MKL_DISPATCH"
CHOICES = ("auto", "vendor")
SOURCE = """\
/* perpair (perpair/mkl.py): MKL asks this whether the CPU is Intel's before choosing its kernels by the CPU's
   features; answering yes lets it use AVX-512 / AVX2 kernels on an AMD CPU that has them. */
int mkl_serv_intel_cpu_true(void) { return 1; }
"""
LIBRARY_PREFIX = "libperpair_mkl_dispatch"


def choice() -> str:
    """``PERPAIR_MKL_DISPATCH``, checked."""
    value = os.environ.get(ENV, "auto").strip() or "auto"
    if value not in CHOICES:
        raise PerpairError(f"{ENV}={value}: use auto (MKL's kernels chosen by an AMD CPU's features) or vendor "
                           "(MKL's own rule: its generic kernels on a CPU that is not Intel's)")
    return value


def cpu_vendor() -> str | None:
    """The CPU's cpuid vendor string (``AuthenticAMD``, ``GenuineIntel``, …), or ``None`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        return None
    return None


def wanted() -> bool:
    """Whether this process's programs should run with the library preloaded: an AMD x86-64 CPU under Linux and
    ``PERPAIR_MKL_DISPATCH=auto``."""
    return (choice() == "auto" and sys.platform == "linux" and os.uname().machine == "x86_64"
            and cpu_vendor() == "AuthenticAMD")


def library() -> str | None:
    """The preloadable library, built once into ``$PERPAIR_CACHE/mkl/`` (named by its source's hash); ``None``
    where there is no C compiler or the build fails (then MKL keeps its own rule)."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = cache_root() / "mkl" / f"{LIBRARY_PREFIX}-{digest}.so"
    if target.is_file():
        return str(target)
    import shlex  # (here: the program reads this module before it re-executes itself, and builds once)
    import shutil
    import subprocess
    import tempfile

    try:
        compiler = shlex.split(os.environ.get("CC", "")) or [
            found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))][:1]
        if not compiler:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as build:
            source, built = Path(build) / "dispatch.c", Path(build) / target.name
            source.write_text(SOURCE)
            subprocess.run([*compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                           check=True, capture_output=True, timeout=60)
            # A library the loader cannot map (another architecture's compiler, a noexec cache) would be refused,
            # with a message, by every process it is preloaded into: kept only if it loads and answers here.
            if ctypes.CDLL(str(built)).mkl_serv_intel_cpu_true() != 1:
                return None
            os.replace(built, target)  # whole or not at all: processes starting side by side each build their own
    except (OSError, AttributeError, ValueError, subprocess.SubprocessError):
        return None
    return str(target)


def active() -> bool:
    """Whether this process runs with the library preloaded: mapped, and the one answering MKL's question in the
    process's global scope (a copy loaded by :func:`library` to check it, or by anyone with ``ctypes``, is not)."""
    try:
        if LIBRARY_PREFIX not in Path("/proc/self/maps").read_text():
            return False
        answer = ctypes.CDLL(None).mkl_serv_intel_cpu_true
    except (OSError, AttributeError):
        return False
    answer.restype = ctypes.c_int
    return answer() == 1


def hint(device: str) -> str:
    """What to say beside a run's allocator when it trained on a CPU whose MKL ran its generic kernels although
    :func:`wanted` (:func:`library` could not build the library). Empty otherwise."""
    try:
        if device != "cpu" or active() or not wanted():
            return ""
    except PerpairError:  # a bad PERPAIR_MKL_DISPATCH, set after the program started: said where it is read
        return ""
    return ("; MKL ran its generic float32 kernels on this AMD CPU: the library that lets it run the CPU's own "
            "needs a C compiler (apt install gcc) and a writable $PERPAIR_CACHE (README, 'MKL on an AMD CPU')")
