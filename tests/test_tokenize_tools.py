"""Tool descriptions (TRL's ``tools`` column, OpenAI's ``input.tools``) reach the chat template as TRL 1.16's
``DPOTrainer`` passes them: a tool-use pair gives the same tokens here and there, and a template that would drop
them is refused."""

from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from cli_inprocess import run_cli_inprocess  # noqa: E402
from perpair.data import read_pairs  # noqa: E402
from perpair.errors import PerpairError  # noqa: E402
from perpair.integrations.trl import pair_ids  # noqa: E402
from perpair.models import resolve_model  # noqa: E402
from perpair.train.logprobs import tokenize_table  # noqa: E402

# A Qwen-style template: the tools in the system turn, as Qwen 2.5 and 3 render them.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}{% for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}


def msgs(role, text):
    return [{"role": role, "content": text}]


def tokenizer(template=TOOLS_TEMPLATE):
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    if template is not None:
        tok.chat_template = template
    return tok


def rows(tools_as_text: bool):
    tools = [[WEATHER, TIME], None, [TIME], []]
    out = [{"prompt": msgs("system", "Be brief.") + msgs("user", "Weather in Paris?"),
            "chosen": msgs("assistant", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                        '</tool_call>'),
            "rejected": msgs("assistant", "I cannot know.")},
           {"prompt": msgs("user", "Hi"), "chosen": msgs("assistant", "Hello!"), "rejected": msgs("assistant", "Go.")},
           {"prompt": msgs("user", "Time in Oslo?"), "chosen": msgs("assistant", "I will look it up."),
            "rejected": msgs("assistant", "Noon.")},
           {"prompt": msgs("user", "2+2?"), "chosen": msgs("assistant", "4"), "rejected": msgs("assistant", "5")}]
    for row, described in zip(out, tools, strict=True):
        row["tools"] = json.dumps(described) if tools_as_text and described is not None else described
    return out


def trl_tokens(source, tok) -> list[dict]:
    """TRL 1.16's own tokenization of a dataset (``DPOTrainer._prepare_dataset``, no truncation)."""
    dataset = Dataset.from_parquet(str(source))
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    done = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), dataset, tok, args, "train")
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in done]


def prepared(tmp_path, table: pa.Table):
    source = tmp_path / "tools.parquet"
    pq.write_table(table, source)
    out = tmp_path / "pairs.parquet"
    result = run_cli_inprocess("prepare", source, "-o", out)
    assert result.returncode == 0, result.stderr
    return source, read_pairs(str(out))[0]


@pytest.mark.parametrize("as_text", [True, False], ids=["json_text", "structs"])
def test_a_tools_column_tokenizes_as_trl_dpo_trainer(tmp_path, as_text):
    source, pairs = prepared(tmp_path, pa.Table.from_pylist(rows(as_text)))
    tok = tokenizer()
    ids, ours = tokenize_table(tok, pairs, None)
    theirs = trl_tokens(source, tok)
    assert len(ids) == len(theirs) == 4
    for mine, trl in zip(ours, theirs, strict=True):
        assert (mine.prompt, mine.chosen, mine.rejected) == (trl["prompt_ids"], trl["chosen_ids"],
                                                             trl["rejected_ids"])
    # (the tools are in the prompt: a test that would pass with them dropped proves nothing)
    assert "get_weather" in tok.decode(ours[0].prompt) and "get_weather" not in tok.decode(ours[2].prompt)


def test_the_same_texts_with_other_tools_are_two_pairs_with_the_plugins_ids(tmp_path):
    same = rows(True)[0]
    table = pa.Table.from_pylist([same, {**same, "tools": json.dumps([TIME])}])
    source, pairs = prepared(tmp_path, table)
    ids = pairs.column("pair_id").to_pylist()
    assert len(set(ids)) == 2
    assert pair_ids(Dataset.from_parquet(str(source))) == ids


def test_tools_of_a_struct_column_are_the_pair_their_json_gives(tmp_path):
    """A Parquet struct column (a Hub dataset's too) gives every tool description each field any description of the
    column has, null where it has none: the same data in JSON Lines, as objects or as JSON text, gave other pairs
    (other ids, a plan of one copy refused on the other), and the prompt described a "city": null parameter of the
    search function and "required": null. Without the nulls the three are one pair, token for token."""
    search = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                                "parameters": {"type": "object",
                                                               "properties": {"query": {"type": "string"},
                                                                              "limit": {"type": "integer"}},
                                                               "required": ["query"]}}}
    data = [{"prompt": msgs("user", "Weather in Paris?"), "chosen": msgs("assistant", "get_weather(Paris)"),
             "rejected": msgs("assistant", "I cannot know."), "tools": [WEATHER]},
            {"prompt": msgs("user", "Find cats"), "chosen": msgs("assistant", "search(cats)"),
             "rejected": msgs("assistant", "No."), "tools": [search, TIME]}]
    sources = {"objects.jsonl": data, "text.jsonl": [{**r, "tools": json.dumps(r["tools"])} for r in data]}
    for name, rows_ in sources.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows_))
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "structs.parquet")
    tok, read = tokenizer(), {}
    for name in (*sources, "structs.parquet"):
        out = tmp_path / f"{name}.pairs.parquet"
        result = run_cli_inprocess("prepare", tmp_path / name, "-o", out)
        assert result.returncode == 0, result.stderr
        pairs = read_pairs(str(out))[0]
        ids, tokenized = tokenize_table(tok, pairs, None)
        read[name] = (ids, pairs.column("tools").to_pylist(), [(t.prompt, t.chosen, t.rejected) for t in tokenized])
    assert read["structs.parquet"] == read["objects.jsonl"] == read["text.jsonl"]
    assert [json.loads(t) for t in read["structs.parquet"][1]] == [r["tools"] for r in data]
    assert pair_ids(Dataset.from_parquet(str(tmp_path / "structs.parquet"))) == read["objects.jsonl"][0]


