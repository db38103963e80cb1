"""LLaMA-Factory preference data (sharegpt and alpaca layouts, and its dataset_info.json), role mapping,
content parts and unpaired (KTO) data: every message, role and order kept, compared field by field with
records written out by hand here."""

from __future__ import annotations

import json

import pytest

from cli_inprocess import run_cli_inprocess
from conftest import FIXTURES, run_cli
from perpair.data import read_pairs

LF = FIXTURES / "llamafactory"
INFO = LF / "dataset_info.json"


def msg(role, content):
    return {"role": role, "content": content}


# The sharegpt fixture's pairs as LLaMA-Factory means them (row 3 repeats row 1 and is collapsed).
SHAREGPT = [
    {"source_row": 1,
     "prompt": [msg("system", "你是一个乐于助人的助手。"), msg("user", "北京是哪个国家的首都？"),
                msg("assistant", "北京是中国的首都。"), msg("user", "它有多少人口？")],
     "chosen": [msg("assistant", "北京常住人口约两千一百万。")], "rejected": [msg("assistant", "北京有五百人。")]},
    {"source_row": 2,
     "prompt": [msg("system", "You can call tools."), msg("user", "What is the weather in Paris?"),
                msg("assistant", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
                msg("tool", '{"temperature": 18, "sky": "clear"}')],
     "chosen": [msg("assistant", "It is 18 °C and clear in Paris.")],
     "rejected": [msg("assistant", "I cannot know the weather.")]},
    {"source_row": 4, "prompt": [msg("user", "Name a prime number.")], "chosen": [msg("assistant", "7")],
     "rejected": [msg("assistant", "8")]},
]
ALPACA = [
    {"source_row": 1,
     "prompt": [msg("system", "你是翻译。"), msg("user", "你好"), msg("assistant", "你好！有什么可以帮你？"),
                msg("user", "你会翻译吗？"), msg("assistant", "会的。"),
                msg("user", "把这句话翻译成英文：\n我喜欢猫。")],
     "chosen": [msg("assistant", "I like cats.")], "rejected": [msg("assistant", "I like dogs.")]},
    {"source_row": 2, "prompt": [msg("user", "Give the capital of France.")], "chosen": [msg("assistant", "Paris.")],
     "rejected": [msg("assistant", "Lyon.")]},
    {"source_row": 4, "prompt": [msg("user", "Add the numbers.\n2 and 3")], "chosen": [msg("assistant", "5")],
     "rejected": [msg("assistant", "6")]},
]


def written(path):
    table, provenance = read_pairs(str(path))
    return table.to_pylist(), provenance


def check_records(rows, expected, source_rows_text):
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        for key in ("source_row", "prompt", "chosen", "rejected"):
            assert row[key] == want[key], (want["source_row"], key)
        assert json.loads(row["meta"]) == source_rows_text[want["source_row"] - 1]
        assert row["score_chosen"] is None and row["ratings_chosen"] is None


def sharegpt_rows():
    return json.loads((LF / "sharegpt_pref.json").read_text())


def alpaca_rows():
    return [json.loads(line) for line in (LF / "alpaca_pref.jsonl").read_text().splitlines()]


def test_sharegpt_detected_and_read_message_by_message(tmp_path):
    out = tmp_path / "s.parquet"
    result = run_cli("prepare", LF / "sharegpt_pref.json", "-o", out)
    rows, provenance = written(out)
    check_records(rows, SHAREGPT, sharegpt_rows())
    report = provenance["sources"][0]
    assert report["format"] == "sharegpt"
    assert report["duplicates"] == {"duplicate": {"count": 1, "rows": [3]}}
    # The tools go to the chat template, in the form templates take; the function call stays JSON text, counted.
    described = json.loads(json.loads(rows[1]["meta"])["tools"])
    assert json.loads(rows[1]["tools"]) == [{"type": "function", "function": described[0]}]
    assert rows[0]["tools"] is None and rows[2]["tools"] is None  # (row 4's tools are "")
    assert report["notes"] == {"function_call_as_text": {"count": 1, "rows": [2]}}
    assert "function_call_as_text × 1 (rows 2)" in result.stdout


def test_alpaca_detected_with_history_system_and_input(tmp_path):
    out = tmp_path / "a.parquet"
    run_cli("prepare", LF / "alpaca_pref.jsonl", "-o", out)
    rows, provenance = written(out)
    check_records(rows, ALPACA, alpaca_rows())
    assert provenance["sources"][0]["format"] == "alpaca"


@pytest.mark.parametrize(("name", "expected", "source"), [
    ("dpo_zh_demo", SHAREGPT, sharegpt_rows), ("dpo_alpaca_demo", ALPACA, alpaca_rows)])
def test_dataset_info_entries(tmp_path, name, expected, source):
    out = tmp_path / "d.parquet"
    result = run_cli_inprocess("prepare", "--dataset-info", INFO, "--dataset", name, "-o", out)
    assert result.returncode == 0, result.stderr
    rows, provenance = written(out)
    check_records(rows, expected, source())
    assert provenance["dataset_info"]["dataset"] == name
    assert provenance["dataset_info"]["entry"] == json.loads(INFO.read_text())[name]


def test_dataset_info_tags_and_renamed_columns(tmp_path):
    out = tmp_path / "t.parquet"
    result = run_cli_inprocess("prepare", "--dataset-info", INFO, "--dataset", "dpo_custom_tags", "-o", out)
    assert result.returncode == 0, result.stderr
    rows, _ = written(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ([msg("system", "Answer briefly."), msg("user", "2+2?")], [msg("assistant", "4")], [msg("assistant", "5")])]


def test_alpaca_tools_are_the_pairs_tools(tmp_path):
    """LLaMA-Factory's alpaca layout has a tools column too (its converter reads it as the sharegpt one's): detected
    from the data it was left out without a word, and an entry naming it (columns.tools) was refused."""
    tool = {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    row = {"instruction": "Weather in Paris?", "input": "", "chosen": '{"name": "weather", "arguments": '
           '{"city": "Paris"}}', "rejected": "It is sunny.", "tools": json.dumps([tool])}
    write_jsonl(tmp_path / "tools.jsonl", [row, {**row, "funcs": row["tools"], "tools": ""}])
    info = {"named": {"file_name": "tools.jsonl", "ranking": True, "columns": {"tools": "funcs"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    wrapped = [{"type": "function", "function": tool}]
    result = run_cli_inprocess("prepare", tmp_path / "tools.jsonl", "-o", tmp_path / "d.parquet")
    assert result.returncode == 0, result.stderr
    assert [r["tools"] and json.loads(r["tools"]) for r in written(tmp_path / "d.parquet")[0]] == [wrapped, None]
    result = run_cli_inprocess("prepare", "--dataset-info", tmp_path, "--dataset", "named", "-o",
                               tmp_path / "n.parquet")
    assert result.returncode == 0, result.stderr
    assert [r["tools"] and json.loads(r["tools"]) for r in written(tmp_path / "n.parquet")[0]] == [None, wrapped]


def test_a_dataset_info_folder_is_read_as_llamafactory_reads_it(tmp_path):
    """file_name naming a folder: LLaMA-Factory loads every file in it as one split; perpair let Datasets choose, which
    reads train.json as the train split and left test.json's rows out, exit 0."""
    rows = alpaca_rows()
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "train.jsonl", rows[:2])
    write_jsonl(tmp_path / "parts" / "test.jsonl", rows[2:])
    info = {"folder": {"file_name": "parts", "ranking": True, "columns": {"system": "system", "history": "history"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    out = tmp_path / "f.parquet"
    result = run_cli_inprocess("prepare", "--dataset-info", tmp_path, "--dataset", "folder", "-o", out)
    assert result.returncode == 0, result.stderr
    written_rows, provenance = written(out)
    assert sorted((r["source"], r["source_row"]) for r in written_rows) == [
        ("parts/test.jsonl", 1), ("parts/test.jsonl", 2), ("parts/train.jsonl", 2)]  # (train row 1 repeats test's)
    assert [s["rows_read"] for s in provenance["sources"]] == [2, 2]
    assert "split 'test': LLaMA-Factory loads the files of a folder given by file_name as one split, 'train'" in \
        info_error(tmp_path, "folder", tmp_path / "dataset_info.json", "--split", "test")
    assert "--revision 'v1' applies to a Hub dataset, not to the folder dataset 'folder' names" in \
        info_error(tmp_path, "folder", tmp_path / "dataset_info.json", "--revision", "v1")


def test_role_names_outside_the_four_are_errors_unless_mapped(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "2+2?"}],
           "chosen": [{"role": "gpt", "content": "4"}], "rejected": [{"role": "gpt", "content": "5"}]}
    source = write_jsonl(tmp_path / "r.jsonl", [row])
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "u.parquet")
    assert result.returncode == 2 and not (tmp_path / "u.parquet").exists()
    assert "row 1, field 'prompt[1].role': role 'human' is not one of system, user, assistant, tool; map it " \
           "with --role-map human=ROLE" in result.stderr
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "u.parquet",
                               "--role-map", "human=user,gpt=assistant")
    assert result.returncode == 0, result.stderr
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in written(tmp_path / "u.parquet")[0]] == [
        ([msg("system", "Be brief."), msg("user", "2+2?")], [msg("assistant", "4")], [msg("assistant", "5")])]
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "v.parquet", "--role-map", "human=user,human=system")
    assert result.returncode == 2 and "human is mapped twice in 'human=user,human=system'" in result.stderr
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "v.parquet", "--role-map", "human=boss")
    assert result.returncode == 2
    assert "invalid options: --role-map human=boss: the role must be one of system, user, assistant, tool" \
        in result.stderr


