"""Every `perpair prepare` case of issue 14: exit status, the one `error:` line, and what is on disk."""

from __future__ import annotations

import gzip
import importlib
import json
import time

import pytest

import perpair.artifacts
import perpair.data.sources
from cli_inprocess import run_cli_inprocess
from conftest import SHARED_DATA, UF_TRAIN, run_cli
from perpair.data import read_pairs

GOOD = {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_error(result):
    """The single `error:` line of a failed run (and proof that nothing else was printed to stderr)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def nothing_written(folder):
    """No artifact and no temporary file left in ``folder`` besides the inputs."""
    return not [p for p in folder.iterdir() if p.suffix == ".parquet" or ".tmp-" in p.name]


def test_a_mapped_column_missing_from_the_data_is_an_error_naming_it(tmp_path):
    result = run_cli("prepare", UF_TRAIN, "--prompt-col", "no_such_column", "-o", tmp_path / "x.parquet",
                     check=False)
    assert one_error(result) == (
        f"error: file {UF_TRAIN}, row 1, field 'no_such_column': --prompt-col names column 'no_such_column', "
        "which is not in the data (the row has: chosen, metadata, prompt, rejected, source_index)")
    assert nothing_written(tmp_path)
    # The same for a score column, and with --skip-invalid (a wrong mapping is not a bad row).
    result = run_cli_inprocess("prepare", UF_TRAIN, "--score-chosen-col", "metadata.nope", "--score-rejected-col",
                               "metadata.score_rejected", "--skip-invalid", "-o", tmp_path / "x.parquet")
    assert "--score-chosen-col names column 'metadata.nope', which is not in the data (the row has: chosen, " \
           "metadata, prompt" in one_error(result)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(("rows", "options", "summary"), [
    ([], [], "no pairs kept, nothing written: the source has no rows"),
    ([{"a": 1}, "not json", {"prompt": 3, "chosen": "x", "rejected": "y"}], ["--skip-invalid", "--format", "trl"],
     "3 rows read, none kept (malformed: missing_field:chosen × 1, undecodable_json × 1, wrong_type:prompt × 1)"),
    ([{**GOOD, "rejected": "7"}, {**GOOD, "chosen": " "}], [],
     "2 rows read, none kept (degenerate: empty_chosen × 1, identical_responses × 1)"),
])
def test_a_run_that_keeps_no_pair_is_an_error(tmp_path, rows, options, summary):
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    line = one_error(run_cli_inprocess("prepare", source, *options, "-o", tmp_path / "out.parquet"))
    assert line.startswith(f"error: file {source}: ") and summary in line
    assert nothing_written(tmp_path)


def test_an_empty_split_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    line = one_error(run_cli_inprocess("prepare", source, "--test-fraction", "0.01", "-o", tmp_path / "o.parquet"))
    assert "the test split is empty (1 pairs, --test-fraction 0.01); nothing written" in line
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("role", ["[/x]", "human", "gpt"])
def test_a_role_outside_the_four_is_an_error_naming_row_and_field(tmp_path, role):
    rows = [GOOD, {"prompt": [{"role": role, "content": "hi"}], "chosen": "a", "rejected": "b"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    line = one_error(run_cli_inprocess("prepare", source, "-o", tmp_path / "o.parquet"))
    assert f"row 2, field 'prompt[0].role': role '{role}' is not one of system, user, assistant, tool" in line
    assert nothing_written(tmp_path)


def test_an_output_equal_to_an_input_is_refused(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    before = source.read_bytes()
    for output in (source, tmp_path / "." / "in.jsonl"):
        line = one_error(run_cli_inprocess("prepare", source, "-o", output))
        assert "the output is also an input; writing it would destroy the input" in line
    assert source.read_bytes() == before
    # The test split's sibling file counts too.
    sibling = write_jsonl(tmp_path / "p.test.parquet", [GOOD])
    line = one_error(run_cli_inprocess("prepare", sibling, "--test-fraction", "0.5", "-o", tmp_path / "p.parquet"))
    assert "the output is also an input" in line and not (tmp_path / "p.parquet").exists()


def test_a_plan_or_annotations_file_given_as_data_is_named_as_such(tmp_path, tiny_model_dir):
    """`perpair prepare plan.parquet` (or `perpair train --data plan.parquet`) said it could not tell the layout from
    the plan's columns; a perpair artifact other than pairs is now named as what it is."""
    from plan_helpers import make_pairs

    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0), (6.0, 1.0)])
    plan = tmp_path / "plan.parquet"
    run_cli("plan", pairs, "--preset", "dpo", "-o", plan, "--no-report")
    for args in (("prepare", plan, "-o", tmp_path / "out.parquet"),
                 ("train", "--model", tiny_model_dir, "--data", plan, "--out", tmp_path / "run", "--steps", "1")):
        assert one_error(run_cli_inprocess(*args)) == (
            f"error: file {plan}: a perpair plan file, not pairs or data of pairs: give the pairs file (perpair "
            "prepare's output) or the data it was prepared from"), args
    assert not (tmp_path / "out.parquet").exists()
    # a pairs file is data as before
    assert run_cli_inprocess("prepare", pairs, "-o", tmp_path / "again.parquet").returncode == 0


