"""On an AMD CPU the program preloads a library that lets MKL choose its kernels by the CPU's features
(perpair.mkl): it is built once, MKL then takes another code path with the same results to float noise, it can be
turned off, a bad choice is one clear error, and without a C compiler nothing changes but a hint."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perpair import mkl

# A child that re-executes itself as the CLI does, then reports MKL's code path (0: its generic kernels) and the
# products of two fixed matrices.
PROBE = """
import ctypes, os, sys
from perpair.preload import reexec_with_preloads
reexec_with_preloads([sys.executable, *sys.orig_argv[1:]])
import torch
from perpair import mkl
torch.manual_seed(0)
a, b = torch.randn(300, 700), torch.randn(700, 500)
torch.save(a @ b, sys.argv[1])
library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(library.mkl_serv_cpu_detect(), mkl.active())
"""


def probe(tmp_path: Path, **env: str):
    """MKL's code path in a re-executed child with ``env``, whether the library is loaded there, and its products."""
    out = tmp_path / f"product-{len(list(tmp_path.iterdir()))}.pt"
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", mkl.ENV)}
    result = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True,
                            env={**base, **env})
    assert result.returncode == 0, result.stderr
    path, active = result.stdout.split()
    import torch

    return int(path), active == "True", torch.load(out)


def mkl_exported() -> bool:
    import torch

    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    return hasattr(library, "mkl_serv_cpu_detect")


@pytest.mark.skipif(sys.platform != "linux" or mkl.cpu_vendor() != "AuthenticAMD",
                    reason="the library is preloaded on an AMD CPU under Linux")
def test_on_an_amd_cpu_mkl_takes_its_feature_kernels_with_the_same_results(tmp_path):
    if mkl.library() is None:
        pytest.skip("no C compiler here to build the library")
    if not mkl_exported():
        pytest.skip("this PyTorch does not export MKL's code path")
    features, active, product = probe(tmp_path)
    generic, inactive, reference = probe(tmp_path, PERPAIR_MKL_DISPATCH="vendor")
    assert active and not inactive
    assert generic == 0 and features > generic  # MKL's generic kernels, then those of the CPU's features
    assert (product - reference).abs().max() <= 1e-5 * reference.abs().max()  # another summation order, no more


