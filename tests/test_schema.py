"""pair_id: the documented recipe, recomputed independently here, and its invariances."""

from __future__ import annotations

import hashlib
import json
import unicodedata

from perpair.data.schema import PairRecord, compute_pair_id, records_to_table


def by_the_docs(prompt, chosen, rejected):
    def norm(text):
        return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()

    value = [[[m["role"], norm(m["content"])] for m in part] for part in (prompt, chosen, rejected)]
    return hashlib.sha256(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:16]


def msgs(role, *texts):
    return [{"role": role, "content": t} for t in texts]


def test_pair_id_follows_the_documented_recipe():
    prompt = msgs("system", "Be brief.") + msgs("user", "Café?\r\n")
    chosen, rejected = msgs("assistant", " Yes. "), msgs("assistant", "No.")
    assert compute_pair_id(prompt, chosen, rejected) == by_the_docs(prompt, chosen, rejected)
    # Hand-computed once from the recipe for a fixed pair, so a change of recipe is caught.
    payload = b'[[["user","2+2?"]],[["assistant","4"]],[["assistant","5"]]]'
    assert compute_pair_id(msgs("user", "2+2?"), msgs("assistant", "4"), msgs("assistant", "5")) == \
        hashlib.sha256(payload).hexdigest()[:16]


def test_pair_id_of_a_pair_with_tools_follows_the_documented_recipe():
    """The tools are part of the prompt the model sees: the same messages with other tools are another pair."""
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo"}}]
    args = (msgs("user", "Weather?"), msgs("assistant", "Sunny"), msgs("assistant", "Rain"))
    payload = json.dumps([*[[[m["role"], m["content"]] for m in part] for part in args], tools],
                         separators=(",", ":"), ensure_ascii=False).encode()
    assert compute_pair_id(*args, json.dumps(tools)) == hashlib.sha256(payload).hexdigest()[:16]
    assert compute_pair_id(*args, json.dumps(tools)) != compute_pair_id(*args) != compute_pair_id(*args, "[]")


def test_pair_id_ignores_only_normalisation_differences():
    base = compute_pair_id(msgs("user", "Hi"), msgs("assistant", "A"), msgs("assistant", "B"))
    decomposed = unicodedata.normalize("NFD", "é")
    assert compute_pair_id(msgs("user", "  Hi\n"), msgs("assistant", "A"), msgs("assistant", "B")) == base
    assert compute_pair_id(msgs("user", "Hi"), msgs("assistant", "B"), msgs("assistant", "A")) != base
    assert compute_pair_id(msgs("system", "Hi"), msgs("assistant", "A"), msgs("assistant", "B")) != base
    assert compute_pair_id(msgs("user", "Hi"), msgs("assistant", "A", ""), msgs("assistant", "B")) != base
    assert compute_pair_id(msgs("user", decomposed), msgs("assistant", "A"), msgs("assistant", "B")) == \
        compute_pair_id(msgs("user", "é"), msgs("assistant", "A"), msgs("assistant", "B"))


def test_records_to_table_keeps_ratings_and_nulls():
    record = PairRecord(prompt=msgs("user", "q"), chosen=msgs("assistant", "a"), rejected=msgs("assistant", "b"),
                        source="x", source_row=3, meta="{}", score_chosen=2.0, score_rejected=1.0,
                        ratings_chosen={"honesty": 5.0})
    row = records_to_table([record]).to_pylist()[0]
    assert row["pair_id"] == record.pair_id
    assert row["ratings_chosen"] == [("honesty", 5.0)]
    assert row["ratings_rejected"] is None
    assert row["score_rejected"] == 1.0