@pytest.mark.parametrize("spec", ["bad/nonexist.jsonl", "./nonexist", "data/x.parquet", "/no/such/file"])
def test_a_missing_local_looking_path_is_not_sent_to_the_hub(tmp_path, spec):
    start = time.perf_counter()
    line = one_error(run_cli_inprocess("prepare", spec, "-o", tmp_path / "o.parquet"))
    assert time.perf_counter() - start < 5
    assert line.startswith(f"error: file {spec}: no such file")
    if "/" in spec and not spec.startswith(("/", ".")):
        assert f"not looked up as a Hugging Face dataset id; write hub:{spec} for that" in line


def test_a_hub_dataset_is_asked_for_before_datasets_loads_it(tmp_path, monkeypatch):
    """On a machine without network, `perpair prepare hub:ORG/NAME` of a dataset in the Hub cache handed it to Datasets
    without a word, which asked the Hub again with five retries (24 s) before reading its cache or failing. Asked
    first (perpair.models.hub_commit), as a model is: Datasets then reads its caches at once, said in one line."""
    import datasets
    from huggingface_hub import HfApi, constants

    from perpair.models import hub_commit

    def repo_info(self, repo_id, **_):
        raise ConnectionError("no network")

    offline_when_loaded = []

    def load_dataset(name, split=None, revision=None):
        offline_when_loaded.append((name, constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}])

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    refs = tmp_path / "hub" / "datasets--org--prefs" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("d" * 40)
    hub_commit.cache_clear()
    try:
        result = run_cli_inprocess("prepare", "hub:org/prefs", "-o", tmp_path / "out.parquet")
    finally:
        hub_commit.cache_clear()
    assert result.returncode == 0, result.stderr
    assert offline_when_loaded == [("org/prefs", True, True)]
    assert result.stderr.startswith("note: the Hugging Face Hub could not be reached (no network): org/prefs")


def test_a_folder_that_is_no_dataset_is_one_short_error_line(tmp_path):
    """The whole data folder, whose files have other columns and whose README the Hub library reads: Datasets'
    error lists every file of the folder, and it and the Hub library print progress bars and notices; the user
    gets one error line naming the folder, the error's start and end (Datasets' advice), and how much was cut."""
    # a new process: the libraries' loggers write to the stderr they found when first used
    line = one_error(run_cli("prepare", SHARED_DATA, "-o", tmp_path / "o.parquet", check=False, fresh=True))
    assert line.startswith(f"error: file {SHARED_DATA}: loading it as a dataset (split 'train') failed: "
                           "DatasetGenerationCastError: ")
    assert len(line) < 700 and "characters cut) … " in line and line.endswith("#multiple-configurations)")
    assert nothing_written(tmp_path)


def test_a_folder_of_json_files_is_read_file_by_file(tmp_path):
    """AlpacaEval's annotation files (JSON, no pairs in them): read one by one, the error names the first file
    and its row, as for a file given alone."""
    folder = SHARED_DATA / "alpaca_eval" / "annotations"
    first = sorted(folder.iterdir())[0]
    line = one_error(run_cli_inprocess("prepare", folder, "-o", tmp_path / "o.parquet"))
    assert line.startswith(f"error: file {first}, row 1: cannot tell the layout from the fields")
    assert nothing_written(tmp_path)


