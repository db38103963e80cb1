"""The suite runs the command line in its own process (``conftest.run_cli``): here the same commands, one per
stage and outcome, run both ways, and must answer alike: exit status, stdout, stderr and the files written."""

from __future__ import annotations

import shutil

import pytest

from conftest import FIXTURES, run_cli
from plan_helpers import make_pairs


def _both(tmp_path, *args: str):
    """``args`` (with ``{out}`` standing for an output folder) in this process, then in a fresh one, each
    writing into the same (emptied) folder, as what a command writes may name where it writes."""
    out, results = tmp_path / "out", []
    command = [str(a).format(out=out) for a in args]
    for fresh in (False, True):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        result = run_cli(*command, check=False, fresh=fresh)
        files = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        results.append((result.returncode, result.stdout, result.stderr, files))
    return results


@pytest.mark.parametrize("args", [
    ("prepare", FIXTURES / "ultrafeedback_raw.jsonl", "-o", "{out}/pairs.parquet"),          # a stage that works
    ("prepare", FIXTURES / "ultrafeedback_raw.jsonl", "--format", "trl", "-o", "{out}/p.parquet"),  # bad input
    ("train", "--model", "{out}/absent", "--data", "{out}/absent.parquet", "--out", "{out}/run",
     "--set", "betas=0.1"),                                                                  # a bad option
], ids=["prepare", "prepare-refused", "train-refused"])
def test_a_command_answers_in_this_process_as_in_a_fresh_one(tmp_path, args):
    inprocess, fresh = _both(tmp_path, *args)
    assert inprocess == fresh


def test_a_plan_and_its_report_are_the_same_both_ways(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(7.0, 5.0), (6.0, 6.0), (9.0, 2.0)])
    inprocess, fresh = _both(tmp_path, "plan", pairs, "--preset", "mixdpo", "-o", "{out}/plan.parquet", "--json")
    assert inprocess[0] == 0 and inprocess == fresh


@pytest.mark.parametrize("args, names", [
    (("train", "--bogus"), "No such option: --bogus (Possible options: --loss, --out) (see 'perpair train --help')"),
    (("bench", "controlled", "--seeds", "abc"), "Invalid value for '--seeds'"),
    (("eval", "alpaca-eval", "--limit", "x"), "Invalid value for '--limit'"),
    (("prepare",), "Missing option '--output' / '-o'."),
    (("nonexistent",), "No such command 'nonexistent'. (see 'perpair --help')"),
], ids=["unknown-option", "not-a-number", "not-a-number-eval", "missing-option", "unknown-command"])
def test_a_wrong_option_or_value_is_one_error_line(args, names):
    """Typer drew a box of five lines around a bad option or value (`Usage: …`, `Try … --help`, `╭─ Error ─…`);
    the command line's own errors are one `error:` line. Now these are too, naming the command whose --help lists
    what it takes; exit status 2 as before."""
    result = run_cli(*args, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert names in result.stderr


def test_help_and_no_command_answer_as_before():
    """`--help` prints the help (exit 0); `perpair` or a command group alone prints its help and exits 2."""
    assert "Usage: perpair plan" in run_cli("plan", "--help").stdout
    for args in ((), ("eval",)):
        result = run_cli(*args, check=False)
        assert result.returncode == 2 and "Usage: perpair" in result.stdout + result.stderr
        assert "error:" not in result.stderr


def test_an_option_given_twice_is_refused_in_every_command(tmp_path):
    """Click keeps the last of an option given twice: `--chosen-col a … --chosen-col b` read b, `--report …
    --no-report` the second, without a word. Every command refuses it; options that take several values
    (`--set`, `--teacher`) still do."""
    from cli_inprocess import run_cli_inprocess
    from conftest import UF_TRAIN

    out = tmp_path / "p.parquet"
    for args in (("prepare", UF_TRAIN, "--limit", "3", "--limit", "4", "-o", out),
                 ("prepare", UF_TRAIN, "--limit=3", "--limit", "4", "-o", out),
                 ("plan", out, "--preset", "dpo", "--report", "--no-report", "-o", tmp_path / "plan.parquet")):
        result = run_cli_inprocess(*args)
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: --") and "both given: one would be dropped without a word" in lines[0]
    assert not out.exists()
    assert run_cli_inprocess("prepare", UF_TRAIN, "--limit", "3", "-o", out).returncode == 0
