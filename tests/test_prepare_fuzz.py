"""The prepare command line on generated bad input, for every reader: each run exits 2 with exactly one
line on stderr, starting `error:`, no traceback, and nothing written at -o.

Each case is a one-pair file of a layout with one part broken in a way that must be refused: a required
field deleted or renamed (also to markup such as `[/x]`), a text or number replaced by a value of another
type or by JSON nested past any recursion limit, a role renamed, the text a pair needs emptied (with one
pair in the file, a degenerate pair leaves none, which is an error), or the row not an object. The command
line runs in-process (:mod:`cli_inprocess`); the last test shows that gives what the program gives."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_inprocess import run_cli_inprocess
from conftest import run_cli

EXAMPLES = 200
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

P, C, R = "Name a prime.", "7", "8"
U = {"role": "user", "content": P}
A = {"role": "assistant", "content": C}
B = {"role": "assistant", "content": R}


def completion(text, score):
    return {"response": text, "overall_score": score,
            "annotations": {"helpfulness": {"Rating": "4"}, "honesty": {"Rating": "N/A"}}}


# Per reader (--format): a valid one-pair row, then the paths of its required text fields, of the text a
# pair needs (emptied, the pair is degenerate or malformed), of its numbers, and of its roles.
LAYOUTS = {
    "ultrafeedback": (
        {"prompt": P, "chosen": C, "rejected": R, "metadata": {"score_chosen": 8, "score_rejected": 3}},
        [("prompt",), ("chosen",), ("rejected",)], [("prompt",), ("chosen",), ("rejected",)],
        [("metadata", "score_chosen"), ("metadata", "score_rejected")], []),
    "ultrafeedback-raw": (
        {"instruction": P, "completions": [completion(C, 8), completion(R, 3), completion("9", 5)]},
        [("instruction",), ("completions", 0, "response"), ("completions", 2, "response")], [("instruction",)],
        [("completions", 0, "overall_score"), ("completions", 1, "overall_score")], []),
    "hh-rlhf": (
        {"chosen": f"\n\nHuman: {P}\n\nAssistant: {C}", "rejected": f"\n\nHuman: {P}\n\nAssistant: {R}"},
        [("chosen",), ("rejected",)], [("chosen",), ("rejected",)], [], []),
    "openai": (
        {"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [B]},
        [("input", "messages", 0, "content"), ("preferred_output", 0, "content"),
         ("non_preferred_output", 0, "content")],
        [("input", "messages", 0, "content"), ("preferred_output", 0, "content"),
         ("non_preferred_output", 0, "content")], [],
        [("input", "messages", 0, "role"), ("preferred_output", 0, "role"), ("non_preferred_output", 0, "role")]),
    "trl": (
        {"prompt": [U], "chosen": [A], "rejected": [B]},
        [("prompt", 0, "content"), ("chosen", 0, "content"), ("rejected", 0, "content")],
        [("prompt", 0, "content"), ("chosen", 0, "content"), ("rejected", 0, "content")], [],
        [("prompt", 0, "role"), ("chosen", 0, "role"), ("rejected", 0, "role")]),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": P}], "chosen": {"from": "gpt", "value": C},
         "rejected": {"from": "gpt", "value": R}},
        [("conversations", 0, "value"), ("chosen", "value"), ("rejected", "value")],
        [("conversations", 0, "value"), ("chosen", "value"), ("rejected", "value")], [],
        [("conversations", 0, "from"), ("chosen", "from"), ("rejected", "from")]),
    "alpaca": (
        {"instruction": P, "input": "", "chosen": C, "rejected": R},
        [("instruction",), ("chosen",), ("rejected",)], [("instruction",), ("chosen",), ("rejected",)], [], []),
}
# Role names some reader accepts: a renamed role must be none of them.
ACCEPTED_ROLES = {"system", "user", "assistant", "tool", "human", "gpt", "observation", "function_call"}

MARKUP = st.sampled_from(["[/x]", "[bold]", "[red]x[/red]", "[link=file:///etc]y[/link]", "][", "[/]", "\\[x]"])
names = st.one_of(MARKUP, st.text(min_size=1, max_size=12), st.builds(lambda m, t: m + t, MARKUP, st.text(max_size=5)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True))
garbage = st.recursive(scalars | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=3),
                       max_leaves=8)
# Not text: no string, and no list whose items could be text parts (the only non-string content read).
not_text = st.one_of(scalars, st.dictionaries(st.text(max_size=4), garbage, max_size=3),
                     st.lists(st.one_of(scalars, st.lists(garbage, max_size=2)), min_size=1, max_size=3))
not_number = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.lists(garbage, max_size=2),
                       st.dictionaries(st.text(max_size=4), garbage, max_size=2),
                       st.sampled_from([float("nan"), float("inf"), float("-inf")]))
blank = st.sampled_from(["", " ", "\n\t ", "\u3000", "\r\n"])
DEEP = "\x00deep\x00"


def parent_of(row, path):
    for key in path[:-1]:
        row = row[key]
    return row


@st.composite
def bad_inputs(draw, fmt):
    """``(line, kind, shown)``: the file's one line, the kind of fault, and a string the error must show."""
    base, texts, needed, numbers, roles = LAYOUTS[fmt]
    row = copy.deepcopy(base)
    kinds = ["delete", "rename", "not_text", "deep", "empty", "not_object"] + ["not_number"] * bool(numbers) \
        + ["role"] * bool(roles)
    kind = draw(st.sampled_from(kinds))
    shown = None
    if kind in ("delete", "rename"):
        path = draw(st.sampled_from(texts + numbers + roles))
        parent = parent_of(row, path)
        value = parent.pop(path[-1]) if isinstance(parent, dict) else None
        if kind == "rename" and isinstance(parent, dict):
            new = draw(names.filter(lambda n: n not in parent and n != path[-1] and n not in
                                    ("role", "content", "from", "value")))
            parent[new] = value
        elif isinstance(parent, list):        # a list item: break it instead
            parent[path[-1]] = draw(not_text)
    elif kind == "not_text":
        path = draw(st.sampled_from(texts))
        parent_of(row, path)[path[-1]] = draw(not_text)
    elif kind == "not_number":
        path = draw(st.sampled_from(numbers))
        parent_of(row, path)[path[-1]] = draw(not_number)
    elif kind == "deep":
        path = draw(st.sampled_from(texts + numbers + roles))
        parent_of(row, path)[path[-1]] = DEEP
    elif kind == "empty":
        path = draw(st.sampled_from(needed))
        parent_of(row, path)[path[-1]] = draw(blank)
    elif kind == "role":
        path = draw(st.sampled_from(roles))
        role = draw(names.filter(lambda n: n not in ACCEPTED_ROLES))
        parent_of(row, path)[path[-1]] = role
        shown = role if role.isascii() and role.isprintable() else None
    else:
        row = draw(st.one_of(st.lists(garbage, max_size=3), scalars, st.text(max_size=6)))
    line = json.dumps(row)
    if kind == "deep":
        depth = draw(st.integers(3_000, 30_000))
        line = line.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return line, kind, shown


