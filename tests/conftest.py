"""Shared helpers and session fixtures of the test suite, and its layers.

Layers (README, "Development"): every test is ``unit`` (a function on small in-memory inputs), ``component``
(one stage through its API or command line, on fixtures, tiny random models, loopback stubs) or ``e2e``
(real models, a real llama.cpp server, several stages or processes, kills). A test's layer is, first, a
``unit``/``component``/``e2e`` marker on it; else ``e2e`` if it is marked ``slow``; else its own entry
(``file::name``) or its file's in ``LAYERS``; else ``component``. ``make test-fast`` runs ``-m "not e2e"``.

Tests that read ``../shared/data`` skip, saying so, where it is absent (``pytest_collection_modifyitems``
and :class:`_DataModule`).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cli_inprocess import run_cli_inprocess
from llama_server import llama_server  # noqa: F401  (registers the session's one llama.cpp server)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
UF_TRAIN = SHARED_DATA / "ultrafeedback" / "train_1k.jsonl.gz"
HH_TEST = SHARED_DATA / "hh_rlhf" / "harmless_base_test.jsonl.gz"
ORCA = SHARED_DATA / "orca_dpo" / "validation_284.jsonl.gz"


def run_cli(*args: str, check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run ``perpair ARGS`` and return its status and output. By default in this process
    (``cli_inprocess``: the same command line, without the 2-5 s of imports a new process pays, and with
    the process's state put back afterwards); ``fresh=True`` in a new process, as a user starts it, for what
    only a program has (the allocator it re-executes under, signals, its own memory). ``PERPAIR_TEST_FRESH=1``
    runs every call in a fresh process (``tests/test_cli_inprocess.py`` checks that both answer alike)."""
    if fresh or os.environ.get("PERPAIR_TEST_FRESH") == "1":
        result = subprocess.run([sys.executable, "-m", "perpair", *map(str, args)], capture_output=True,
                                text=True, env={**os.environ, "COLUMNS": "200"})
    else:
        result = run_cli_inprocess(*args, env={"COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"perpair {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def tiny_llama(*, seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 2048):
    """A randomly initialised Llama with SmolLM2's tokenizer and chat template, for fast tests:
    ``(model in eval mode, tokenizer)``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from perpair.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def save_tiny_llama(path: Path, **options) -> Path:
    """``tiny_llama`` saved as a model folder (weights, config, tokenizer) at ``path``."""
    model, tokenizer = tiny_llama(**options)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rewrite_weights(folder: Path) -> None:
    """Rewrite a model folder's weights in place, other values in files of the same names and sizes: what a
    retraining saved to the same path looks like to anything that keys a model by its files' names and sizes."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    save_file({name: w + 0.01 for name, w in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``tiny_llama`` (hidden 32) saved once per test session as a model folder, for training runs that only
    need some model (files needing a wider one save their own)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=32)


@pytest.fixture(scope="session")
def uf_pairs(tmp_path_factory) -> Path:
    """The UltraFeedback sample prepared once per test session."""
    path = tmp_path_factory.mktemp("uf") / "uf.parquet"
    run_cli("prepare", UF_TRAIN, "-o", path)
    return path


# --- layers -------------------------------------------------------------------------------------------------

LAYERS = {
    # unit: functions on small in-memory inputs, in this process
    "test_annotate_units.py": "unit", "test_eval_arena_hard.py": "unit", "test_eval_judges.py": "unit",
    "test_llm_client.py": "unit", "test_llm_scoring.py": "unit", "test_plan.py": "unit",
    "test_plan_math.py": "unit", "test_properties.py": "unit", "test_schema.py": "unit",
    "test_train_config.py": "unit", "test_train_losses.py": "unit", "test_config_files.py": "unit",
    "test_train_losses_trl.py": "unit", "test_train_batches.py": "unit", "test_onednn.py": "unit",
    # component: one stage through its API or CLI on fixtures, tiny models, loopback stubs
    "test_allocator.py": "component", "test_annotate_local.py": "component", "test_annotate_run.py": "component",
    "test_bench_controlled.py": "component", "test_bench_scaling.py": "component",
    "test_eval_alpaca_metrics.py": "component",
    "test_eval_preference.py": "component", "test_eval_report.py": "component", "test_examples.py": "component",
    "test_plan_report.py": "component", "test_prepare_real_data.py": "component", "test_readers.py": "component",
    "test_run_pipeline.py": "component", "test_train_cli.py": "component",
    # e2e: SmolLM2, the llama.cpp server, TRL's trainer, whole-sample runs
    "test_annotate_server.py": "e2e", "test_eval_alpaca_e2e.py": "e2e", "test_eval_arena_e2e.py": "e2e",
    "test_plan_ultrafeedback.py": "e2e",
    # pure functions of the scaling benchmark, in a component file (its watchdog and pair tests are components)
    "test_bench_scaling.py::test_slope_and_24_gib_extrapolation_of_a_power_law": "unit",
    "test_bench_scaling.py::test_points_above_an_out_of_memory_point_are_not_run": "unit",
    "test_bench_scaling.py::test_progress_names_the_step_of_each_implementation": "unit",
    "test_allocator.py::test_the_mimalloc_fallback_on_a_cpu_names_the_leaner_allocator": "unit",  # a pure function
    "test_onednn.py::test_the_inference_stages_load_their_models_packed": "component",  # saves and loads a model
    "test_eval_judges.py::test_alpaca_eval_command_keeps_the_judge_prefixes_where_told_or_refuses": "component",
    # single tests of component files that run several stages or processes, or kill one (a test's own entry
    # wins over its file's): the slowest of that layer, 25-120 s each on 2 shared cores
    "test_run_pipeline.py::test_run_all_stages_then_skip_rerun_and_from": "e2e",
    "test_eval_preference.py::test_cli_end_to_end_on_ultrafeedback": "e2e",
    "test_train_cli.py::test_resume_after_sigkill_is_exact": "e2e",
}
LAYER_NAMES = ("unit", "component", "e2e")


def layer_of(item: pytest.Item) -> str:
    marked = [name for name in LAYER_NAMES if item.get_closest_marker(name)]
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid}: marked {' and '.join(marked)}; a test has one layer")
    if marked:
        return marked[0]
    if item.get_closest_marker("slow"):
        return "e2e"
    test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    return LAYERS.get(test) or LAYERS.get(item.path.name, "component")


# --- ../shared/data absent: skip what reads it, with the reason ---------------------------------------------

NO_DATA = f"needs the real samples in {SHARED_DATA}, which is absent (CI has ../shared beside the checkout)"


def _points_into_data(value) -> bool:
    if isinstance(value, Path):
        return value.is_relative_to(SHARED_DATA)
    if isinstance(value, str):
        return value.startswith(str(SHARED_DATA))
    if isinstance(value, tuple | list):
        return any(_points_into_data(v) for v in value)
    return False


def _own_function(value, module: dict) -> types.FunctionType | None:
    """``value`` as a function defined in ``module`` (a fixture: the function it wraps), else None."""
    function = getattr(value, "__wrapped__", value)
    if isinstance(function, types.FunctionType) and function.__module__ == module.get("__name__"):
        return function
    return None


def _reads_data(code: types.CodeType, module: dict, seen: set) -> bool:
    """Whether ``code`` names a module global that points into the data, directly or through the module's own
    functions and fixtures that it calls (names only: a cheap, conservative reading of the test's code)."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _reads_data(const, module, seen):
            return True
    for name in set(code.co_names) - seen:
        seen.add(name)
        value = module.get(name)
        function = _own_function(value, module)
        if _points_into_data(value) or (function and _reads_data(function.__code__, module, seen)):
            return True
    return False


# Tests that reach the data in a way their code does not name (none now: every test names SHARED_DATA's paths).
READS_DATA_UNNAMED: set[str] = set()


def _needs_data(item: pytest.Item) -> bool:
    if not isinstance(item, pytest.Function):
        return False
    if "uf_pairs" in item.fixturenames or f"{item.path.name}::{item.originalname}" in READS_DATA_UNNAMED:
        return True
    module, seen = vars(item.module), set()
    fixtures = [_own_function(module.get(name), module) for name in item.fixturenames]
    return any(_reads_data(f.__code__, module, seen) for f in [item.function, *filter(None, fixtures)])


class _DataModule(pytest.Module):
    """A test module whose import reads ``../shared/data`` (a table loaded at module level) is skipped with
    the reason when the data is absent, instead of failing the collection."""

    def _getobj(self):
        try:
            return super()._getobj()
        except FileNotFoundError as error:
            if SHARED_DATA.exists() or not str(error.filename or "").startswith(str(SHARED_DATA)):
                raise
            raise pytest.skip.Exception(f"{self.path.name} reads {error.filename} at import: {NO_DATA}",
                                        allow_module_level=True) from error


def pytest_pycollect_makemodule(module_path: Path, parent):
    return _DataModule.from_parent(parent, path=module_path)


def pytest_configure(config: pytest.Config) -> None:
    # ``make test`` runs pytest under the perpair program's allocator (Makefile, ``PRELOADED``): out of the environment
    # of the processes tests start (a fresh ``perpair``, which preloads for itself; a llama.cpp server; a browser).
    # The controller of pytest-xdist workers keeps it in its environment for the workers it starts.
    if "PERPAIR_TEST_PRELOADED" in os.environ and (hasattr(config, "workerinput")
                                                    or not getattr(config.option, "numprocesses", None)):
        from perpair.preload import remove_preloads

        remove_preloads(os.environ.pop("PERPAIR_TEST_PRELOADED").split(":"))
    # Under pytest-xdist (``make test``: ``-n 2``) each worker gets its share of the cores, so that two
    # workers' torch threads do not contend (OpenMP threads spin while waiting for a descheduled peer).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = str(max(1, (os.cpu_count() or 1) // workers))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = share  # and every process a test starts
        import torch

        torch.set_num_threads(int(share))
    if workers > 1:
        # the llama.cpp server a worker starts computes on that worker's share too (tests/llama_server.py)
        os.environ.setdefault("PERPAIR_TEST_LLAMA_THREADS", share)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_data = not SHARED_DATA.exists()
    for item in items:
        item.add_marker(layer_of(item))
        if "llama_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.llama_server)
        if no_data and _needs_data(item):
            item.add_marker(pytest.mark.skip(reason=NO_DATA))
    server_tests = {_test_name(item.nodeid) for item in items if item.get_closest_marker("llama_server")}
    if server_tests - LLAMA_SERVER_TESTS:  # the scheduler below would spread them over the workers
        raise pytest.UsageError("tests/conftest.py LLAMA_SERVER_TESTS lacks tests of the llama.cpp server: "
                                f"{', '.join(sorted(server_tests - LLAMA_SERVER_TESTS))}")
    # A LAYERS entry naming a test that no longer exists (renamed, removed) would silently stop applying
    modules = {item.path.name: item.module for item in items if isinstance(item, pytest.Function)}
    stale = [name for name in LAYERS if "::" in name and name.split("::")[0] in modules
             and not hasattr(modules[name.split("::")[0]], name.split("::")[1])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py LAYERS names tests that do not exist: {', '.join(stale)}")


# --- make test: one pass on two workers, the llama.cpp server's tests on one of them --------------------------

# The tests that take the ``llama_server`` fixture (pytest_collection_modifyitems refuses a run where one is missing
# here). Under pytest-xdist's ``--dist worksteal`` (``make test``) one worker runs them all, first, one after the
# other, so that they share one server and its memo of answers (tests/llama_server.py), with the server computing on
# that worker's share of the cores (PERPAIR_TEST_LLAMA_THREADS) while the other worker runs the rest of the suite.
LLAMA_SERVER_TESTS = {
    "test_annotate_server.py::test_50_pairs_against_llama_cpp",
    "test_annotate_server.py::test_faults_are_retried_within_the_bound",
    "test_annotate_server.py::test_sigkill_and_resume_loses_nothing_and_repeats_nothing",
    "test_eval_alpaca_e2e.py::test_llama_cpp_server_judge",
}


def _test_name(nodeid: str) -> str:
    """``file.py::test`` of a node id (its folder and parameters left out)."""
    path, _, name = nodeid.partition("::")
    return f"{Path(path).name}::{name.split('[')[0]}"


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist worksteal`` keeping the llama.cpp server's tests on one worker.

    pytest-xdist's worksteal hands each worker a contiguous share of the tests in file order and, when one runs
    out, moves the last half of the other's pending tests to it. Its ``loadgroup``, which keeps marked tests on one
    worker, does so by appending the group to a test's node id, which pytest 9 no longer takes (the group was
    spread over both workers). So this scheduler puts :data:`LLAMA_SERVER_TESTS` at the start of the last worker's
    share: that worker runs them first, and a steal, which takes pending tests from the end, leaves them there. The
    other shares begin with the first files, mostly tests of one process, so the server's core is not also asked
    for by the launches of two processes that fill the later files."""
    if config.getoption("dist") != "worksteal":
        return None
    from xdist.scheduler import WorkStealingScheduling

    class ServerTestsTogether(WorkStealingScheduling):
        placed = False

        def check_schedule(self) -> None:
            if self.collection is not None and not self.placed:  # before the first distribution
                self.placed = True
                server = [i for i in self.pending if _test_name(self.collection[i]) in LLAMA_SERVER_TESTS]
                rest = [i for i in self.pending if i not in server]
                start, left = 0, len(self.pending)  # where the last share begins, as check_schedule splits
                for n in range(len(self.node2pending), 1, -1):
                    start, left = start + left // n, left - left // n
                self.pending[:] = rest[:start] + server + rest[start:]
            super().check_schedule()

    return ServerTestsTogether(config, log)


def cached_call_keys(cache: Path) -> set[str]:
    """The keys of the answers an annotation cache holds (read while a run may be writing it)."""
    if not cache.exists():
        return set()
    db = sqlite3.connect(cache, timeout=30)
    try:
        return {row[0] for row in db.execute("SELECT key FROM calls")}
    except sqlite3.OperationalError:  # created, its table not yet
        return set()
    finally:
        db.close()
