"""Each reader and source type on small inputs written here."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURES, UF_TRAIN, run_cli
from perpair.data import PrepareOptions, prepare, read_pairs
from perpair.data.prepare import in_test_split
from perpair.data.sources import Source, iter_rows
from perpair.errors import InputError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(path):
    return read_pairs(str(path))[0].to_pylist()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_raw_ultrafeedback_binarizes_like_the_h4_recipe(tmp_path):
    out = tmp_path / "raw.parquet"
    result = prepare([str(FIXTURES / "ultrafeedback_raw.jsonl")], out)
    rows = pairs(out)
    raw = [json.loads(line) for line in (FIXTURES / "ultrafeedback_raw.jsonl").read_text().splitlines()]
    assert [r["source_row"] for r in rows] == [1, 2]
    for r in rows:
        completions = raw[r["source_row"] - 1]["completions"]
        best = max(c["overall_score"] for c in completions)
        assert r["score_chosen"] == best
        chosen = next(c for c in completions if c["response"] == r["chosen"][0]["content"])
        rejected = next(c for c in completions if c["response"] == r["rejected"][0]["content"])
        assert chosen is not rejected
        assert dict(r["ratings_chosen"]) == {
            k: float(v["Rating"]) for k, v in chosen["annotations"].items() if v["Rating"] != "N/A"}
        assert dict(r["ratings_rejected"]) == {
            k: float(v["Rating"]) for k, v in rejected["annotations"].items() if v["Rating"] != "N/A"}
    # Row 2 has two completions at the best score: the first in list order is chosen.
    assert rows[1]["chosen"][0]["content"].startswith("Crimson")
    degenerate = result.sources[0].degenerate.rows
    assert degenerate == {"identical_responses": [3], "too_few_responses": [4]}


def test_raw_ultrafeedback_rejected_choice_is_seeded_and_order_free(tmp_path):
    lines = (FIXTURES / "ultrafeedback_raw.jsonl").read_text().splitlines()
    write_jsonl(tmp_path / "reversed.jsonl", [json.loads(line) for line in reversed(lines)])
    chosen_by_seed = {}
    for seed in range(8):
        forward = pairs(prepare([str(FIXTURES / "ultrafeedback_raw.jsonl")], tmp_path / f"f{seed}.parquet",
                                PrepareOptions(seed=seed)).outputs["train"])
        backward = pairs(prepare([str(tmp_path / "reversed.jsonl")], tmp_path / f"b{seed}.parquet",
                                 PrepareOptions(seed=seed)).outputs["train"])
        assert {r["pair_id"] for r in forward} == {r["pair_id"] for r in backward}
        chosen_by_seed[seed] = forward[0]["rejected"][0]["content"]
    assert len(set(chosen_by_seed.values())) > 1  # the seed matters


def test_trl_standard_explicit_and_implicit_prompt(tmp_path):
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    a = pairs(prepare([str(explicit)], tmp_path / "a.parquet").outputs["train"])[0]
    b = pairs(prepare([str(implicit)], tmp_path / "b.parquet").outputs["train"])[0]
    assert b["prompt"] == [user("The sky is ")]
    assert b["chosen"] == [assistant("blue.")] and b["rejected"] == [assistant("green.")]
    assert a["pair_id"] == b["pair_id"]  # same content once normalised


def test_trl_conversational_explicit_and_implicit_prompt(tmp_path):
    prompt = [{"role": "system", "content": "Be terse."}, user("2+2?")]
    rows_explicit = [{"prompt": prompt, "chosen": [assistant("4")], "rejected": [assistant("5")]}]
    rows_implicit = [{"chosen": prompt + [assistant("4")], "rejected": prompt + [assistant("5")]}]
    a = pairs(prepare([str(write_jsonl(tmp_path / "e.jsonl", rows_explicit))], tmp_path / "a.parquet")
              .outputs["train"])[0]
    b = pairs(prepare([str(write_jsonl(tmp_path / "i.jsonl", rows_implicit))], tmp_path / "b.parquet")
              .outputs["train"])[0]
    assert a["prompt"] == b["prompt"] == prompt
    assert a["pair_id"] == b["pair_id"]
    assert a["score_chosen"] is None


def test_column_mapping_with_nested_fields(tmp_path):
    rows = [{"q": {"text": "Name a prime."}, "good": "7", "bad": "8", "s": {"good": 9, "bad": 2}}]
    out = tmp_path / "m.parquet"
    prepare([str(write_jsonl(tmp_path / "m.jsonl", rows))], out, PrepareOptions(
        prompt_col="q.text", chosen_col="good", rejected_col="bad", score_chosen_col="s.good",
        score_rejected_col="s.bad"))
    row = pairs(out)[0]
    assert row["prompt"] == [user("Name a prime.")] and row["chosen"] == [assistant("7")]
    assert (row["score_chosen"], row["score_rejected"]) == (9.0, 2.0)
    with pytest.raises(InputError, match="row 1, field 's.bad'"):
        write_jsonl(tmp_path / "m2.jsonl", [{**rows[0], "s": {"good": 9}}])
        prepare([str(tmp_path / "m2.jsonl")], tmp_path / "m2.parquet", PrepareOptions(
            prompt_col="q.text", chosen_col="good", rejected_col="bad", score_chosen_col="s.good",
            score_rejected_col="s.bad"))


def test_unknown_layout_asks_for_a_format_or_mapping(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match=r"row 1.*--format"):
        prepare([str(path)], tmp_path / "o.parquet")


def test_json_array_parquet_and_dataset_folder_sources(tmp_path):
    """A local dataset folder: the files of its split, as Datasets picks them, read one by one (the other split's
    file left alone); and the Hub code path (datasets.load_dataset) on the same folder gives the same rows."""
    rows = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][:20]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    folder = tmp_path / "dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:12]), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[12:]), folder / "train-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "test-00000.parquet")
    ids = []
    for source in (tmp_path / "rows.json", folder):
        out = tmp_path / f"{source.name}.parquet"
        result = prepare([str(source)], out)
        ids.append([r["pair_id"] for r in pairs(out)])
        assert {report.format for report in result.sources} == {"ultrafeedback"}
    assert ids[0] == ids[1] and len(ids[0]) == 20
    table, provenance = read_pairs(str(tmp_path / "dataset.parquet"))
    assert [s["path"] for s in provenance["sources"]] == [str(folder / "train-00000.parquet"),
                                                          str(folder / "train-00001.parquet")]
    assert table.column("source").to_pylist() == ["dataset/train-00000.parquet"] * 12 + \
        ["dataset/train-00001.parquet"] * 8
    assert table.column("source_row").to_pylist() == [*range(1, 13), *range(1, 9)]
    hub_path = Source(str(folder), "dataset", "train")
    provenance = {}
    assert [value for _, value, _ in iter_rows(hub_path, provenance)] == rows
    assert provenance["fingerprint"]


def test_folders_written_by_save_to_disk(tmp_path):
    """A folder of ``Dataset.save_to_disk`` (which ``datasets.load_dataset`` refuses: "use load_from_disk") and one
    of ``DatasetDict.save_to_disk`` (its split chosen by --split) give the rows they hold."""
    import datasets

    rows = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][:6]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "two"))
    for spec, options, expected in ((tmp_path / "one", {}, rows), (tmp_path / "two", {}, rows[:4]),
                                    (tmp_path / "two", {"split": "test"}, rows[4:])):
        out = tmp_path / "out.parquet"
        prepare([str(spec)], out, PrepareOptions(**options))
        assert [json.loads(r["meta"]) for r in pairs(out)] == expected
        assert [r["chosen"][0]["content"] for r in pairs(out)] == [r["chosen"] for r in expected]
    with pytest.raises(InputError, match="holds one dataset, without splits"):
        prepare([str(tmp_path / "one")], tmp_path / "out.parquet", PrepareOptions(split="test"))


def test_a_parquet_column_named_twice_is_refused(tmp_path):
    """Parquet allows two columns (or two fields of a struct) of one name; a row read from it kept the last one's
    value (Datasets refuses the file): which one the data means is unknown."""
    text = pa.array(["Q"]), pa.array(["A"]), pa.array(["B"]), pa.array(["A"])
    pq.write_table(pa.Table.from_arrays(list(text), names=["prompt", "chosen", "rejected", "rejected"]),
                   tmp_path / "top.parquet")
    message = pa.StructArray.from_arrays([pa.array(["user"]), pa.array(["assistant"]), pa.array(["Q"])],
                                         names=["role", "role", "content"])
    pq.write_table(pa.Table.from_arrays([pa.ListArray.from_arrays([0, 1], message), *text[1:3]],
                                        names=["prompt", "chosen", "rejected"]), tmp_path / "nested.parquet")
    for name, column in (("top", "rejected"), ("nested", "prompt.role")):
        with pytest.raises(InputError, match=rf"file .*{name}.parquet, field '{column}': the column is named twice"):
            prepare([str(tmp_path / f"{name}.parquet")], tmp_path / "out.parquet")


def test_missing_source_is_a_clear_error(tmp_path):
    result = run_cli("prepare", tmp_path / "nope.jsonl", "-o", tmp_path / "o.parquet", check=False)
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_utf8_line_and_truncated_gzip(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'.encode("latin-1")
                     + b"\n")
    with pytest.raises(InputError, match=r"row 2: line is not valid UTF-8"):
        prepare([str(path)], tmp_path / "o.parquet")
    result = prepare([str(path)], tmp_path / "o.parquet", PrepareOptions(skip_invalid=True))
    assert result.sources[0].invalid.rows == {"not_utf8": [2]}
    assert result.counts == {"train": 1}

    data = gzip.compress(gzip.open(UF_TRAIN).read())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "cut.parquet")
    assert not (tmp_path / "cut.parquet").exists()


def test_several_sources_limit_and_duplicates(tmp_path):
    rows = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][:30]
    first = write_jsonl(tmp_path / "a.jsonl", rows[:20])
    second = write_jsonl(tmp_path / "b.jsonl", rows[10:30])  # rows 1-10 repeat the first file's 11-20
    out = tmp_path / "ab.parquet"
    result = prepare([str(first), str(second)], out)
    assert result.counts == {"train": 30}
    assert result.sources[1].duplicates.rows == {"duplicate": list(range(1, 11))}
    assert [r["source"] for r in pairs(out)] == ["a.jsonl"] * 20 + ["b.jsonl"] * 10
    limited = prepare([str(first), str(second)], tmp_path / "l.parquet", PrepareOptions(limit=25))
    assert limited.counts == {"train": 25}


def test_test_split_is_deterministic_and_disjoint(tmp_path):
    result = prepare([str(UF_TRAIN)], tmp_path / "s.parquet", PrepareOptions(test_fraction=0.2, seed=3))
    train = {r["pair_id"] for r in pairs(result.outputs["train"])}
    test = {r["pair_id"] for r in pairs(result.outputs["test"])}
    assert result.outputs["test"].name == "s.test.parquet"
    assert not train & test and len(train | test) == 994
    assert 150 < len(test) < 250
    assert all(in_test_split(pair_id, 3, 0.2) for pair_id in test)
    other = prepare([str(UF_TRAIN)], tmp_path / "t.parquet", PrepareOptions(test_fraction=0.2, seed=4))
    assert {r["pair_id"] for r in pairs(other.outputs["test"])} != test


def test_invalid_options_are_reported(tmp_path):
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "o.parquet", "--test-fraction", "1.5", check=False)
    assert result.returncode == 2 and "invalid options" in result.stderr
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "o.parquet", "--format", "csv", check=False)
    # named by the option (it said "unknown format 'csv'" alone, as it does the run config's data.format)
    assert result.returncode == 2 and "error: invalid options: --format: unknown format 'csv'; known formats: " \
        "ultrafeedback," in result.stderr


def test_inspect_refuses_a_file_that_is_not_a_pairs_artifact(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    result = run_cli("inspect", tmp_path / "x.parquet", check=False)
    assert result.returncode == 2 and "not a perpair artifact" in result.stderr


@pytest.mark.parametrize("edit", ["no chosen", "chosen as text", "a null rejected"])
def test_a_pairs_file_of_other_columns_is_one_error_naming_the_column(uf_pairs, tmp_path, edit):
    """A file with a pairs header whose columns are not a pairs file's (another program wrote it, or it was edited):
    `perpair annotate --teacher ratings` annotated one without its responses (exit 0), and training ended in a
    KeyError or TypeError traceback. Each stage reads pairs through read_pairs, which refuses it naming the column."""
    table = pq.read_table(uf_pairs)
    metadata = table.schema.metadata
    if edit == "no chosen":
        table = table.drop_columns(["chosen"])
        said = "no column 'chosen'; a pairs file holds pair_id, prompt, chosen, rejected"
    elif edit == "chosen as text":
        table = table.set_column(table.column_names.index("chosen"), "chosen", pa.array(["yes"] * len(table)))
        said = "field 'chosen': column has type string, a pairs file's is list<"
    else:
        rejected = table.column("rejected").to_pylist()
        table = table.set_column(table.column_names.index("rejected"), "rejected",
                                 pa.array([None, *rejected[1:]], table.schema.field("rejected").type))
        said = "field 'rejected': column holds nulls; no pair lacks it"
    path = tmp_path / "edited.parquet"
    pq.write_table(table.replace_schema_metadata(metadata), path)
    result = run_cli("annotate", path, "-o", tmp_path / "ann.parquet", "--teacher", "ratings", check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: file {path}") and said in result.stderr, result.stderr
    assert not (tmp_path / "ann.parquet").exists()


@pytest.mark.parametrize("header", [b'{"kind": "pairs"', b"[1]", b'{"kind": "pairs", "schema_version": 1}',
                                    b'{"kind": "pairs", "schema_version": 1, "provenance": [1]}'])
def test_a_parquet_file_whose_perpair_metadata_is_not_perpairs_header_is_one_error(tmp_path, header):
    """Metadata under perpair's key that is no JSON, or JSON of another shape (another program's, or ours edited)
    ended `perpair inspect` and the other stages in json's traceback, or an AttributeError or KeyError."""
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"perpair": header}), path)
    result = run_cli("inspect", path, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: file {path}: not a perpair artifact (its 'perpair' metadata is not the header perpair writes)"]


def test_a_parquet_file_whose_first_row_has_null_scores_is_read_with_optional_scores(tmp_path):
    # A score column is null in a Parquet row without scores: the first row's nulls made the layout UltraFeedback's,
    # which requires them, so a valid file (a pairs file written by prepare, too) stopped at "field is null".
    rows = [{"prompt": "Q1", "chosen": "A", "rejected": "B", "score_chosen": None, "score_rejected": None},
            {"prompt": "Q2", "chosen": "A", "rejected": "B", "score_chosen": 8.0, "score_rejected": 2.0}]
    source = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    run_cli("prepare", source, "-o", tmp_path / "out.parquet")
    assert [(p["score_chosen"], p["score_rejected"]) for p in pairs(tmp_path / "out.parquet")] == [
        (None, None), (8.0, 2.0)]


def test_inspect_bins_of_many_margins_say_which_holds_the_largest(tmp_path):
    """Margins of many distinct values are counted in 10 bins; numpy's last bin holds the largest margin, which its
    label "[26.1, 29)" said it did not. Every margin lies in the bin its label names."""
    rows = [{"prompt": f"Q{i}", "chosen": "A", "rejected": "B", "score_chosen": float(i), "score_rejected": 0.0}
            for i in range(30)]
    source = tmp_path / "scored.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_cli("prepare", source, "-o", tmp_path / "pairs.parquet")
    bins = json.loads(run_cli("inspect", tmp_path / "pairs.parquet", "--json").stdout)["margin_histogram"]

    def holds(label: str, margin: float) -> bool:
        low, high = (float(x) for x in label[1:-1].split(", "))
        return low <= margin and (margin <= high if label.endswith("]") else margin < high)

    assert len(bins) == 10 and bins[-1] == ["[26.1, 29]", 3]
    assert [count for _, count in bins] == [sum(holds(label, m) for m in range(30)) for label, _ in bins]
