"""`perpair prepare` reads what users bring exactly, or refuses it: the cases where it once wrote garbage pairs or
dropped a part of the data with exit 0 (a prompt column, a system column, tool calls, a null prompt), crashed
(a huge score), or left the files of a run before damaged."""

from __future__ import annotations

import importlib
import json

import pyarrow.parquet as pq
import pytest

import perpair.artifacts
from cli_inprocess import run_cli_inprocess
from perpair.artifacts import read_header
from perpair.data import read_pairs
from test_prepare_borders import nothing_written, one_error, write_jsonl

Q = "What is 2+2?"
ANSWERS = {"chosen": "The answer is 4", "rejected": "The answer is 5"}  # responses that share a start by chance


def prepare(tmp_path, rows, *options, name="in.jsonl"):
    source = write_jsonl(tmp_path / name, rows)
    out = tmp_path / "out.parquet"
    out.unlink(missing_ok=True)
    return source, run_cli_inprocess("prepare", source, *options, "-o", out)


def pairs(tmp_path):
    table, _ = read_pairs(str(tmp_path / "out.parquet"))
    return table.select(["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]).to_pylist()


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def excluded(tmp_path, kind):
    """Counts by reason of the excluded rows of one kind (invalid, degenerate, duplicates, notes)."""
    return {reason: entry["count"] for reason, entry in
            read_header(tmp_path / "out.parquet")["provenance"]["sources"][0][kind].items()}


@pytest.mark.parametrize("options", [["--chosen-col", "good", "--rejected-col", "bad"],
                                     ["--score-chosen-col", "s1", "--score-rejected-col", "s2"]])
def test_the_prompt_column_is_read_when_other_columns_are_named(tmp_path, options):
    row = {"prompt": Q, "good": ANSWERS["chosen"], "bad": ANSWERS["rejected"], **ANSWERS, "s1": 8, "s2": 3}
    _, result = prepare(tmp_path, [row], *options)
    assert result.returncode == 0, result.stderr
    [pair] = pairs(tmp_path)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (user(Q), assistant(ANSWERS["chosen"]),
                                                                  assistant(ANSWERS["rejected"]))


@pytest.mark.parametrize(("second", "field", "reason"), [
    ({"prompt": None, **ANSWERS}, "prompt", "field is null"),
    (ANSWERS, "prompt", "field is missing"),
])
def test_a_row_without_the_prompt_its_source_has_is_an_error(tmp_path, second, field, reason):
    source, result = prepare(tmp_path, [{"prompt": Q, **ANSWERS}, second])
    assert one_error(result).startswith(f"error: file {source}, row 2, field '{field}': {reason}")
    assert nothing_written(tmp_path)
    _, result = prepare(tmp_path, [{"prompt": Q, **ANSWERS}, second], "--skip-invalid")
    assert result.returncode == 0 and len(pairs(tmp_path)) == 1
    assert excluded(tmp_path, "invalid") == {"missing_field:prompt": 1}


def test_an_implicit_prompt_is_decided_once_per_source(tmp_path):
    rows = [{"chosen": "Say hi. Hi!", "rejected": "Say hi. Go away."}, {"prompt": Q, **ANSWERS}]
    source, result = prepare(tmp_path, rows)
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'prompt': the row has a prompt, but "
                                        "the source's first row has none")


@pytest.mark.parametrize("field", ["promt", "question", "messages"])
def test_an_implicit_prompt_beside_fields_that_are_not_read_is_refused(tmp_path, field):
    row = {field: Q, **ANSWERS}
    source, result = prepare(tmp_path, [row])
    assert one_error(result) == (
        f"error: file {source}, row 1: the row has no 'prompt' field, and fields that are not read ({field}): name "
        "the prompt's column with --prompt-col, or give --format trl to take each pair's prompt as the shared start "
        "of its two responses (TRL's implicit prompt)")
    assert nothing_written(tmp_path)
    # Said to be TRL's implicit layout, the shared start is the prompt; without other fields it is taken as is.
    for rows, options in (([row], ["--format", "trl"]), ([ANSWERS], [])):
        _, result = prepare(tmp_path, rows, *options)
        assert result.returncode == 0, result.stderr
        assert [(p["prompt"], p["chosen"]) for p in pairs(tmp_path)] == [(user("The answer is "), assistant("4"))]


@pytest.mark.parametrize(("row", "own", "rival", "other"), [
    ({"instruction": "Add.", "prompt": Q, **ANSWERS}, "instruction", "prompt", "trl"),
    ({"instruction": "Add.", "prompt": Q, **ANSWERS, "score_chosen": 8, "score_rejected": 3}, "instruction",
     "prompt", "ultrafeedback"),
    ({"conversations": [{"from": "human", "value": Q}], "instruction": "Add.", **ANSWERS}, "conversations",
     "instruction", "alpaca"),
])
def test_a_row_holding_two_layouts_prompts_is_refused(tmp_path, row, own, rival, other):
    """A TRL file with an 'instruction' column beside 'prompt' was read as alpaca: every pair's prompt the
    instruction, 'prompt' unread, exit 0. Which one holds the prompt is the user's to say; --format says it."""
    source, result = prepare(tmp_path, [row])
    layout = {"instruction": "alpaca", "conversations": "sharegpt"}[own]
    assert one_error(result) == (
        f"error: file {source}, row 1: the row has both '{own}' (the {layout} layout's prompt) and '{rival}': which "
        f"holds the prompt is not clear; name the layout with --format {layout} (prompt from '{own}') or --format "
        f"{other} (prompt from '{rival}')")
    assert nothing_written(tmp_path)
    if own == "instruction":  # either reading, as named
        for layout_, prompt in ((layout, "Add."), (other, Q)):
            _, result = prepare(tmp_path, [row], "--format", layout_)
            assert result.returncode == 0, result.stderr
            assert pairs(tmp_path)[0]["prompt"] == user(prompt)


def test_fields_that_no_reader_takes_are_named(tmp_path):
    """Ratings or a system prompt under other names than the layout's were dropped without a word (each pair's
    meta keeps the row, nothing reads it): the summary names each field that held something and was not read, with
    its rows, and so does the provenance; a field named by an option is read, an empty one is nothing lost."""
    row = {"prompt": Q, **ANSWERS, "chosen_rating": 8, "rejected_rating": 3, "system_prompt": "Be brief.",
           "notes": "", "tags": []}
    source, result = prepare(tmp_path, [row, {**row, "system_prompt": None}])
    assert result.returncode == 0, result.stderr
    assert ("  fields not read: chosen_rating × 2, rejected_rating × 2, system_prompt × 1 (in each pair's meta only; "
            "scores, a system message or a prompt under other names: --score-chosen-col/--score-rejected-col, "
            "--system-col, --prompt-col)") in result.stdout.splitlines(), result.stdout
    [report] = read_header(tmp_path / "out.parquet")["provenance"]["sources"]
    assert report["unread_fields"] == {"chosen_rating": 2, "rejected_rating": 2, "system_prompt": 1}
    _, result = prepare(tmp_path, [row], "--score-chosen-col", "chosen_rating", "--score-rejected-col",
                        "rejected_rating", "--system-col", "system_prompt")
    assert result.returncode == 0 and "not read" not in result.stdout, result.stdout
    assert read_header(tmp_path / "out.parquet")["provenance"]["sources"][0]["unread_fields"] == {}
    assert pairs(tmp_path)[0]["score_chosen"] == 8 and pairs(tmp_path)[0]["prompt"][0]["content"] == "Be brief."


def test_a_system_column_is_the_prompts_system_message(tmp_path):
    orca = {"system": "You are a pirate.", "question": Q, "chosen": "Arr, 4!", "rejected": "5"}
    _, result = prepare(tmp_path, [orca], "--prompt-col", "question")
    assert result.returncode == 0, result.stderr
    assert pairs(tmp_path)[0]["prompt"] == [{"role": "system", "content": "You are a pirate."}, *user(Q)]
    # Under another name, with --system-col, in the rows that have one (a row without a system message may lack the
    # column: it was refused as "not in the data" where the first row did); a named column no row has is an error.
    renamed = {"sys": "Be brief.", "prompt": Q, **ANSWERS}
    _, result = prepare(tmp_path, [{"prompt": "Q2", **ANSWERS}, renamed], "--system-col", "sys")
    assert result.returncode == 0, result.stderr
    assert [p["prompt"] for p in pairs(tmp_path)] == [user("Q2"),
                                                      [{"role": "system", "content": "Be brief."}, *user(Q)]]
    source, result = prepare(tmp_path, [renamed], "--system-col", "system_prompt")
    assert one_error(result) == f"error: file {source}, field 'system_prompt': --system-col names column " \
                                "'system_prompt', which no row has"
    assert nothing_written(tmp_path)
    # A conversational prompt with the same system message keeps one; with another one, the row is refused.
    conversation = [{"role": "system", "content": "Be brief."}, *user(Q)]
    _, result = prepare(tmp_path, [{"system": "Be brief.", "prompt": conversation, **ANSWERS}])
    assert result.returncode == 0 and pairs(tmp_path)[0]["prompt"] == conversation
    source, result = prepare(tmp_path, [{"system": "Be long.", "prompt": conversation, **ANSWERS}])
    assert one_error(result).startswith(f"error: file {source}, row 1, field 'system': the row has a system column "
                                        "and a different system turn")


def test_message_fields_besides_role_and_content_are_refused_not_dropped(tmp_path):
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "weather", "arguments": "{}"}}]}
    prompt = [*user("Weather in Paris?"), call, {"role": "tool", "content": "22C"}]
    rows = [{"prompt": prompt, "chosen": assistant("It is 22C."), "rejected": assistant("Sunny.")},
            {"prompt": user("Hi"), "chosen": [{**assistant("Hi!")[0], "reasoning_content": "greet"}],
             "rejected": assistant("Go.")},
            {"prompt": user("Hi"), "chosen": [{**assistant("Hello!")[0], "name": None}], "rejected": assistant("No.")}]
    source, result = prepare(tmp_path, rows)
    assert one_error(result).startswith(f"error: file {source}, row 1, field 'prompt[1].tool_calls': message field "
                                        "'tool_calls' is not read")
    _, result = prepare(tmp_path, rows, "--skip-invalid")
    assert result.returncode == 0 and [p["chosen"] for p in pairs(tmp_path)] == [assistant("Hello!")]
    assert excluded(tmp_path, "invalid") == {"unsupported_message_field": 2}