def test_a_folder_with_data_files_datasets_would_leave_out_is_refused(tmp_path):
    """A folder of JSON Lines files and a Parquet file: Datasets loads the files of one format only, so the Parquet
    file's rows were left out with exit 0. The folder is refused, naming the file; its other files (a README, a
    dataset_info.json) do not count."""
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", [GOOD])
    write_jsonl(folder / "b.jsonl", [{**GOOD, "prompt": "Name another prime."}])
    (folder / "README.md").write_text("# my data\n")
    (folder / "dataset_info.json").write_text("{}")
    result = run_cli_inprocess("prepare", folder, "-o", tmp_path / "o.parquet")
    assert result.returncode == 0, result.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**GOOD, "prompt": "A third prime?"}]), folder / "c.parquet")
    line = one_error(run_cli_inprocess("prepare", folder, "-o", tmp_path / "o2.parquet"))
    assert line == (f"error: file {folder}: the folder also holds c.parquet, a data file Datasets would not load with "
                    "the others (it loads the folder's json files only): give the files to read as sources, or move "
                    "the others out")
    assert not (tmp_path / "o2.parquet").exists()
    # A README whose header chooses the files (as on the Hub) says the others are no part of the data.
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: a.jsonl\n---\n# my data\n")
    result = run_cli_inprocess("prepare", folder, "-o", tmp_path / "o2.parquet")
    assert result.returncode == 0, result.stderr
    assert read_pairs(str(tmp_path / "o2.parquet"))[0].column("source").to_pylist() == ["data/a.jsonl"]


def test_a_bad_option_value_names_the_option(tmp_path):
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "o.parquet", "--test-fraction", "1.5", check=False)
    assert one_error(result) == "error: invalid options: --test-fraction: Input should be less than 1"
    line = one_error(run_cli_inprocess("prepare", UF_TRAIN, "-o", tmp_path / "o.parquet", "--limit", "0"))
    assert line == "error: invalid options: --limit: Input should be greater than or equal to 1"
    assert nothing_written(tmp_path)


def test_names_with_brackets_are_printed_as_they_are(tmp_path):
    """Rich would read `[final]` and `[/x]` as markup: the first vanished, the second crashed after writing."""
    source = write_jsonl(tmp_path / "train[final].jsonl", [GOOD])
    result = run_cli("prepare", source, "-o", tmp_path / "out[/x].parquet")
    assert f"{source} (trl): 1 rows read, 1 pairs kept" in result.stdout
    assert f"wrote 1 train pairs to {tmp_path / 'out[/x].parquet'}" in result.stdout
    assert read_pairs(str(tmp_path / "out[/x].parquet"))[0].num_rows == 1
    bad = write_jsonl(tmp_path / "[bold]x[/bold].jsonl", [{**GOOD, "prompt": [{"role": "[red]r", "content": "q"}]}])
    line = one_error(run_cli_inprocess("prepare", bad, "-o", tmp_path / "o.parquet"))
    assert f"error: file {bad}, row 1, field 'prompt[0].role': role '[red]r'" in line


