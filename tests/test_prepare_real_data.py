"""Acceptance of `perpair prepare` / `perpair inspect` on the real samples in ../shared/data."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HH_TEST, ORCA, UF_TRAIN, run_cli
from perpair.data import read_pairs


def provenance_of(path):
    return read_pairs(str(path))[1]


def test_ultrafeedback_sample(uf_pairs):
    table, provenance = read_pairs(str(uf_pairs))
    assert table.num_rows == 994
    assert len(set(table["pair_id"].to_pylist())) == 994
    rows = table.to_pylist()
    assert all(r["score_chosen"] is not None and r["score_rejected"] is not None for r in rows)
    # Scores are those of the source row each pair came from.
    source = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")]
    for r in rows:
        original = source[r["source_row"] - 1]
        assert r["score_chosen"] == original["metadata"]["score_chosen"]
        assert r["chosen"] == [{"role": "assistant", "content": original["chosen"]}]
        assert json.loads(r["meta"]) == original
    degenerate = provenance["sources"][0]["degenerate"]
    assert {k: v["rows"] for k, v in degenerate.items()} == {
        "empty_chosen": [834], "empty_rejected": [479], "identical_responses": [307, 656, 911, 998]}


def test_prepare_reports_excluded_rows_on_the_terminal(tmp_path):
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "uf.parquet")
    assert "identical_responses × 4 (rows 307, 656, 911, 998)" in result.stdout
    assert "empty_rejected × 1 (rows 479)" in result.stdout
    assert "empty_chosen × 1 (rows 834)" in result.stdout
    assert "wrote 994 train pairs" in result.stdout


def test_inspect_shows_the_110_ties(uf_pairs):
    result = run_cli("inspect", uf_pairs)
    assert "994 pairs" in result.stdout
    assert "ties (margin 0): 110" in result.stdout
    summary = json.loads(run_cli("inspect", uf_pairs, "--json").stdout)
    assert summary["ties"] == 110 and summary["scored_pairs"] == 994
    assert dict(summary["margin_histogram"])["0"] == 110
    assert summary["excluded"][str(UF_TRAIN)]["degenerate"] == {
        "empty_chosen": 1, "empty_rejected": 1, "identical_responses": 4}


def test_hh_rlhf_multi_turn_and_reported_rows(tmp_path):
    out = tmp_path / "hh.parquet"
    result = run_cli("prepare", HH_TEST, "-o", out)
    table, provenance = read_pairs(str(out))
    assert table.num_rows == 2303
    degenerate = provenance["sources"][0]["degenerate"]
    assert degenerate["empty_chosen"]["rows"] == [87, 517, 926, 1104]
    assert degenerate["transcripts_diverge"]["rows"] == [1255, 1689, 1951, 1953, 2037]
    assert "transcripts_diverge × 5" in result.stdout
    rows = table.to_pylist()
    multi = [r for r in rows if sum(m["role"] == "user" for m in r["prompt"]) > 1]
    assert len(multi) > 1000
    for r in rows:
        roles = [m["role"] for m in r["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert set(roles) <= {"user", "assistant"}  # (4 real transcripts have two Assistant turns in a row)
        assert [m["role"] for m in r["chosen"]] == ["assistant"] == [m["role"] for m in r["rejected"]]
    # The transcript is rebuilt exactly from prompt + final turn (up to the space after each colon).
    first = json.loads(gzip.open(HH_TEST, "rt").readline())
    r = rows[0]
    names = {"user": "Human", "assistant": "Assistant"}
    rebuilt = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in r["prompt"] + r["chosen"])
    assert rebuilt == first["chosen"]


def test_orca_keeps_system_messages(tmp_path):
    out = tmp_path / "orca.parquet"
    run_cli("prepare", ORCA, "-o", out)
    table = read_pairs(str(out))[0]
    assert table.num_rows == 284
    source = [json.loads(line) for line in gzip.open(ORCA, "rt")]
    for r in table.to_pylist():
        original = source[r["source_row"] - 1]
        assert r["prompt"][0]["role"] == "system"
        assert r["prompt"] == original["input"]["messages"]
        assert r["chosen"] == original["preferred_output"]


def test_strict_stops_at_the_first_degenerate_row(tmp_path):
    result = run_cli("prepare", UF_TRAIN, "-o", tmp_path / "uf.parquet", "--strict", check=False)
    assert result.returncode == 2
    assert "row 307" in result.stderr and "identical_responses" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "uf.parquet").exists()


def test_same_command_twice_is_byte_identical(tmp_path):
    for name in ("a", "b"):
        run_cli("prepare", UF_TRAIN, HH_TEST, "-o", tmp_path / f"{name}.parquet", "--test-fraction", "0.1")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.test.parquet").read_bytes() == (tmp_path / "b.test.parquet").read_bytes()


def test_same_pair_from_different_formats_has_the_same_id(tmp_path, uf_pairs):
    """The trl-lib layout (strings), the HuggingFaceH4 layout (message lists repeating the prompt), the
    OpenAI layout and a Parquet copy give the same ids for the same pairs."""
    source = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][:50]
    h4 = [{"prompt": r["prompt"], "prompt_id": str(i),
           "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
           "rejected": [{"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["rejected"]}],
           "score_chosen": r["metadata"]["score_chosen"], "score_rejected": r["metadata"]["score_rejected"]}
          for i, r in enumerate(source)]
    openai = [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
               "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
               "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]} for r in source]
    (tmp_path / "h4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in h4))
    (tmp_path / "openai.json").write_text(json.dumps(openai))
    pq.write_table(pa.Table.from_pylist(source), tmp_path / "trl.parquet")
    expected = [r["pair_id"] for r in read_pairs(str(uf_pairs))[0].to_pylist() if r["source_row"] <= 50]
    for name in ("h4.jsonl", "openai.json", "trl.parquet"):
        out = tmp_path / f"{name}.pairs.parquet"
        run_cli("prepare", tmp_path / name, "-o", out)
        assert read_pairs(str(out))[0]["pair_id"].to_pylist() == expected, name


@pytest.fixture
def broken_copy(tmp_path):
    """The UltraFeedback sample with the five faults of the acceptance test."""
    lines = gzip.open(UF_TRAIN, "rt").read().splitlines()
    lines[10] = lines[10][: len(lines[10]) // 2]                      # row 11: truncated line
    row = json.loads(lines[20])
    del row["chosen"]
    lines[20] = json.dumps(row)                                       # row 21: missing chosen
    row = json.loads(lines[30])
    row["rejected"] = ""
    lines[30] = json.dumps(row)                                       # row 31: empty rejected
    row = json.loads(lines[40])
    row["prompt"] = 42
    lines[40] = json.dumps(row)                                       # row 41: a number as the prompt
    row = json.loads(lines[50])
    row["rejected"] = row["chosen"]
    lines[50] = json.dumps(row)                                       # row 51: chosen == rejected
    path = tmp_path / "broken.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def test_malformed_rows_stop_the_run_with_file_row_and_problem(broken_copy, tmp_path):
    result = run_cli("prepare", broken_copy, "-o", tmp_path / "out.parquet", check=False)
    assert result.returncode != 0
    assert str(broken_copy) in result.stderr and "row 11" in result.stderr
    assert "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_skip_invalid_writes_989_pairs_and_counts_each_reason(broken_copy, tmp_path):
    out = tmp_path / "out.parquet"
    result = run_cli("prepare", broken_copy, "-o", out, "--skip-invalid")
    table, provenance = read_pairs(str(out))
    assert table.num_rows == 989
    report = provenance["sources"][0]
    assert {k: v["rows"] for k, v in report["invalid"].items()} == {
        "undecodable_json": [11], "missing_field:chosen": [21], "wrong_type:prompt": [41]}
    assert report["degenerate"]["empty_rejected"]["rows"] == [31, 479]
    assert report["degenerate"]["identical_responses"]["rows"] == [51, 307, 656, 911, 998]
    assert "undecodable_json × 1 (rows 11)" in result.stdout
    assert "wrong_type:prompt × 1 (rows 41)" in result.stdout


def test_hh_rlhf_split_into_prompt_and_responses_gives_the_same_pairs(tmp_path):
    # HH-RLHF as many copies hold it (Dahoas/rm-static, full-hh-rlhf): the transcript up to the final
    # "\n\nAssistant:" as `prompt`, the final turns' text as `chosen` and `rejected`. Its turns were merged into one
    # user message holding the whole transcript; they are parsed as the transcripts are, giving the same pairs.
    marker = "\n\nAssistant:"
    rows = [json.loads(line) for line in gzip.open(HH_TEST, "rt")]
    split = []
    for row in rows:
        end = row["chosen"].rfind(marker) + len(marker)
        if row["rejected"][:end] == row["chosen"][:end] and row["rejected"].rfind(marker) + len(marker) == end:
            split.append({"prompt": row["chosen"][:end], "response": row["chosen"][end:],
                          "chosen": row["chosen"][end:], "rejected": row["rejected"][end:]})
    assert len(split) > 2200
    source = tmp_path / "hh_split.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in split))
    transcripts = tmp_path / "hh.jsonl"
    transcripts.write_text("".join(json.dumps({"chosen": r["prompt"] + r["chosen"],
                                               "rejected": r["prompt"] + r["rejected"]}) + "\n" for r in split))
    run_cli("prepare", source, "-o", tmp_path / "split.parquet")
    run_cli("prepare", transcripts, "-o", tmp_path / "hh.parquet")
    ours, provenance = read_pairs(str(tmp_path / "split.parquet"))
    assert provenance["sources"][0]["format"] == "hh-rlhf"
    theirs = read_pairs(str(tmp_path / "hh.parquet"))[0]
    assert ours.column("pair_id").to_pylist() == theirs.column("pair_id").to_pylist()