@pytest.mark.parametrize("row", [
    {"prompt": Q, **ANSWERS, "tools": [{"type": "function", "function": {"name": "weather"}}]},
    {"input": {"messages": user(Q), "tools": [{"type": "function"}]}, "preferred_output": assistant("4"),
     "non_preferred_output": assistant("5")},
])
def test_tools_are_the_pairs_tools(tmp_path, row):
    """They go to the chat template with the prompt, as TRL passes them (tests/test_tokenize_tools.py)."""
    _, result = prepare(tmp_path, [row])
    assert result.returncode == 0 and "note:" not in result.stdout
    written = pq.read_table(tmp_path / "out.parquet")
    assert json.loads(written.column("tools")[0].as_py()) == row.get("tools", row.get("input", {}).get("tools"))
    assert json.loads(written.column("meta")[0].as_py()) == row


@pytest.mark.parametrize(("rows", "options", "message"), [
    ([{"prompt": Q, **ANSWERS, "score_chosen": 10 ** 400, "score_rejected": 1}], [],
     "row 1, field 'score_chosen': expected a finite number, got an integer of 401 digits"),
    ([{"prompt": Q, **ANSWERS, "score_chosen": None, "score_rejected": 7}], [],
     "row 1, field 'score_chosen': field is null"),
    ([{"prompt": Q, **ANSWERS, "s1": 8, "s2": 3}, {"prompt": "Q2", **ANSWERS, "s1": None, "s2": 2}],
     ["--score-chosen-col", "s1", "--score-rejected-col", "s2"], "row 2, field 's1': field is null"),
    ([{"instruction": Q, "completions": [{"response": "4", "overall_score": 9, "annotations": {
        "honesty": {"Rating": 10 ** 400}}}, {"response": "5", "overall_score": 1}]}], [],
     "row 1, field 'completions[0].annotations.honesty.Rating': rating 10000000000000000000… (401 characters) is "
     "not a number"),
])
def test_a_score_that_is_no_number_is_an_error_naming_it(tmp_path, rows, options, message):
    source, result = prepare(tmp_path, rows, *options)
    assert one_error(result).startswith(f"error: file {source}, {message}")
    assert nothing_written(tmp_path)


