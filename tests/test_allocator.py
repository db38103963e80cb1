"""The CLI re-executes itself under a faster allocator (perpair.allocator): it takes, it can be chosen or turned
off, a bad choice is one clear error, and the processes perpair starts get the environment the user gave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli, save_tiny_llama
from perpair import allocator
from perpair.allocator import ALLOCATORS, find_allocator, tcmalloc_hint

# A child that re-executes itself as the CLI does and reports what it runs with and what its own children inherit.
PROBE = """
import os, sys
from perpair.allocator import active_allocator
from perpair.preload import reexec_with_preloads
reexec_with_preloads([sys.executable, *sys.orig_argv[1:]])
print(active_allocator(), os.environ.get("LD_PRELOAD"), os.getpid())
"""


def environment(**env: str) -> dict[str, str]:
    """This environment without the allocator settings of the machine running the tests, plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PERPAIR_MALLOC", "LD_PRELOAD")}, **env}


def probe(**env: str) -> tuple[str, str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment(**env))
    assert result.returncode == 0, result.stderr
    allocator, preload, pid = result.stdout.split()
    return allocator, preload, int(pid)


def probe_value(expression: str, choice: str, **env: str) -> tuple[str, str]:
    """The allocator a re-executed child runs under with ``PERPAIR_MALLOC=choice``, and what ``expression`` gives
    there; ``env`` is what the user set (the settings it names are unset otherwise)."""
    base = {k: v for k, v in environment(PERPAIR_MALLOC=choice).items()
            if k not in ("MIMALLOC_PURGE_DELAY", "ARROW_DEFAULT_MEMORY_POOL")}
    code = PROBE.replace('os.environ.get("LD_PRELOAD")', expression)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})
    assert result.returncode == 0, result.stderr
    allocator, value, _ = result.stdout.split()
    return allocator, value


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_auto_preloads_an_allocator_and_children_inherit_nothing():
    # mimalloc is a dependency on Linux, so auto always finds one
    allocator, preload, _ = probe()
    assert allocator in ALLOCATORS
    assert preload == "None"  # removed again: a program perpair starts keeps its own allocator


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_each_allocator_by_name(name):
    if find_allocator(name) is None:
        pytest.skip(f"{name} is not installed here")
    allocator, _, _ = probe(PERPAIR_MALLOC=name)
    assert allocator == name


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_a_preload_of_the_user_is_kept_for_the_children():
    library = find_allocator("mimalloc")
    user = "libm.so.6"  # any library: the user's own preload
    allocator, preload, _ = probe(PERPAIR_MALLOC=library, LD_PRELOAD=user)
    assert allocator == "mimalloc" and preload == user


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_the_program_reexecutes_before_importing_the_command_line():
    # -X importtime is in the re-executed command line too; both processes write to the same stderr.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "perpair", "--help"], capture_output=True,
                            text=True, env=environment())
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert imported.count("perpair.allocator") == 2  # once per process: it did re-execute
    assert imported.count("perpair.cli") == 1  # the command line's imports ran in the second process only


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_mimalloc_keeps_freed_memory_unless_the_user_says_otherwise():
    """mimalloc's purge of freed memory made the demo's training 1.2x slower (perpair.allocator.SETTINGS): under
    mimalloc perpair runs with its purge off, and its workers inherit that; a value the user set is kept."""
    from perpair.allocator import allocator_name

    setting = 'os.environ.get("MIMALLOC_PURGE_DELAY")'
    assert probe_value(setting, "mimalloc") == ("mimalloc", "-1")
    assert probe_value(setting, "mimalloc", MIMALLOC_PURGE_DELAY="250") == ("mimalloc", "250")
    if find_allocator("tcmalloc") is not None:  # tcmalloc gets no mimalloc setting
        assert probe_value(setting, "tcmalloc") == ("tcmalloc", "None")
    assert allocator_name(find_allocator("mimalloc")) == "mimalloc"
    assert allocator_name("/usr/lib/libtcmalloc_minimal.so.4") == "tcmalloc"
    assert allocator_name("/usr/lib/libm.so.6") is None


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_arrow_allocates_through_the_chosen_allocator_unless_the_user_says_otherwise():
    """pyarrow would keep its tables in the mimalloc heap it bundles, beside the allocator perpair preloads (34 MB
    more at a training run's peak): under that allocator Arrow's pool is the system one, which is it."""
    pool = '__import__("pyarrow").default_memory_pool().backend_name'
    allocator, name = probe_value(pool, "auto")
    assert allocator != "None" and name == "system"
    assert probe_value(pool, "auto", ARROW_DEFAULT_MEMORY_POOL="mimalloc") == (allocator, "mimalloc")


def test_system_means_no_reexecution():
    allocator, preload, _ = probe(PERPAIR_MALLOC="system")
    assert allocator == "None" and preload == "None"