def info_error(tmp_path, name, info=INFO, *options):
    out = tmp_path / "x.parquet"
    result = run_cli_inprocess("prepare", "--dataset-info", info, "--dataset", name, *options, "-o", out)
    assert result.returncode == 2 and not out.exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_dataset_info_rows_are_read_where_llamafactory_reads_them(tmp_path):
    """An entry naming its rows in two places was read from its file_name, where LLaMA-Factory (get_dataset_list)
    reads hf_hub_url, ms_hub_url, om_hub_url, script_url and cloud_file_name first: other data than the dataset it
    trains on. Now hf_hub_url is followed (a Hub dataset, as `perpair prepare hub:ID` reads it), and an entry that
    LLaMA-Factory reads from a place perpair does not read is refused, naming it."""
    from perpair.data.llamafactory import load_dataset_entry

    info = json.loads(INFO.read_text())
    info["both"] = {**info["dpo_zh_demo"], "hf_hub_url": "llamafactory/DPO-En-Zh-20k"}
    info["modelscope"] = {**info["dpo_zh_demo"], "ms_hub_url": "llamafactory/DPO-En-Zh-20k"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (tmp_path / "sharegpt_pref.json").write_text((LF / "sharegpt_pref.json").read_text())
    assert load_dataset_entry(str(tmp_path), "both").source == "hub:llamafactory/DPO-En-Zh-20k"
    assert load_dataset_entry(str(tmp_path), "dpo_zh_demo").source == str(tmp_path / "sharegpt_pref.json")
    assert info_error(tmp_path, "modelscope", tmp_path) == (
        f"error: file {tmp_path / 'dataset_info.json'}, field 'ms_hub_url': dataset 'modelscope': LLaMA-Factory "
        "reads it from 'ms_hub_url', and perpair reads datasets given by 'file_name' or 'hf_hub_url'; download the "
        "data and name it with file_name alone")


def test_dataset_info_refusals_name_what_is_there(tmp_path):
    listing = "ranking datasets there: dpo_alpaca_demo, dpo_custom_tags, dpo_misnamed_column, dpo_zh_demo"
    assert f"no dataset 'nope' in it; {listing}" in info_error(tmp_path, "nope")
    assert f"dataset 'sft_demo': not a preference dataset (no \"ranking\": true), so it has no pairs; {listing}" \
        in info_error(tmp_path, "sft_demo")
    assert "these rows are unpaired (KTO) data; perpair needs pairs" in info_error(tmp_path, "kto_demo")
    line = info_error(tmp_path, "dpo_misnamed_column")
    assert "row 1, field 'question': dataset 'dpo_misnamed_column' (columns.prompt) names column 'question', " \
           "which is not in the data (the row has: chosen, history, input, instruction, rejected, system)" in line
    info = json.loads(INFO.read_text())
    info["dpo_zh_demo"]["columns"]["system"] = "system_prompt"       # an optional column no row has
    info["images"] = {**info["dpo_zh_demo"], "columns": {"images": "images"}}
    info["ms"] = {"ms_hub_url": "x/y", "ranking": True}
    info["subset"] = {**info["dpo_zh_demo"], "subset": "en", "num_samples": 10}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (tmp_path / "sharegpt_pref.json").write_text((LF / "sharegpt_pref.json").read_text())
    assert "dataset 'dpo_zh_demo' (columns.system) names column 'system_prompt', which no row has" \
        in info_error(tmp_path, "dpo_zh_demo", tmp_path)              # the folder is enough
    assert "'images' column: perpair reads text only" in info_error(tmp_path, "images", tmp_path)
    assert "'file_name' or 'hf_hub_url'" in info_error(tmp_path, "ms", tmp_path)
    assert "field 'num_samples': dataset 'subset': perpair does not read 'num_samples', 'subset' (it reads " \
        "columns, file_name, formatting, hf_hub_url, ranking, split, tags)" in info_error(tmp_path, "subset", tmp_path)
    (tmp_path / "latin1.json").write_bytes('{"caf\xe9": 1}'.encode("latin-1"))
    assert "not valid UTF-8" in info_error(tmp_path, "x", tmp_path / "latin1.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in info_error(tmp_path, "x", tmp_path / "deep.json")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_text_parts_are_joined_and_images_refused_with_the_row(tmp_path):
    parts = [{"type": "text", "text": "Describe "}, {"type": "text", "text": "the sky."}]
    rows = [{"prompt": [{"role": "user", "content": parts}], "chosen": "Blue.", "rejected": "Green."}]
    out = tmp_path / "p.parquet"
    assert run_cli_inprocess("prepare", write_jsonl(tmp_path / "p.jsonl", rows), "-o", out).returncode == 0
    assert written(out)[0][0]["prompt"] == [msg("user", "Describe the sky.")]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    rows.insert(0, {**rows[0], "prompt": [{"role": "user", "content": [image, *parts]}]})
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "i.jsonl", rows), "-o", tmp_path / "i.parquet")
    assert result.returncode == 2 and not (tmp_path / "i.parquet").exists()
    assert "row 1, field 'prompt[0].content[0].type': content part of type 'image_url': perpair reads text " \
           "only" in result.stderr


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "label": True},
    {"prompt": "hi", "completion": "hello", "label": False},
    {"conversations": [{"from": "human", "value": "hi"}], "label": True}])