def test_both_scores_null_is_a_pair_without_scores(tmp_path):
    # (detected, such rows are UltraFeedback's, whose every pair has scores: --format trl reads them as TRL's)
    _, result = prepare(tmp_path, [{"prompt": Q, **ANSWERS, "score_chosen": None, "score_rejected": None}],
                        "--format", "trl")
    assert result.returncode == 0
    assert [(p["score_chosen"], p["score_rejected"]) for p in pairs(tmp_path)] == [(None, None)]


def test_the_same_pair_with_other_scores_is_counted_apart(tmp_path):
    rows = [{"prompt": Q, **ANSWERS, "score_chosen": 9, "score_rejected": 1},
            {"prompt": Q, **ANSWERS, "score_chosen": 9, "score_rejected": 1},
            {"prompt": Q, **ANSWERS, "score_chosen": 2, "score_rejected": 1}]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0 and [p["score_chosen"] for p in pairs(tmp_path)] == [9.0]
    assert excluded(tmp_path, "duplicates") == {"duplicate": 1, "duplicate_other_scores": 1}


def test_text_that_is_not_unicode_is_a_malformed_row(tmp_path):
    lone = '{"prompt": "Hi \\ud83d", "chosen": "A", "rejected": "B"}'
    source, result = prepare(tmp_path, [{"prompt": "Hi", "chosen": "A", "rejected": "B"}, lone])
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'prompt': the text holds U+D83D, half "
                                        "of a surrogate pair without its other half")
    _, result = prepare(tmp_path, [{"prompt": "Hi", "chosen": "A", "rejected": "B"}, lone], "--skip-invalid")
    assert result.returncode == 0 and excluded(tmp_path, "invalid") == {"not_unicode": 1}


def test_a_prompt_of_a_system_message_alone_is_empty(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be nice"}], **ANSWERS},
            {"prompt": [{"role": "system", "content": "Be nice"}, *user("  ")], **ANSWERS},
            {"prompt": Q, **ANSWERS}]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0 and len(pairs(tmp_path)) == 1
    assert excluded(tmp_path, "degenerate") == {"empty_prompt": 2}


def test_outputs_that_would_destroy_or_join_an_input_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "lf" / "rows.json", [{"instruction": Q, "chosen": "4", "rejected": "5"}])
    info = tmp_path / "lf" / "dataset_info.json"
    info.write_text(json.dumps({"mine": {"file_name": data.name, "ranking": True}}))
    before = info.read_bytes()
    line = one_error(run_cli_inprocess("prepare", "--dataset-info", info, "--dataset", "mine", "-o", info))
    assert line == f"error: file {info}: the output is also an input; writing it would destroy the input, choose " \
                   "another -o"
    assert info.read_bytes() == before
    folder = tmp_path / "data"
    write_jsonl(folder / "part.jsonl", [{"prompt": Q, **ANSWERS}])
    for output in (folder / "pairs.parquet", folder / "sub" / "pairs.parquet"):
        line = one_error(run_cli_inprocess("prepare", folder, "-o", output))
        assert line == f"error: file {output}: the output is inside the input folder {folder}, whose next read " \
                       "would take it for data; choose another -o"
    assert sorted(p.name for p in folder.iterdir()) == ["part.jsonl"]