def test_deeply_nested_json_is_an_error_not_a_traceback(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    source = write_jsonl(tmp_path / "deep.jsonl", [json.dumps(GOOD), '{"prompt": ' + deep + "}"])
    result = run_cli("prepare", source, "-o", tmp_path / "o.parquet", check=False)
    assert one_error(result).endswith("row 2: line is JSON nested too deeply to read (use --skip-invalid to skip "
                                      "and count malformed rows)")
    # Skipped and counted like any malformed row.
    result = run_cli_inprocess("prepare", source, "--skip-invalid", "-o", tmp_path / "o.parquet")
    assert result.returncode == 0 and "nested_too_deeply × 1 (rows 2)" in result.stdout
    (tmp_path / "o.parquet").unlink()
    array = tmp_path / "deep.json"
    array.write_text("[" + deep + "]")
    assert one_error(run_cli_inprocess("prepare", array, "-o", tmp_path / "o.parquet")) == \
        f"error: file {array}: JSON nested too deeply to read"
    assert nothing_written(tmp_path)


def test_an_output_naming_a_folder_is_an_error(tmp_path):
    (tmp_path / "out").mkdir()
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "out", check=False)
    assert one_error(result) == f"error: file {tmp_path / 'out'}: the output is a folder; name a file (e.g. " \
                                "pairs.parquet)"
    (tmp_path / "o.test.parquet").mkdir()                 # the test split's file is checked before reading too
    line = one_error(run_cli_inprocess("prepare", UF_TRAIN, "--test-fraction", "0.1", "-o", tmp_path / "o.parquet"))
    assert "o.test.parquet: the output is a folder" in line
    assert nothing_written(tmp_path / "out") and not (tmp_path / "o.parquet").exists()


def test_an_unwritable_output_is_an_error_naming_it(tmp_path):
    # Running as root, file modes do not stop writes; /sys is a read-only place for everyone.
    line = one_error(run_cli_inprocess("prepare", UF_TRAIN, "-o", "/sys/pairs.parquet"))
    assert line.startswith("error: file /sys/pairs.parquet: cannot write it (") and "ermission denied" in line


def test_an_unreadable_input_is_an_error_naming_it(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(perpair.data.sources, "file_sha256", denied)
    line = one_error(run_cli_inprocess("prepare", UF_TRAIN, "-o", tmp_path / "o.parquet"))
    assert line == f"error: {UF_TRAIN}: Permission denied"
    assert nothing_written(tmp_path)


def test_a_failed_test_split_write_leaves_no_train_file(tmp_path, monkeypatch):
    calls = []
    real = perpair.artifacts.write_artifact

    def second_fails(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module("perpair.data.prepare"), "write_artifact", second_fails)
    line = one_error(run_cli_inprocess("prepare", UF_TRAIN, "--test-fraction", "0.1", "-o", tmp_path / "o.parquet"))
    assert line == f"error: file {tmp_path / 'o.test.parquet'}: cannot write it (No space left on device)"
    assert len(calls) == 2 and nothing_written(tmp_path)


def test_an_undecodable_source_is_an_error(tmp_path):
    source = tmp_path / "latin1.json"
    source.write_bytes('[{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]'.encode("latin-1"))
    assert one_error(run_cli_inprocess("prepare", source, "-o", tmp_path / "o.parquet")) == \
        f"error: file {source}: file is not valid UTF-8 (byte offset 16)"
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xff\xfe" + json.dumps(GOOD).encode()))
    assert "row 1: line is not valid UTF-8" in one_error(run_cli_inprocess("prepare", gz, "-o", tmp_path / "o.parquet"))
    assert nothing_written(tmp_path)


def test_a_line_cut_short_is_reported_at_its_end(tmp_path):
    """json.loads saw the line with its line break, so a truncated line was "Expecting value at column 1" (of the
    break's next line): the column must point at the line's end."""
    line = '{"prompt": "What is 2+2?", "chosen": "4", "rejected":'
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n", encoding="utf-8")
    result = run_cli("prepare", path, "-o", tmp_path / "out.parquet", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"row 2: line is not valid JSON, truncated or corrupt (Expecting value at column {len(line) + 1})" \
        in result.stderr
    # a line cut inside a string: json's "Unterminated string starting at" (its position) read "at at column"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "What is 2+2\n', encoding="utf-8")
    result = run_cli("prepare", path, "-o", tmp_path / "out.parquet", check=False)
    assert "truncated or corrupt (Unterminated string starting at column 12)" in result.stderr, result.stderr


def test_an_empty_output_path_is_refused_as_such(tmp_path):
    """-o '' (an unset variable in a script) was taken for the current folder ("file .: the output is a folder"),
    where the other commands say what it is."""
    source = tmp_path / "rows.jsonl"
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    result = run_cli("prepare", source, "-o", "", check=False)
    assert result.returncode == 2 and result.stderr == "error: -o/--output: an empty path; give the path to write\n"