def test_a_bad_choice_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPAIR_MALLOC", str(tmp_path / "libnothing.so"))
    result = run_cli("inspect", "--help", check=False, fresh=True)  # the program chooses its allocator
    assert result.returncode == 2
    assert f"PERPAIR_MALLOC={tmp_path / 'libnothing.so'}: no such library" in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_perpair_train_runs_under_the_allocator_and_records_it(uf_pairs, tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    result = run_cli("train", "--model", model, "--data", uf_pairs, "--steps", "1", "--batch-size", "2",
                     "--max-length", "64", "--out", tmp_path / "run", "--set", "save_model=false", fresh=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["allocator"] in ALLOCATORS and summary["device"] == "cpu"
    assert f"(allocator: {summary['allocator']}{tcmalloc_hint(summary['allocator'], 'cpu')})" in result.stdout


def test_the_mimalloc_fallback_on_a_cpu_names_the_leaner_allocator(monkeypatch):
    # what `perpair train` prints beside the allocator: only a CPU run that fell back to mimalloc hears of tcmalloc
    for installed in (None, "/usr/lib/libtcmalloc_minimal.so.4"):
        monkeypatch.setattr(allocator, "find_allocator", lambda choice, path=installed: path)
        said = tcmalloc_hint("mimalloc", "cpu")
        assert ("apt install libtcmalloc-minimal4" in said) == (installed is None), said
        assert tcmalloc_hint("mimalloc", "cuda") == ""
        assert tcmalloc_hint("tcmalloc", "cpu") == tcmalloc_hint("system", "cpu") == ""


# A program that ends as perpair's does (perpair.__main__.finish): an exit handler, an object whose finalizer would
# only run in the interpreter's teardown, optionally a non-daemon thread still writing, then finish(CODE).
FINISH = """
import atexit, sys, threading, time
from pathlib import Path
from perpair.__main__ import finish

class Finalized:
    def __del__(self):
        print("torn down", flush=True)

kept = Finalized()
atexit.register(lambda: print("exit handler ran"))
if len(sys.argv) > 2:
    threading.Thread(target=lambda: (time.sleep(0.5), Path(sys.argv[2]).write_text("written"))).start()
print("output", end="")  # unflushed: finish flushes it
finish(eval(sys.argv[1]))
"""


@pytest.mark.parametrize(("code", "status", "stderr"), [("0", 0, ""), ("None", 0, ""), ("3", 3, ""),
                                                        ("'bad input'", 1, "bad input\n")])
def test_the_program_exits_as_sys_exit_without_the_teardown(code, status, stderr):
    """``finish`` exits with sys.exit's status and message, runs the exit handlers, flushes the output, and skips
    the interpreter's teardown (0.7-1.0 s after every command: no finalizer of a live object runs)."""
    result = subprocess.run([sys.executable, "-c", FINISH, code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (status, stderr)
    assert result.stdout == "outputexit handler ran\n"  # handlers ran, output flushed, nothing torn down
    plain = subprocess.run([sys.executable, "-c", FINISH.replace("finish(", "sys.exit("), code],
                           capture_output=True, text=True)
    assert "torn down" in plain.stdout  # the same program's usual exit runs the finalizer: the check can fail


def test_the_program_waits_for_a_running_thread_as_the_usual_exit_does(tmp_path):
    result = subprocess.run([sys.executable, "-c", FINISH, "0", str(tmp_path / "thread")], capture_output=True,
                            text=True)
    assert result.returncode == 0 and (tmp_path / "thread").read_text() == "written"


def test_perpair_train_starts_without_the_plotting_library():
    """matplotlib (0.25 s to import) draws the plan report only: ``perpair train`` and the command line's own
    imports leave it out."""
    code = "import sys; sys.argv = ['perpair', 'train']; import perpair.cli; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_reading_the_pairs_leaves_pandas_out(uf_pairs):
    """``pq.read_table`` reads through ``pyarrow.dataset``, which imports pandas (37 MB more at a training run's
    peak memory): perpair reads its artifacts without it."""
    code = ("import sys; from perpair.data import read_pairs; "
            f"table, _ = read_pairs({str(uf_pairs)!r}); print(table.num_rows, 'pandas' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["994", "False"]


def test_ctrl_c_while_the_command_line_loads_is_one_line_not_a_traceback():
    """Ctrl-C in the seconds ``perpair train`` spends importing torch, before the command line's own handler was
    there, printed a traceback (KeyboardInterrupt in an import). Now the interrupted line and exit 130, as later."""
    code = """
import builtins, sys
real = builtins.__import__
def loading(name, *args, **kwargs):  # Ctrl-C arriving while the command line's modules load
    if name == "perpair.cli":
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = loading
sys.argv = ["perpair", "train", "--help"]
from perpair.__main__ import main
main()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment())
    assert result.returncode == 130
    assert result.stderr == "interrupted: finished work is kept; re-run to continue\n"