def test_options_for_datasets_and_csv_files_are_refused_for_files(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": Q, **ANSWERS}])
    for options, said in ((["--split", "test"], "--split 'test' applies"),
                          (["--split", "test", "--revision", "v1"], "--split 'test' and --revision 'v1' apply")):
        line = one_error(run_cli_inprocess("prepare", source, *options, "-o", tmp_path / "o.parquet"))
        assert line.startswith(f"error: file {source}: {said} to a Hub dataset or a dataset folder, not to a file: "
                               "drop")
    csv = tmp_path / "pairs.csv"
    csv.write_text(f'prompt,chosen,rejected\n"{Q}",4,5\n')
    line = one_error(run_cli_inprocess("prepare", csv, "-o", tmp_path / "o.parquet"))
    assert line.startswith(f"error: file {csv}: CSV files are not read")
    assert nothing_written(tmp_path)
    # Compressed otherwise than with gzip, or an Arrow file: named as such, not "row 1: line is not valid UTF-8".
    for name in ("pairs.jsonl.zst", "pairs.json.bz2", "pairs.jsonl.xz", "pairs.zip", "data-00000-of-00001.arrow"):
        (tmp_path / name).write_bytes(b"(\xb5/\xfd\x00\x01binary")
        line = one_error(run_cli_inprocess("prepare", tmp_path / name, "-o", tmp_path / "o.parquet"))
        assert line.startswith(f"error: file {tmp_path / name}: {name.rsplit('.', 1)[1]} files are not read")
    assert nothing_written(tmp_path)


def test_a_failed_write_leaves_the_files_of_the_run_before_as_they_were(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Q{i}", **ANSWERS} for i in range(20)])
    out, test = tmp_path / "out.parquet", tmp_path / "out.test.parquet"
    assert run_cli_inprocess("prepare", source, "--test-fraction", "0.5", "-o", out).returncode == 0
    before = out.read_bytes(), test.read_bytes()
    calls = []
    real = perpair.artifacts.write_artifact

    def second_fails(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module("perpair.data.prepare"), "write_artifact", second_fails)
    result = run_cli_inprocess("prepare", source, "--test-fraction", "0.5", "--seed", "1", "-o", out)
    assert result.returncode == 130 and len(calls) == 2
    assert (out.read_bytes(), test.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.parquet", "out.test.parquet"]


def test_sharegpt_turns_that_do_not_alternate_are_malformed(tmp_path):
    """As LLaMA-Factory's converter requires (it drops such rows): after a leading system turn, user (or
    observation) and assistant turns alternate; two user turns in a row, or a system turn mid-conversation, were
    kept as they were."""
    def row(*turns):
        return {"conversations": [{"from": who, "value": text} for who, text in turns],
                "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}}

    good = row(("system", "Be brief."), ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"))
    rows = [good, row(("human", "Q1"), ("human", "Q2")), row(("human", "Q1"), ("system", "Be evil."), ("human", "Q2"))]
    source, result = prepare(tmp_path, rows)
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'conversations': a user turn where the "
                                        "turns must alternate (expected assistant: turn 2 of the conversation")
    _, result = prepare(tmp_path, rows, "--skip-invalid")
    assert result.returncode == 0 and len(pairs(tmp_path)) == 1
    assert excluded(tmp_path, "invalid") == {"wrong_type:conversations": 2}


def test_sources_left_by_limit_are_said_to_be(tmp_path):
    """--limit reached in the first source: the second is not read, and the output says so (it said "(None): 0 rows
    read", as if the file were empty)."""
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Q{i}", **ANSWERS} for i in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", **ANSWERS}])
    result = run_cli_inprocess("prepare", first, second, "--limit", "2", "-o", tmp_path / "out.parquet")
    assert result.returncode == 0
    assert result.stdout.splitlines()[:2] == [f"{first} (trl): 2 rows read, 2 pairs kept (--limit reached)",
                                              f"{second}: not read (--limit reached before it)"]
    assert [s["limit_reached"] for s in read_header(tmp_path / "out.parquet")["provenance"]["sources"]] == [True, True]


def test_an_implicit_prompt_is_never_cut_inside_a_word(tmp_path):
    # One response a start of the other ("4" / "42"): the shared text ends inside a word, so the prompt ends before
    # it, as where the two differ inside a word (TRL keeps the whole pair too); identical texts are identical
    # responses, not an empty one.
    rows = [{"chosen": "The answer is 4", "rejected": "The answer is 42"},
            {"chosen": "The answer is 42", "rejected": "The answer is 4"},
            {"chosen": "The answer is 5", "rejected": "The answer is 5"}]
    _, result = prepare(tmp_path, rows, "--format", "trl")
    assert result.returncode == 0, result.stderr
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(tmp_path)] == [
        (user("The answer is "), assistant("4"), assistant("42")),
        (user("The answer is "), assistant("42"), assistant("4"))]
    assert excluded(tmp_path, "degenerate") == {"identical_responses": 1}


@pytest.mark.parametrize("name", ["in.jsonl", "in.json"])
def test_a_key_written_twice_in_a_row_is_malformed_not_one_value_chosen(tmp_path, name):
    # Python's json keeps the last value, Arrow (so Datasets, which TRL reads files with) refuses the file: which
    # of the two the data means is unknown.
    twice = '{"prompt": "Q", "chosen": "A", "rejected": "B", "rejected": "A"}'
    nested = '{"prompt": [{"role": "user", "role": "assistant", "content": "Q"}], "chosen": "A", "rejected": "B"}'
    good = json.dumps({"prompt": Q, **ANSWERS})
    rows = [good, twice, nested]
    if name == "in.json":
        (tmp_path / name).write_text("[" + ",\n".join(rows) + "]")
        rows = None
    source, result = prepare(tmp_path, rows, name=name) if rows else (
        tmp_path / name, run_cli_inprocess("prepare", tmp_path / name, "-o", tmp_path / "out.parquet"))
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'rejected': the row names the key "
                                        "'rejected' twice")
    assert nothing_written(tmp_path)
    result = run_cli_inprocess("prepare", source, "--skip-invalid", "-o", tmp_path / "out.parquet")
    assert result.returncode == 0, result.stderr
    assert [p["prompt"] for p in pairs(tmp_path)] == [user(Q)]
    assert read_header(tmp_path / "out.parquet")["provenance"]["sources"][0]["invalid"] == {
        "duplicate_key": {"count": 2, "rows": [2, 3]}}


def test_implicit_conversations_that_differ_before_the_final_turn_are_degenerate(tmp_path):
    # The turns after the first difference are no response to a shared prompt (a user turn among them): left out
    # and counted as HH-RLHF transcripts are, whether they differ at an assistant turn or at a user turn.
    start = [*user("Hi"), *assistant("Hello")]
    rows = [{"chosen": [*user("Hi"), *assistant("Hey"), *user(Q), *assistant("4")],
             "rejected": [*start, *user(Q), *assistant("5")]},
            {"chosen": [*start, *user(Q), *assistant("4")], "rejected": [*start, *user("2+3?"), *assistant("5")]},
            {"chosen": [*start, *user(Q), *assistant("4")], "rejected": [*start, *user(Q), *assistant("5")]}]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(tmp_path)] == [
        ([*start, *user(Q)], assistant("4"), assistant("5"))]
    assert excluded(tmp_path, "degenerate") == {"transcripts_diverge": 2}