def test_a_chat_template_that_ignores_tools_is_refused(tmp_path):
    """SmolLM2's template renders no tools: TRL would train on the pair without them, the model learning to call
    functions it is never shown."""
    _, pairs = prepared(tmp_path, pa.Table.from_pylist(rows(True)))
    with pytest.raises(PerpairError, match="does not render"):
        tokenize_table(tokenizer(None), pairs, None)
    # pairs without tools (or with an empty list) are tokenized as before
    assert len(tokenize_table(tokenizer(None), pairs.take([1, 3]), None)[0]) == 2


@pytest.mark.parametrize(("tools", "message"), [
    ("[{\"type\": ", "field 'tools': tools are not JSON text"),
    ({"type": "function"}, "field 'tools': expected a list of tool descriptions, got dict"),
    (["get_weather"], "field 'tools[0]': expected a tool description (an object), got str"),
])
def test_malformed_tools_are_an_error_naming_the_row(tmp_path, tools, message):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "tools": tools}) + "\n")
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "out.parquet")
    assert result.returncode == 2 and f"row 1, {message}" in result.stderr, result.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_chat_template_kwargs_are_refused_as_they_would_change_the_tokens(tmp_path):
    """TRL passes a row's chat_template_kwargs to the template (Qwen 3's enable_thinking=False adds an empty think
    block); read without them, the pair would be other tokens than TRL's."""
    source = tmp_path / "in.jsonl"
    kwargs = ({"enable_thinking": None}, None, {"enable_thinking": False})
    source.write_text("".join(json.dumps({"prompt": msgs("user", f"Hi {i}"), "chosen": msgs("assistant", "Hello"),
                                          "rejected": msgs("assistant", "Go"), "chat_template_kwargs": value}) + "\n"
                              for i, value in enumerate(kwargs)))
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "out.parquet")
    assert result.returncode == 2, result.stderr
    assert "row 3, field 'chat_template_kwargs': chat_template_kwargs are not read" in result.stderr
    # a struct column's null fields, or a null, set nothing
    result = run_cli_inprocess("prepare", source, "-o", tmp_path / "out.parquet", "--skip-invalid")
    assert result.returncode == 0 and read_pairs(str(tmp_path / "out.parquet"))[0].num_rows == 2


def test_a_pairs_file_that_kept_tools_in_meta_only_is_refused(tmp_path, tiny_model_dir):
    """A pairs file an earlier perpair wrote from tool-use data has no tools column: trained as it is, its prompts
    would render without the tools, as they did before; it is refused, naming the file and the fix."""
    from perpair.artifacts import write_artifact
    from perpair.data.schema import KIND, SCHEMA_VERSION, PairRecord, records_to_table

    record = PairRecord(msgs("user", "Weather?"), msgs("assistant", "call"), msgs("assistant", "no"), "in.jsonl", 1)
    old = records_to_table([record, PairRecord(msgs("user", "Hi"), msgs("assistant", "A"), msgs("assistant", "B"),
                                               "in.jsonl", 2)])
    old = old.drop_columns([c for c in ("tools",) if c in old.column_names])
    notes = {"tools_in_meta_only": {"count": 1, "rows": [1]}}
    path = tmp_path / "old.parquet"
    write_artifact(path, old, kind=KIND, schema_version=SCHEMA_VERSION, provenance={"sources": [{"notes": notes}]})
    with pytest.raises(PerpairError, match="keeps in 'meta' only"):
        read_pairs(str(path))
    result = run_cli_inprocess("train", "--model", tiny_model_dir, "--data", path, "--out", tmp_path / "out",
                               "--steps", "1", "--batch-size", "2", "--max-length", "64")
    assert result.returncode == 2 and result.stderr.startswith(f"error: file {path}: 1 pair(s) describe tools")
    # without such pairs the same file is read as before
    write_artifact(path, old, kind=KIND, schema_version=SCHEMA_VERSION, provenance={"sources": [{"notes": {}}]})
    assert read_pairs(str(path))[0].num_rows == 2