def test_the_library_answers_yes_and_is_built_once(tmp_path, monkeypatch):
    if mkl.library() is None:
        pytest.skip("no C compiler here to build the library")
    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path))
    built = mkl.library()
    assert built is not None and Path(built).parent == tmp_path / "mkl"
    answer = subprocess.run([sys.executable, "-c", "import ctypes, sys; print(ctypes.CDLL(sys.argv[1])"
                             ".mkl_serv_intel_cpu_true())", built], capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "1"  # (in a child: loaded here, it would be in this process's maps)
    assert [p.name for p in (tmp_path / "mkl").iterdir()] == [Path(built).name]  # no build folder left behind
    assert not mkl.active()  # the copy loaded here to check it answers is not a preload of this process
    monkeypatch.setenv("CC", str(tmp_path / "no-compiler"))  # built already: found without compiling
    assert mkl.library() == built


def test_without_a_compiler_nothing_is_preloaded_and_a_cpu_run_hears_of_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-compiler"))
    assert mkl.library() is None
    assert not list((tmp_path / "mkl").iterdir())  # nothing partial
    monkeypatch.setattr(mkl, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(mkl.os, "uname", lambda: os.uname_result(("Linux", "h", "6", "1", "x86_64")))
    monkeypatch.setattr(mkl.sys, "platform", "linux")
    monkeypatch.delenv(mkl.ENV, raising=False)
    monkeypatch.setattr(mkl, "active", lambda: False)  # the run's process without the library
    assert "apt install gcc" in mkl.hint("cpu")
    assert mkl.hint("cuda") == ""
    monkeypatch.setenv(mkl.ENV, "vendor")  # asked for MKL's own rule: nothing to say
    assert mkl.hint("cpu") == ""


def test_a_compiler_given_with_arguments_and_a_library_that_does_not_load(tmp_path, monkeypatch):
    """``CC`` may carry arguments (``ccache gcc``); a "library" the loader cannot map (another architecture's
    compiler, a cache on a noexec mount) is not kept: preloaded, every process would print the loader's refusal."""
    if mkl.library() is None:
        pytest.skip("no C compiler here to build the library")
    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", f"env {os.environ.get('CC') or 'cc'}")  # a command with an argument
    assert mkl.library() is not None
    bogus = tmp_path / "bogus-cc"  # "compiles" to a file that is not a shared library
    bogus.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho "not an ELF file" > "$2"\n')
    bogus.chmod(0o755)
    monkeypatch.setenv("PERPAIR_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(bogus))
    assert mkl.library() is None
    monkeypatch.setenv("CC", 'gcc "-O2')  # a CC shell quoting cannot split: no build, no traceback
    assert mkl.library() is None
    assert not list((tmp_path / "other" / "mkl").iterdir())


def test_wanted_on_an_amd_x86_cpu_under_linux_only(monkeypatch):
    monkeypatch.delenv(mkl.ENV, raising=False)
    monkeypatch.setattr(mkl.os, "uname", lambda: os.uname_result(("Linux", "h", "6", "1", "x86_64")))
    monkeypatch.setattr(mkl.sys, "platform", "linux")
    for vendor, wanted in (("AuthenticAMD", True), ("GenuineIntel", False), (None, False)):
        monkeypatch.setattr(mkl, "cpu_vendor", lambda v=vendor: v)
        assert mkl.wanted() is wanted, vendor
    monkeypatch.setattr(mkl, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(mkl.os, "uname", lambda: os.uname_result(("Linux", "h", "6", "1", "aarch64")))
    assert not mkl.wanted()


def test_a_bad_choice_is_one_clear_error(tmp_path):
    env = {**os.environ, mkl.ENV: "avx512"}
    for command in ([sys.executable, "-m", "perpair", "inspect", "--help"], [sys.executable, "-m", "perpair.preload"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "error: PERPAIR_MKL_DISPATCH=avx512: use auto (MKL's kernels chosen by an AMD CPU's features) or vendor "
            "(MKL's own rule: its generic kernels on a CPU that is not Intel's)"]


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_a_script_gets_the_same_preloads_from_the_module(tmp_path):
    """``LD_PRELOAD="$(python -m perpair.preload)"`` (a TRL script's way, README) names what the program preloads."""
    from perpair.allocator import allocator_name

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PERPAIR_MALLOC", mkl.ENV)}
    result = subprocess.run([sys.executable, "-m", "perpair.preload"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    libraries = result.stdout.strip().split(":")
    assert allocator_name(libraries[0]) is not None  # an allocator first: mimalloc is a dependency on Linux
    assert libraries[1:] == ([mkl.library()] if mkl.wanted() and mkl.library() is not None else [])


def test_float32_layers_stay_unpacked_where_mkl_runs_the_cpus_own_kernels(monkeypatch):
    """oneDNN's packed float32 layers were for its AVX-512 kernels, which MKL withholds from an AMD CPU: with the
    library loaded they would only cost copies of the weights (perpair.onednn.supported)."""
    import torch

    from perpair import onednn

    if not onednn.supported(torch.bfloat16) and not onednn.supported(torch.float32):
        pytest.skip("oneDNN's packed layers are not available in this PyTorch")
    onednn.supported.cache_clear()
    try:
        monkeypatch.setattr(mkl, "active", lambda: True)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        assert onednn.pack_linears(model) == 0 and type(model[0]) is torch.nn.Linear
        assert onednn.supported(torch.bfloat16) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        onednn.supported.cache_clear()
        monkeypatch.setattr(mkl, "active", lambda: False)
        assert onednn.pack_linears(model) == 1  # MKL's generic kernels: packed, as before
    finally:
        onednn.supported.cache_clear()