def test_responses_that_repeat_the_prompt_are_split_where_the_conversations_differ(tmp_path):
    # HuggingFaceH4's layout (a prompt column; responses that are whole conversations starting with it) with more
    # than one turn: the turns both conversations share after the prompt are prompt too, not the start of each
    # response; conversations that differ before their final turn are left out, as with an implicit prompt.
    start = [*user("Hi"), *assistant("Hello")]
    rows = [{"prompt": "Hi", "chosen": [*start, *user(Q), *assistant("4")],
             "rejected": [*start, *user(Q), *assistant("5")]},
            {"prompt": "Hi", "chosen": [*start, *user(Q), *assistant("4")],
             "rejected": [*user("Hi"), *assistant("Go away"), *user(Q), *assistant("5")]},
            {"prompt": "Hi", "chosen": [*user("Hi"), *assistant("Hey")], "rejected": assistant("Go away")}]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(tmp_path)] == [
        ([*start, *user(Q)], assistant("4"), assistant("5")),
        (user("Hi"), assistant("Hey"), assistant("Go away"))]
    assert excluded(tmp_path, "degenerate") == {"transcripts_diverge": 1}


def test_scores_of_the_chosen_and_rejected_columns_are_not_given_to_other_columns(tmp_path):
    # score_chosen / score_rejected score the chosen and rejected columns: with the responses read from other columns
    # (here swapped), they were given to those, the higher score to the response it does not score.
    row = {"prompt": Q, **ANSWERS, "score_chosen": 9, "score_rejected": 2}
    source, result = prepare(tmp_path, [row], "--chosen-col", "rejected", "--rejected-col", "chosen")
    assert one_error(result).startswith(
        f"error: file {source}, row 1, field 'score_chosen': the row's score_chosen and score_rejected score its "
        "'chosen' and 'rejected' fields, and the responses are read from 'rejected' and 'chosen': name the scores "
        "with --score-chosen-col and --score-rejected-col")
    _, result = prepare(tmp_path, [row], "--chosen-col", "rejected", "--rejected-col", "chosen",
                        "--score-chosen-col", "score_rejected", "--score-rejected-col", "score_chosen")
    assert result.returncode == 0, result.stderr
    assert [(p["chosen"], p["score_chosen"], p["score_rejected"]) for p in pairs(tmp_path)] == [
        (assistant(ANSWERS["rejected"]), 2.0, 9.0)]


@pytest.mark.parametrize(("row", "options", "field"), [
    ({"images": ["cat.png"], "prompt": "<image>What is in the picture?", **ANSWERS}, [], "images"),
    ({"conversations": [{"from": "human", "value": "<image>What is in the picture?"}],
      "chosen": {"from": "gpt", "value": "A cat."}, "rejected": {"from": "gpt", "value": "A dog."},
      "images": ["mllm_demo_data/1.jpg"]}, [], "images"),
    ({"instruction": "<image>What is in the picture?", "input": "", "chosen": "A cat.", "rejected": "A dog.",
      "videos": ["clip.mp4"]}, [], "videos"),
    ({"image": {"bytes": None, "path": "cat.png"}, "question": "What is in the picture?", **ANSWERS},
     ["--prompt-col", "question"], "image"),
])
def test_rows_with_images_are_refused_not_read_as_text_only(tmp_path, row, options, field):
    # Vision data (TRL's images column, LLaMA-Factory's images/videos/audios, RLAIF-V's image) was read as text-only
    # pairs, exit 0: prompts about a picture the model would never see.
    empty = {**row, field: [] if isinstance(row[field], list) else None}
    source, result = prepare(tmp_path, [empty, row], *options)
    assert one_error(result).startswith(f"error: file {source}, row 2, field '{field}': the row has {field}: perpair "
                                        "reads text only")
    assert nothing_written(tmp_path)
    _, result = prepare(tmp_path, [empty, row], *options, "--skip-invalid")
    assert result.returncode == 0, result.stderr
    assert len(pairs(tmp_path)) == 1 and excluded(tmp_path, "invalid") == {"non_text_content": 1}


def test_openai_style_turns_of_sharegpt_data_keep_their_other_fields_or_are_refused(tmp_path):
    # sharegpt turns written {"role", "content"} are read too; their tool calls were dropped without a word, the call
    # turn kept as an empty assistant message, exit 0 (a message list of any other layout is refused so).
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "weather", "arguments": "{}"}}]}
    good = {"conversations": user("Hi"), "chosen": assistant("Hello!")[0], "rejected": assistant("Go.")[0]}
    rows = [good, {"conversations": [*user("Weather in Paris?"), call, {"role": "tool", "content": "22C"}],
                   "chosen": assistant("It is 22C.")[0], "rejected": assistant("Sunny.")[0]}]
    source, result = prepare(tmp_path, rows)
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'conversations[1].tool_calls': message "
                                        "field 'tool_calls' is not read")
    _, result = prepare(tmp_path, rows, "--skip-invalid")
    assert result.returncode == 0 and [p["prompt"] for p in pairs(tmp_path)] == [user("Hi")]
    assert excluded(tmp_path, "invalid") == {"unsupported_message_field": 1}


HH_CUT = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go away"}
HH_WHOLE = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}


@pytest.mark.parametrize(("first", "hh"), [
    ({"prompt": Q, **ANSWERS}, HH_CUT),
    ({"chosen": "Q A", "rejected": "Q B"}, HH_WHOLE),
    ({"chosen": [*user(Q), *assistant("4")], "rejected": [*user(Q), *assistant("5")]}, HH_WHOLE),
])
def test_a_row_in_another_layout_than_its_sources_first_row_is_malformed(tmp_path, first, hh):
    # A file that mixes layouts row by row (two data sets joined) is read as its first row says: an HH-RLHF row in a
    # TRL file was read as TRL's, the whole transcript one user message (or, with an implicit prompt, the transcript's
    # start), exit 0.
    source, result = prepare(tmp_path, [first, hh])
    assert one_error(result).startswith(f"error: file {source}, row 2: the row is in the hh-rlhf layout, and the "
                                        "source in the trl layout (from its first row)")
    _, result = prepare(tmp_path, [first, hh], "--skip-invalid")
    assert result.returncode == 0 and len(pairs(tmp_path)) == 1
    assert excluded(tmp_path, "invalid") == {"other_layout": 1}
    # A source in the HH-RLHF layout reads both kinds of its rows; scores in some rows of a TRL source are read.
    _, result = prepare(tmp_path, [hh, {**hh, "chosen": hh["chosen"] + "!"}])
    assert result.returncode == 0 and len(pairs(tmp_path)) == 2
    _, result = prepare(tmp_path, [{"prompt": Q, **ANSWERS}, {"prompt": "Q2", **ANSWERS, "score_chosen": 2,
                                                              "score_rejected": 1}])
    assert result.returncode == 0 and [p["score_chosen"] for p in pairs(tmp_path)] == [None, 2.0]