def check_refused(fmt, line, *, run=run_cli_inprocess):
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in[put].jsonl"
        source.write_text(line + "\n")
        out = Path(folder) / "out.parquet"
        result = run("prepare", source, "--format", fmt, "-o", out)
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (line[:300], result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
        assert len(lines) == 1 and lines[0].startswith(f"error: file {source}"), result.stderr
        assert sorted(p.name for p in Path(folder).iterdir()) == [source.name]
        return result


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_generated_bad_rows_are_refused_with_one_error_line(fmt):
    kinds: list[str] = []

    @SETTINGS
    @given(bad_inputs(fmt))
    def check(case):
        line, kind, shown = case
        kinds.append(kind)
        result = check_refused(fmt, line)
        if shown is not None:
            assert f"role {shown!r} is not one of" in result.stderr

    check()
    assert len(kinds) >= EXAMPLES
    assert set(kinds) >= {"delete", "rename", "not_text", "deep", "empty", "not_object"}   # every kind tried


@pytest.mark.parametrize(("fmt", "line"), [
    ("sharegpt", json.dumps({**LAYOUTS["sharegpt"][0], "chosen": {"from": "[/x]", "value": C}})),
    ("trl", json.dumps({"prompt": [{"role": "user", "content": "[" * 5000 + "]" * 5000}], "chosen": C,
                        "rejected": R}).replace('"' + "[" * 5000 + "]" * 5000 + '"', "[" * 5000 + "]" * 5000)),
    ("alpaca", json.dumps({**LAYOUTS["alpaca"][0], "chosen": " "})),
])
def test_in_process_runs_answer_as_the_program(fmt, line):
    """The in-process runner and the real program (a subprocess) give the same status and output."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in[put].jsonl"
        source.write_text(line + "\n")
        out = Path(folder) / "o.parquet"
        inner = run_cli_inprocess("prepare", source, "--format", fmt, "-o", out)
        outer = run_cli("prepare", source, "--format", fmt, "-o", out, check=False, fresh=True)
    assert (inner.returncode, inner.stdout, inner.stderr) == (outer.returncode, outer.stdout, outer.stderr)
    assert outer.returncode == 2 and outer.stderr.startswith(f"error: file {source}")