def test_unpaired_kto_rows_get_their_own_refusal(tmp_path, row):
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "k.jsonl", [row]), "-o", tmp_path / "k.parquet")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("row 1: these rows are unpaired (KTO) data; perpair needs pairs (a "
                                          "chosen and a rejected response to the same prompt)")


@pytest.mark.parametrize(("turns", "field", "problem"), [
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "conversations",
     "must end with a user (or observation) turn"),
    ([{"from": "narrator", "value": "q"}], "conversations[0].from", "role 'narrator' is not one of"),
    ([{"from": "human", "value": ["q"]}], "conversations[0].value[0]", "content part must be an object"),
    ([{"from": "system", "value": "s"}], "conversations", "the conversation has no user turn"),
])
def test_sharegpt_malformed_conversations(tmp_path, turns, field, problem):
    row = {"conversations": turns, "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "c.jsonl", [row]), "-o", tmp_path / "c.parquet")
    assert result.returncode == 2
    assert f"row 1, field '{field}': " in result.stderr and problem in result.stderr


def test_sharegpt_response_must_be_an_assistant_turn_and_system_prompts_agree(tmp_path):
    base = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "human", "value": "b"}}
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "r.jsonl", [base]), "-o", tmp_path / "r.parquet")
    assert "field 'rejected': the response must be an assistant turn, got role 'user'" in result.stderr
    base["rejected"] = {"from": "gpt", "value": "b"}
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "s.jsonl", [{**base, "system": "T"}]), "-o",
                               tmp_path / "s.parquet")
    assert result.returncode == 2 and "field 'system': the row has a system column and a different system turn" \
        in result.stderr
    result = run_cli_inprocess("prepare", write_jsonl(tmp_path / "t.jsonl", [{**base, "system": "S"}]), "-o",
                               tmp_path / "t.parquet")
    assert result.returncode == 0
    assert written(tmp_path / "t.parquet")[0][0]["prompt"] == [msg("system", "S"), msg("user", "q")]


def test_dataset_info_options_go_together_and_alone(tmp_path):
    out = tmp_path / "o.parquet"
    result = run_cli_inprocess("prepare", "--dataset", "dpo_zh_demo", "-o", out)
    assert result.returncode == 2
    assert result.stderr == "error: invalid options: give both --dataset-info and --dataset, or neither\n"
    result = run_cli_inprocess("prepare", LF / "alpaca_pref.jsonl", "--dataset-info", INFO, "--dataset",
                               "dpo_zh_demo", "-o", out)
    assert result.stderr == "error: --dataset-info names the data itself; give no other source\n"
    result = run_cli_inprocess("prepare", "--dataset-info", INFO, "--dataset", "dpo_zh_demo", "--format", "trl",
                               "-o", out)
    assert "--dataset-info describes the layout itself; leave out --format" in result.stderr
    result = run_cli_inprocess("prepare", LF / "alpaca_pref.jsonl", "--format", "alpaca", "--prompt-col", "x",
                               "-o", out)
    assert result.stderr == "error: invalid options: --format alpaca does not read --*-col options (they apply " \
                            "to columns, trl, ultrafeedback; --score-*-col to hh-rlhf too)\n"
    assert not out.exists()