def test_a_message_without_a_role_says_so_not_that_a_field_would_be_dropped(tmp_path):
    # sharegpt's {"from", "value"} turns in a TRL layout were refused as "message field 'from' is not read: …
    # dropping it would change the conversation", as if the message were read without it.
    turn = {"from": "human", "value": Q}
    source, result = prepare(tmp_path, [{"prompt": [turn], **ANSWERS}])
    assert one_error(result).startswith(f"error: file {source}, row 1, field 'prompt[0].role': message has no 'role' "
                                        "field (its fields: from, value)")


def test_a_file_of_one_json_object_is_said_to_be_one(tmp_path):
    # {"train": [rows]} written over many lines was refused as "row 1: line is not valid JSON, truncated or corrupt".
    source = tmp_path / "in.json"
    source.write_text(json.dumps({"train": [{"prompt": Q, **ANSWERS}]}, indent=2))
    result = run_cli_inprocess("prepare", source, "--skip-invalid", "-o", tmp_path / "out.parquet")
    assert one_error(result) == f"error: file {source}: the file holds one JSON object (keys: train), not rows: " \
                                "perpair reads JSON Lines (one row per line) or a JSON array of rows"
    assert nothing_written(tmp_path)


def test_an_openai_input_field_outside_its_layout_is_refused_not_ignored(tmp_path):
    # A misspelt input.tool (for tools) was passed over, exit 0: the pair trained without the tools its prompt has.
    row = {"input": {"messages": user(Q), "tools": [{"type": "function", "function": {"name": "add"}}],
                     "parallel_tool_calls": False}, "preferred_output": assistant("4"),
           "non_preferred_output": assistant("5")}
    misspelt = {**row, "input": {"messages": user("2+3?"), "tool": row["input"]["tools"]}}
    source, result = prepare(tmp_path, [row, misspelt])
    assert one_error(result).startswith(f"error: file {source}, row 2, field 'input.tool': input.tool is not part of "
                                        "OpenAI's preference layout (input holds messages, tools, parallel_tool_calls)")
    _, result = prepare(tmp_path, [row, misspelt], "--skip-invalid")
    assert result.returncode == 0 and [p["prompt"] for p in pairs(tmp_path)] == [user(Q)]
    assert excluded(tmp_path, "invalid") == {"unsupported_field": 1}


def test_an_openai_empty_tools_list_is_no_tools(tmp_path):
    # OpenAI's own preference examples write "tools": [] for a conversation without tools. Kept as a list, it went to
    # the chat template, and a template that renders any list (Llama 3.1's `tools is not none`) put a tool-calling
    # preamble without a function into the prompt of every such pair.
    from transformers import AutoTokenizer

    from perpair.models import resolve_model
    from perpair.train.tokenize import tokenize_pair

    tool = {"type": "function", "function": {"name": "add"}}
    rows = [{"input": {"messages": user(f"{n}+2?"), "tools": tools, "parallel_tool_calls": True},
             "preferred_output": assistant("4"), "non_preferred_output": assistant("5")}
            for n, tools in enumerate(([], [tool], None))]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    read = read_pairs(str(tmp_path / "out.parquet"))[0].to_pylist()
    assert [p["tools"] for p in read] == [None, json.dumps([tool]), None]
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    tok.chat_template = ("{% if tools is not none %}Tools: {{ tools | tojson }}\n{% endif %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    plain = tokenize_pair(tok, read[0]["prompt"], read[0]["chosen"], read[0]["rejected"], None, read[0]["tools"])
    assert tok.decode(plain.prompt) == "user: 0+2?\nassistant:"
    assert tokenize_pair(tok, read[0]["prompt"], read[0]["chosen"], read[0]["rejected"], None, "[]").prompt \
        != plain.prompt  # what the empty list rendered
    # the TRL layout's tools column is handed to the template as it is, as TRL's DPOTrainer hands it
    trl_row = {"prompt": user(Q), "chosen": assistant("4"), "rejected": assistant("5"), "tools": []}
    _, result = prepare(tmp_path, [trl_row])
    assert result.returncode == 0
    assert read_pairs(str(tmp_path / "out.parquet"))[0].column("tools").to_pylist() == ["[]"]


def test_hh_rlhf_transcripts_stripped_of_their_leading_newlines_are_read_as_transcripts(tmp_path):
    # Copies that strip the transcripts ("Human: …" for "\n\nHuman: …") were read as TRL's layout: the transcript's
    # start (or the cut prompt) one user message "Human: Hi\n\nAssistant:", exit 0.
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: 2+2?\n\nAssistant: 4",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: 2+2?\n\nAssistant: 5"},
            {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go away"}]
    expected = [([*user("Hi"), *assistant("Hey"), *user("2+2?")], assistant("4"), assistant("5")),
                (user("Hi"), assistant("Hello"), assistant("Go away"))]
    for row, want in zip(rows, expected, strict=True):
        stripped = {key: value.lstrip() for key, value in row.items()}
        for variant in (row, stripped):
            _, result = prepare(tmp_path, [variant])
            assert result.returncode == 0, result.stderr
            assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(tmp_path)] == [want], variant


