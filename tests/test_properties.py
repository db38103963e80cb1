"""Property-based tests over the readers: well-formed rows round-trip; malformed rows give the validation
error (``InputError`` naming file and row), never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perpair.data import PrepareOptions, prepare, read_pairs
from perpair.data.schema import normalise_text
from perpair.errors import InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text with at least one visible character, so no generated pair is degenerate by emptiness.
text = st.text(min_size=1, max_size=40).filter(lambda s: normalise_text(s) != "")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def pair_contents(draw):
    prompt = draw(text)
    chosen = draw(text)
    rejected = draw(text.filter(lambda s: normalise_text(s) != normalise_text(chosen)))
    return prompt, chosen, rejected, draw(st.integers(1, 10)), draw(st.integers(1, 10))


def as_layout(layout, prompt, chosen, rejected, score_c, score_r):
    if layout == "trl-lib":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "metadata": {"score_chosen": score_c, "score_rejected": score_r}}
    if layout == "h4":
        return {"prompt": prompt, "score_chosen": score_c, "score_rejected": score_r,
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]}
    if layout == "openai":
        return {"input": {"messages": [{"role": "user", "content": prompt}]},
                "preferred_output": [{"role": "assistant", "content": chosen}],
                "non_preferred_output": [{"role": "assistant", "content": rejected}]}
    if layout == "conversational":
        return {"prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    raise ValueError(layout)


LAYOUTS = ("trl-lib", "h4", "openai", "conversational")
FORMAT_OF = {"trl-lib": "ultrafeedback", "h4": "ultrafeedback", "openai": "openai", "conversational": "trl"}


def run_prepare(rows, **options):
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "rows.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(folder) / "out.parquet"
        prepare([str(source)], out, PrepareOptions(**options))
        return read_pairs(str(out))[0].to_pylist()


@SETTINGS
@given(st.lists(pair_contents(), min_size=1, max_size=5, unique_by=lambda p: p[:3]),
       st.sampled_from(LAYOUTS))
def test_well_formed_rows_round_trip(contents, layout):
    rows = [as_layout(layout, *c) for c in contents]
    written = run_prepare(rows, format=FORMAT_OF[layout])
    assert len(written) == len(rows)
    for record, (prompt, chosen, rejected, score_c, score_r), original in zip(written, contents, rows,
                                                                               strict=True):
        assert record["prompt"] == [{"role": "user", "content": prompt}]
        assert record["chosen"] == [{"role": "assistant", "content": chosen}]
        assert record["rejected"] == [{"role": "assistant", "content": rejected}]
        assert json.loads(record["meta"]) == original
        if layout in ("trl-lib", "h4"):
            assert (record["score_chosen"], record["score_rejected"]) == (score_c, score_r)
    # The id depends on content only: every layout gives the same ids.
    ids = {lay: [r["pair_id"] for r in run_prepare([as_layout(lay, *c) for c in contents],
                                                     format=FORMAT_OF[lay])] for lay in LAYOUTS}
    assert len({tuple(v) for v in ids.values()}) == 1


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*prefix, index))


@st.composite
def corrupted_rows(draw):
    """A well-formed row with one part deleted or replaced by an arbitrary JSON value."""
    layout = draw(st.sampled_from(LAYOUTS))
    row = as_layout(layout, *draw(pair_contents()))
    path = draw(st.sampled_from([p for p in _paths(row) if p]))
    parent = row
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return FORMAT_OF[layout], row


@SETTINGS
@given(corrupted_rows(), st.booleans())
def test_malformed_rows_give_the_validation_error_and_nothing_else(case, detect):
    fmt, row = case
    try:
        run_prepare([row], format=None if detect else fmt)
    except InputError as exc:
        assert exc.file and exc.file.endswith("rows.jsonl")
        # The row is named, or it was valid but degenerate, which leaves no pair: an error of its own.
        assert exc.row == 1 or "no pairs kept, nothing written: 1 row read, none kept (degenerate: " in str(exc)


@SETTINGS
@given(st.binary(min_size=1, max_size=60))
def test_arbitrary_bytes_never_raise_another_exception(junk):
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "junk.jsonl"
        source.write_bytes(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n" + junk)
        try:
            prepare([str(source)], Path(folder) / "out.parquet", PrepareOptions(format="trl"))
        except InputError as exc:
            assert exc.file == str(source)
            assert exc.row is not None and exc.row >= 2
        # With --skip-invalid nothing is lost silently: every row is kept or counted.
        result = prepare([str(source)], Path(folder) / "out.parquet",
                         PrepareOptions(format="trl", skip_invalid=True))
        report = result.sources[0]
        assert report.rows_read == report.pairs_kept + report.invalid.total + report.degenerate.total \
            + report.duplicates.total