def test_hh_rlhf_transcripts_with_reward_columns_are_read_as_transcripts(tmp_path):
    """HH-RLHF data with reward columns (`--score-chosen-col reward_chosen`) was read as the `columns` layout: the
    transcripts' shared start, cut at the first differing character, one user message holding the turns and their
    markers, exit 0; and --format hh-rlhf refused the score options. Score columns alone keep the transcripts
    detected as HH-RLHF; any other column layout refuses a field holding a transcript."""
    rows = [{**HH_WHOLE, "reward_chosen": 2.5, "reward_rejected": -1.0},
            {"prompt": "\n\nHuman: Hey\n\nAssistant:", "chosen": " Yo", "rejected": " No", "reward_chosen": 1.0,
             "reward_rejected": 0.5}]
    scores = ("--score-chosen-col", "reward_chosen", "--score-rejected-col", "reward_rejected")
    for options in (scores, ("--format", "hh-rlhf", *scores)):
        _, result = prepare(tmp_path, rows, *options)
        assert result.returncode == 0, result.stderr
        assert pairs(tmp_path) == [
            {"prompt": user("Hi"), "chosen": assistant("Hello"), "rejected": assistant("Go away"),
             "score_chosen": 2.5, "score_rejected": -1.0},
            {"prompt": user("Hey"), "chosen": assistant("Yo"), "rejected": assistant("No"),
             "score_chosen": 1.0, "score_rejected": 0.5}], options
    for options in (("--format", "trl"), ("--prompt-col", "prompt", *scores), ("--system-col", "sys")):
        source, result = prepare(tmp_path, rows[1:], *options)
        assert one_error(result).startswith(f"error: file {source}, row 1, field 'prompt': an HH-RLHF transcript "), \
            options
        assert "read the file with --format hh-rlhf" in one_error(result)
    _, result = prepare(tmp_path, rows, "--format", "hh-rlhf", "--system-col", "sys")
    assert "--format hh-rlhf does not read --*-col options" in one_error(result)


def test_openai_style_turns_named_by_a_dataset_infos_tags_keep_their_fields_or_are_refused(tmp_path):
    """A dataset_info entry whose tags name the turns' role and content `role` and `content` (LLaMA-Factory's OpenAI
    style): a turn's tool_calls were dropped without a word, the call an empty assistant message, exit 0 (the
    same turns found without such tags were refused)."""
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "weather", "arguments": "{}"}}]}
    rows = [{"messages": [*user("Weather in Paris?"), call, {"role": "tool", "content": "22C"}],
             "chosen": assistant("It is 22C.")[0], "rejected": assistant("Sunny.")[0]}]
    write_jsonl(tmp_path / "tools.jsonl", rows)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "tool", "system_tag": "system"}
    info = {"calls": {"file_name": "tools.jsonl", "formatting": "sharegpt", "ranking": True, "tags": tags,
                      "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    result = run_cli_inprocess("prepare", "--dataset-info", tmp_path, "--dataset", "calls",
                               "-o", tmp_path / "out.parquet")
    assert "field 'messages[1].tool_calls': message field 'tool_calls' is not read" in one_error(result)


def test_a_dataset_info_entrys_split_and_another_split_given_are_refused(tmp_path):
    """An entry that names its split read that split whatever --split said: `--split test` on an entry of split
    'train' evaluated on training rows, its provenance saying 'test'."""
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "train.jsonl", [{"instruction": Q, **ANSWERS}])
    info = {"folder": {"file_name": "parts", "ranking": True, "split": "train"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    result = run_cli_inprocess("prepare", "--dataset-info", tmp_path, "--dataset", "folder", "--split", "test",
                               "-o", tmp_path / "out.parquet")
    assert one_error(result) == (
        f"error: file {tmp_path / 'dataset_info.json'}, field 'split': dataset 'folder' names split 'train' itself, "
        "and --split says 'test': LLaMA-Factory reads the entry's; drop --split, or change the entry's split")
    result = run_cli_inprocess("prepare", "--dataset-info", tmp_path, "--dataset", "folder", "--split", "train",
                               "-o", tmp_path / "out.parquet")
    assert result.returncode == 0, result.stderr


def test_the_keys_of_a_field_read_in_part_are_named_when_not_read(tmp_path):
    """`metadata.score_chosen` looked up marked the whole `metadata` field read: a system prompt or ratings beside
    the scores there (or a `metadata` without scores) went unnamed in "fields not read"."""
    rows = [{"prompt": Q, **ANSWERS, "metadata": {"score_chosen": 8, "score_rejected": 3,
                                                  "system_prompt": "Be terse."}},
            {"prompt": "Q2", **ANSWERS, "metadata": {"score_chosen": 7, "score_rejected": 2,
                                                     "system_prompt": ""}}]
    _, result = prepare(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    assert read_header(tmp_path / "out.parquet")["provenance"]["sources"][0]["unread_fields"] == {
        "metadata.system_prompt": 1}
    assert "fields not read: metadata.system_prompt × 1" in result.stdout
    _, result = prepare(tmp_path, [{"prompt": Q, **ANSWERS, "metadata": {"note": "x"}}], "--format", "trl")
    assert read_header(tmp_path / "out.parquet")["provenance"]["sources"][0]["unread_fields"] == {"metadata": 1}


def test_one_column_named_for_both_responses_or_both_scores_is_refused(tmp_path):
    rows = [{"prompt": Q, **ANSWERS, "s": 1.0}]
    _, result = prepare(tmp_path, rows, "--score-chosen-col", "s", "--score-rejected-col", "s")
    assert "--score-chosen-col and --score-rejected-col both name 's': every pair's margin would be 0" \
        in one_error(result)
    _, result = prepare(tmp_path, rows, "--chosen-col", "chosen", "--rejected-col", "chosen")
    assert "--chosen-col and --rejected-col both name 'chosen'" in one_error(result)


def test_a_pairs_file_given_again_keeps_every_column(tmp_path):
    """A pairs file given to prepare again (to merge it with another, cut or split it) was read as TRL data: its
    per-aspect ratings were dropped (a ratings teacher then calls every pair unknown), and its pairs' source, row and
    meta became the pairs file's own, exit 0. Its pairs are read as they are; options that would re-read its
    columns are refused beside it."""
    from conftest import FIXTURES

    first = tmp_path / "first.parquet"
    assert run_cli_inprocess("prepare", FIXTURES / "ultrafeedback_raw.jsonl", "-o", first).returncode == 0
    again = tmp_path / "again.parquet"
    result = run_cli_inprocess("prepare", first, "-o", again)
    assert result.returncode == 0, result.stderr
    before, after = read_pairs(str(first))[0].to_pylist(), read_pairs(str(again))[0].to_pylist()
    assert len(after) >= 2 and after == before
    assert all(row["ratings_chosen"] for row in after) and after[0]["source"].endswith("ultrafeedback_raw.jsonl")
    assert "fields not read" not in result.stdout
    result = run_cli_inprocess("prepare", first, "--format", "trl", "-o", tmp_path / "x.parquet")
    assert one_error(result) == (f"error: file {first}: a perpair pairs file is read as the pairs it holds, every "
                                 "column kept: drop --format, the --*-col options and --role-map (or give the data "
                                 "it was prepared from)")


@pytest.mark.parametrize(("field", "row"), [
    ("prompt[0].content", {"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                           "chosen": "4", "rejected": "5"}),
    ("chosen[0].content", {"prompt": Q, "chosen": "4<|eot_id|>", "rejected": "5<|eot_id|>"}),
    ("prompt[0].content", {"prompt": [{"role": "user", "content": "[INST] What is 2+2? [/INST]"}], **ANSWERS}),
])
def test_text_already_rendered_with_a_chat_template_is_refused(tmp_path, field, row):
    """Strings templated before they came (a ChatML prompt, responses ending in Llama 3's <|eot_id|>) were read as
    plain text and rendered with the model's chat template again, the markers read as its special tokens, exit 0."""
    source, result = prepare(tmp_path, [row, {"prompt": "Q2", **ANSWERS}])
    assert one_error(result).startswith(f"error: file {source}, row 1, field '{field}': the text holds a chat "
                                        "template's turn marker")
    _, result = prepare(tmp_path, [row, {"prompt": "Q2", **ANSWERS}], "--skip-invalid")
    assert result.returncode == 0 and excluded(tmp_path, "invalid") == {"chat_template_markup": 1}


def test_templated_text_is_kept_on_request_for_trl_and_refused_by_perpair_train(tmp_path, tiny_model_dir):
    """Data pre-templated for TRL's standard string format (which TRL tokenizes as it is) was refused by prepare, so a
    TRL user could not make a plan of it; `--keep-template-markup` keeps and counts it, and `perpair train`, which
    would template it again, refuses it naming the pair and field. So does it a response holding one of the
    tokenizer's own special tokens, which tokenization would read as that token."""
    templated = {"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                 "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}
    source, result = prepare(tmp_path, [templated, {"prompt": "Q2", **ANSWERS}], "--keep-template-markup")
    assert result.returncode == 0, result.stderr
    assert excluded(tmp_path, "notes") == {"chat_template_markup": 1}
    assert "chat_template_markup × 1 (rows 1)" in result.stdout and "perpair train refuses these pairs" in result.stdout
    table = read_pairs(str(tmp_path / "out.parquet"))[0]
    first = table.to_pylist()[0]
    assert (first["prompt"][0]["content"], first["chosen"][0]["content"]) == (templated["prompt"], "4<|im_end|>")
    train = run_cli_inprocess("train", "--model", tiny_model_dir, "--data", tmp_path / "out.parquet",
                              "--out", tmp_path / "run", "--steps", "1", "--batch-size", "1")
    assert one_error(train) == (f"error: {tmp_path / 'out.parquet'}: pair {first['pair_id']}: field "
                                "'prompt[0].content': the text holds '<|im_start|>', a chat template's turn marker: "
                                "the text was rendered with a template already, and perpair renders the pair's "
                                "messages with the model's chat template; 1 pair(s) of the run hold such text; give "
                                "the turns as messages without the markers, or leave the pairs out")
    # every such pair named at once (the first stopped the run: one run per pair to find them all)
    source, result = prepare(tmp_path, [{"prompt": "Q2", **ANSWERS},
                                        {"prompt": Q, "chosen": "Put <file_sep> between files", "rejected": "No"},
                                        {"prompt": "Q3", "chosen": "a", "rejected": "see <filename> b"}])
    assert result.returncode == 0, result.stderr
    ids = read_pairs(str(tmp_path / "out.parquet"))[0].column("pair_id").to_pylist()
    train = run_cli_inprocess("train", "--model", tiny_model_dir, "--data", tmp_path / "out.parquet",
                              "--out", tmp_path / "run", "--steps", "1", "--batch-size", "2")
    assert one_error(train) == (f"error: {tmp_path / 'out.parquet'}: pair {ids[1]}: field 'chosen[0].content': the "
                                "text holds '<file_sep>', one of the tokenizer's special tokens, which tokenization "
                                "would read as that token, not as text; 2 pair(s) of the run hold such text (the "
                                f"others: {ids[2]}); give the turns as messages without the markers, or leave the "
                                "pairs out")


def test_a_revision_given_for_a_local_dataset_folder_is_refused(tmp_path):
    """`--revision` names a commit of a Hub dataset; given with a local folder it was dropped without a word (the
    folder read as it is)."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": Q, **ANSWERS}])
    result = run_cli_inprocess("prepare", tmp_path / "data", "--revision", "v1", "-o", tmp_path / "out.parquet")
    assert one_error(result) == (f"error: file {tmp_path / 'data'}: --revision 'v1' applies to a Hub dataset, and "
                                 f"{tmp_path / 'data'} is a local folder, read as it is: drop it (data.revision in a "
                                 "run config)")
    assert run_cli_inprocess("prepare", tmp_path / "data", "-o", tmp_path / "out.parquet").returncode == 0
