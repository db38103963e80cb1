"""Templates, answer parsing and mapping back, the ratings teacher, aggregation, configuration."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from perpair.annotate.aggregate import aggregate_pair
from perpair.annotate.cache import AnswerCache, CallRecord
from perpair.annotate.config import RatingsTeacherConfig, load_config, parse_teacher_spec
from perpair.annotate.runner import shortfall, teacher_calls
from perpair.annotate.teachers import Call, RatingsTeacher
from perpair.annotate.templates import GAP_V1, ParseError, get_template, is_swapped, parse_answer
from perpair.errors import PerpairError

PAIR = {"pair_id": "00ff", "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "assistant", "content": "It is 5."}]}


def answer(**kw) -> str:
    base = {"better": "A", "category": "factuality", "magnitude": 2, "confidence": 0.9, "rationale": "5 is wrong"}
    return json.dumps({**base, **kw})


def test_render_puts_responses_in_the_recorded_order():
    plain = GAP_V1.render(PAIR, swapped=False)[-1]["content"]
    swapped = GAP_V1.render(PAIR, swapped=True)[-1]["content"]
    assert plain.index("It is 4.") < plain.index("It is 5.")
    assert swapped.index("It is 5.") < swapped.index("It is 4.")
    assert GAP_V1.id == "gap@v1" and get_template("gap@v1") is GAP_V1
    with pytest.raises(ValueError, match="unknown template"):
        get_template("gap@v9")


def test_order_is_seeded_per_pair_and_balanced():
    flags = [is_swapped(f"{i:016x}", "gap@v1", 0) for i in range(2000)]
    assert flags == [is_swapped(f"{i:016x}", "gap@v1", 0) for i in range(2000)]
    assert 0.45 < sum(flags) / len(flags) < 0.55
    assert flags != [is_swapped(f"{i:016x}", "gap@v1", 1) for i in range(2000)]


@pytest.mark.parametrize(("better", "swapped", "category", "preferred"), [
    ("A", False, "factuality", "chosen"), ("B", True, "factuality", "chosen"),
    ("B", False, "mislabeled", "rejected"), ("A", True, "mislabeled", "rejected"),
    ("tie", False, "no_clear_gap", "tie")])
def test_answers_are_mapped_back_from_positions(better, swapped, category, preferred):
    parsed = parse_answer(answer(better=better), swapped)
    assert (parsed.category, parsed.preferred, parsed.gap_category) == (category, preferred, "factuality")
    assert parsed.magnitude == 2.0 and parsed.confidence == 0.9


def test_parsing_tolerates_fences_and_case_but_not_out_of_range_values():
    assert parse_answer("```json\n" + answer(better="a", category="Instruction Following") + "\n```",
                        False).category == "instruction_following"
    assert parse_answer(answer(magnitude=0), False).category == "no_clear_gap"
    # a raw newline inside a string (llama.cpp's JSON grammar allows it) is not worth a re-ask
    assert parse_answer(answer(rationale="one|line").replace("|", "\n"), False).rationale == "one\nline"
    for bad, fragment in ((answer(magnitude=4), "magnitude"), (answer(confidence=5), "confidence"),
                          (answer(magnitude=1.5), "integer"), (answer(category="vibes"), "category"),
                          ('{"better": "A"', "malformed"), ("no json here", "no JSON"), ("", "empty"),
                          ("[1, 2]", "no JSON object"),
                          (answer(confidence=True), "confidence must be a number")):  # true was taken for 1.0
        with pytest.raises(ParseError, match=fragment):
            parse_answer(bad, False)


def test_the_answer_is_never_taken_from_reasoning_or_one_of_two_answers():
    """The first JSON object of a reply was the answer: a reasoning model's draft inside <think> (which servers
    leave in the content) was taken over its answer after it, and of two differing answers, or a key given twice
    (json keeps the last), one was taken without a word; "2.5" as text passed as magnitude 2.5."""
    draft, final = answer(better="B", category="style", magnitude=1), answer()
    for reply in (f"<think>A first draft: {draft}. No: A is better.</think>\n{final}",
                  f"Draft: {draft} Hmm, A is better.</think>{final}",  # <think> opened by the chat template
                  f"Let me think. {{first}} then:\n```json\n{final}\n```", f"{final}\n{final}"):
        parsed = parse_answer(reply, False)
        assert (parsed.category, parsed.magnitude, parsed.preferred) == ("factuality", 2.0, "chosen"), reply
    for reply, fragment in ((f"<think>A first draft: {draft}", "only reasoning"),
                            (f"{draft}\nOn reflection:\n{final}", "2 different JSON answers"),
                            (final[:-1] + ', "better": "B"}', "gives 'better' twice"),
                            (answer(magnitude="2.5"), "integer")):
        with pytest.raises(ParseError, match=fragment):
            parse_answer(reply, False)
    assert parse_answer(answer(magnitude="3"), False).magnitude == 3.0


def test_an_answer_that_does_not_decode_is_invalid_whatever_else_the_reply_holds():
    """A reply with a clean draft and a final answer that does not decode (a quote left unescaped, or cut at
    max_tokens) was parsed as the draft, status ok: the broken '{' was passed over for the clean one. An object
    naming the answer's keys that does not decode is now invalid (re-asked), as two different answers are; a '{' of
    prose that names none is still passed over."""
    draft = answer(better="B", category="style", magnitude=1)
    unescaped = answer(rationale='A says "4", B says "5"').replace('\\"', '"')
    for reply in (f"Draft: {draft}\nFinal: {unescaped}", f"Draft: {draft}\nFinal: {answer()[:40]}",
                  f"{unescaped}\nOr as JSON: {draft}", f"First {{better: A, category: factuality}} then {draft}",
                  f"{{\"notes\": {{\"x\": 1}}, \"better\": \"A\", \"rationale\": \"a \"b\"\"}} {draft}"):
        with pytest.raises(ParseError, match=r"^the JSON answer is malformed \("):
            parse_answer(reply, False)
    assert parse_answer(f"I use {{curly}} braces and say category: style.\n{draft}", False).category == "mislabeled"


def test_magnitude_edges_must_increase_from_zero(tmp_path):
    """magnitude_edges [3, 1] or [-1, 2] were accepted: with low > high no margin is magnitude 2, with low <= 0 none
    is magnitude 1. Refused naming the key; increasing positive edges are read."""
    yaml_file = tmp_path / "a.yaml"
    for edges in ("[3, 1]", "[-1, 2]", "[0, 2]", "[2, 2]", "[1, .inf]"):
        yaml_file.write_text(f"teachers:\n  - kind: ratings\n    magnitude_edges: {edges}\n")
        with pytest.raises(PerpairError, match=r"teachers\.0\.ratings\.magnitude_edges: got \[.*\]; give two margins "
                                               r"with 0 < low < high"):
            load_config(yaml_file)
    yaml_file.write_text("teachers:\n  - kind: ratings\n    magnitude_edges: [0.5, 2]\n")
    teacher = RatingsTeacher(load_config(yaml_file).teachers[0])
    assert [teacher.magnitude(m) for m in (0.5, 1.0, 2.0, 2.5)] == [1.0, 2.0, 2.0, 3.0]


def test_the_shortfall_holds_each_teacher_of_an_ensemble_to_min_valid_share():
    """An ensemble whose API teacher answered 1 call of 1,000 beside a ratings teacher that answered all: every pair
    had a category (the ratings'), so even --min-valid 1.0 exited 0; only a teacher with no valid answer at all was
    named. Now each teacher (and template) of an ensemble is held to min_valid_share; one teacher alone is not."""
    rows = [("api:m", "gap@v1", "ok" if i == 0 else "failed") for i in range(1000)]
    rows += [("ratings", "ratings@v1", "ok")] * 1000
    calls = teacher_calls(rows)
    assert calls == {"api:m": (1, 1000), "ratings": (1000, 1000)}
    assert shortfall(1000, 1000, 0.0, calls) is None  # the default asks only that some pair be annotated
    assert shortfall(1000, 1000, 1.0, calls) == (
        "teacher api:m gave a valid annotation in 1 of 1,000 calls (0.1%), fewer than the 100.0% asked for "
        "(--min-valid, min_valid_share; the other pairs' annotations come from the rest of the ensemble alone)")
    assert shortfall(1000, 1000, 0.001, calls) is None
    alone = teacher_calls(rows[:1000])
    assert alone == {} and shortfall(1000, 1, 0.001, alone) is None  # one teacher: the pairs' share, as before
    templates = teacher_calls([("api:m", "gap@v1", "ok"), ("api:m", "gap-brief@v1", "failed")])
    assert templates == {"api:m with template gap-brief@v1": (0, 1), "api:m with template gap@v1": (1, 1)}


def ratings_call(**pair) -> Call:
    return Call(key="k", pair_id="p", teacher="ratings", template="ratings@v1", swapped=False, pair=pair)


def test_ratings_teacher_rules():
    teacher = RatingsTeacher(RatingsTeacherConfig())
    aspects_c = {"helpfulness": 5.0, "honesty": 5.0, "instruction_following": 5.0, "truthfulness": 5.0}
    aspects_r = {"helpfulness": 4.0, "honesty": 5.0, "instruction_following": 5.0, "truthfulness": 1.0}
    record = teacher.annotate(ratings_call(score_chosen=9.0, score_rejected=3.0, ratings_chosen=aspects_c,
                                           ratings_rejected=aspects_r))
    assert (record.status, record.category, record.magnitude) == ("ok", "factuality", 3.0)
    assert record.confidence == pytest.approx(0.5)  # 2 of 4 aspects agree with the margin
    tie = teacher.annotate(ratings_call(score_chosen=7.0, score_rejected=7.0))
    assert (tie.category, tie.magnitude, tie.confidence) == ("no_clear_gap", 0.0, 1.0)
    flipped = teacher.annotate(ratings_call(score_chosen=4.0, score_rejected=6.5, ratings_chosen=aspects_r,
                                            ratings_rejected=aspects_c))
    assert (flipped.category, flipped.magnitude, flipped.preferred) == ("mislabeled", 2.0, "rejected")
    # An overall score only: the kind of gap is unknown, its size is not (magnitude by the edges 1 and 3).
    for margin, size in ((0.5, 1.0), (1.0, 1.0), (2.5, 2.0), (3.0, 2.0), (3.5, 3.0)):
        overall_only = teacher.annotate(ratings_call(score_chosen=5.0 + margin, score_rejected=5.0))
        assert (overall_only.status, overall_only.category) == ("ok", "unknown")
        assert (overall_only.magnitude, overall_only.confidence) == (size, 1.0)
        assert "only an overall score" in overall_only.rationale
    against = teacher.annotate(ratings_call(score_chosen=8.0, score_rejected=6.0,
                                            ratings_chosen={"helpfulness": 3.0}, ratings_rejected={"helpfulness": 4.0}))
    assert (against.category, against.magnitude, against.confidence) == ("unknown", 2.0, 0.0)
    nothing = teacher.annotate(ratings_call(score_chosen=None, score_rejected=None))
    assert nothing.status == "unknown" and "no ratings" in nothing.reason
    # Equal aspect gaps: the more objective category wins.
    even = teacher.annotate(ratings_call(score_chosen=8.0, score_rejected=6.0,
                                         ratings_chosen={"helpfulness": 5.0, "instruction_following": 5.0},
                                         ratings_rejected={"helpfulness": 3.0, "instruction_following": 3.0}))
    assert even.category == "instruction_following"


def rec(teacher, category, magnitude, confidence, status="ok") -> CallRecord:
    return CallRecord(key=teacher + category, pair_id="p", teacher=teacher, template="t", status=status,
                      category=category, magnitude=magnitude, confidence=confidence, rationale=f"{teacher} says")


def test_aggregation_by_hand():
    one = aggregate_pair("p", [rec("a", "style", 1.0, 0.7)], {"a": 1.0})
    assert (one["category"], one["magnitude"], one["confidence"], one["agreement"]) == ("style", 1.0, 0.7, 1.0)
    records = [rec("a", "factuality", 3.0, 0.9), rec("b", "style", 1.0, 0.6), rec("c", "style", 0.0, 0.5)]
    row = aggregate_pair("p", records, {"a": 1.0, "b": 1.0, "c": 1.0})
    # votes: factuality 0.9, style 1.1 -> style; magnitude (0.9*3 + 0.6*1 + 0.5*0) / 2.0; confidence mean.
    assert row["category"] == "style"
    assert row["magnitude"] == pytest.approx(3.3 / 2.0)
    assert row["confidence"] == pytest.approx(2.0 / 3)
    assert row["agreement"] == pytest.approx(1.1 / 2.0)
    assert row["rationale"] == "b says"
    weighted = aggregate_pair("p", records, {"a": 3.0, "b": 1.0, "c": 1.0})
    assert weighted["category"] == "factuality"
    tie = aggregate_pair("p", [rec("a", "style", 1.0, 0.5), rec("b", "safety", 1.0, 0.5)], {})
    assert tie["category"] == "safety"  # a tie goes to the more objective category
    failed = aggregate_pair("p", [CallRecord(key="k", pair_id="p", teacher="a", template="t", status="failed",
                                             reason="timed out")], {})
    assert failed["category"] is None and failed["reason"] == "timed out" and failed["n_valid"] == 0
    # "unknown" (a gap of known size, unknown kind) votes only when no call names a category.
    named = aggregate_pair("p", [rec("r", "unknown", 3.0, 1.0), rec("a", "style", 1.0, 0.2)], {"r": 5.0})
    assert (named["category"], named["magnitude"], named["n_valid"]) == ("style", 1.0, 2)
    alone = aggregate_pair("p", [rec("r", "unknown", 2.0, 1.0), rec("s", "unknown", 1.0, 1.0)], {})
    assert (alone["category"], alone["magnitude"]) == ("unknown", 1.5)


def test_single_call_passes_through_exactly():
    # (0.844422 * 3) / 0.844422 is 3.0000000000000004 in floating point: outside the schema's magnitude range.
    row = aggregate_pair("p", [rec("a", "safety", 3.0, 0.844422)], {"a": 1.0})
    assert (row["magnitude"], row["confidence"], row["agreement"]) == (3.0, 0.844422, 1.0)
    both = aggregate_pair("p", [rec("a", "safety", 3.0, 0.844422), rec("b", "safety", 3.0, 0.844422)], {})
    assert both["magnitude"] == 3.0


def test_cache_round_trip_and_persistence(tmp_path):
    path = tmp_path / "c.sqlite"
    record = rec("a", "style", 1.0, 0.5)
    with AnswerCache(path) as cache:
        cache.put(record)
    with AnswerCache(path) as cache:
        assert cache.get_many([record.key, "missing"]) == {record.key: record}
        assert cache.count() == 1


def test_a_database_that_is_no_answer_cache_is_refused_untouched(tmp_path):
    """--cache naming another program's SQLite database (or a cache of another format): refused before anything
    is written to it. It ended in a traceback (no such column: key), after adding perpair's tables to it."""
    import sqlite3

    from perpair.errors import PerpairError

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE calls (a INTEGER)")
    held = other.read_bytes()
    with pytest.raises(PerpairError, match=r"other.db: not a perpair answer cache \(its tables are calls\)"):
        AnswerCache(other)
    assert other.read_bytes() == held
    newer = tmp_path / "newer.sqlite"
    AnswerCache(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '2' WHERE name = 'format'")
    with pytest.raises(PerpairError, match="format 2, this perpair reads format 1"):
        AnswerCache(newer)


def test_a_disk_that_fills_is_one_error_naming_the_cache_and_keeps_what_was_committed(tmp_path):
    """A write the disk has no room for (SQLite's bound on the file's pages stands in for a full disk) is one
    error naming the cache, not sqlite3's traceback, and the answers committed before it stay readable."""
    path = tmp_path / "c.sqlite"
    kept = rec("a", "style", 1.0, 0.5)
    with AnswerCache(path) as cache:
        cache.put(kept)
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count = {pages}")
        big = dataclasses.replace(rec("b", "style", 1.0, 0.5), raw_response="x" * 100_000)
        with pytest.raises(PerpairError, match=re.escape(
                f"answer cache {path}: cannot be written (database or disk is full)")):
            cache.put(big)
    with AnswerCache(path) as cache:
        assert cache.get_many([kept.key, big.key]) == {kept.key: kept}


def test_shards_opening_one_new_cache_at_once_all_open_it(tmp_path):
    """Processes opening one new cache at once (shards started together on one machine): every one opens it, each
    sees its tables whole. In about one trial in 20 of eight started together one was refused ("cannot be opened
    (database is locked)": SQLite answers so, without waiting, when two ask to switch the new file to WAL mode at
    once), so 100 trials, each on a new file."""
    import threading

    opened, errors = [], []

    def open_it(path, start):
        start.wait()
        try:
            with AnswerCache(path) as cache:
                opened.append(cache.count())
        except Exception as exc:  # noqa: BLE001 - shown below
            errors.append(exc)

    for trial in range(100):
        start = threading.Barrier(8)
        threads = [threading.Thread(target=open_it, args=(tmp_path / f"shared{trial}.sqlite", start))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == [] and opened == [0] * 800


def test_teacher_specs_and_config(tmp_path):
    assert parse_teacher_spec("ratings") == {"kind": "ratings"}
    assert parse_teacher_spec("local:smollm2") == {"kind": "local", "model": "smollm2"}
    assert parse_teacher_spec("api:http://127.0.0.1:8080/v1/smollm2") == {
        "kind": "api", "base_urls": ["http://127.0.0.1:8080/v1"], "model": "smollm2"}
    # a Hub id as vLLM serves it: the base ended at its first '/' from the right ("…/v1/meta-llama"), every call 404
    assert parse_teacher_spec("api:http://h:8000/v1/meta-llama/Llama-3.1-8B-Instruct") == {
        "kind": "api", "base_urls": ["http://h:8000/v1"], "model": "meta-llama/Llama-3.1-8B-Instruct"}
    assert parse_teacher_spec("api:https://h/openai/deployments/gpt") == {
        "kind": "api", "base_urls": ["https://h/openai/deployments"], "model": "gpt"}
    for bad in ("api:smollm2", "local:", "magic", "api:http://host"):
        with pytest.raises(PerpairError, match="expected"):
            parse_teacher_spec(bad)
    # an infinite weight: the votes' sums inf/inf, NaN magnitudes written, exit 0
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text("teachers:\n  - {kind: ratings, weight: .inf}\n  - {kind: local, model: m}\n")
    with pytest.raises(PerpairError, match="teachers.0.ratings.weight: Input should be a finite number"):
        load_config(yaml_file)
    config = load_config(None, teachers=["api:http://h:1/v1/m", "ratings"], base_urls=["http://h:2/v1"],
                         concurrency=3, templates=["gap", "gap-brief"], limit=5, shard="1/4")
    api = config.teachers[0]
    assert api.base_urls == ["http://h:1/v1", "http://h:2/v1"] and api.concurrency == 3
    assert api.templates == ["gap@v1", "gap-brief@v1"] and config.shard_index == (1, 4) and config.limit == 5
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("teachers:\n  - kind: local\n    model: smollm2\n    templates: [gap]\n")
    with pytest.raises(PerpairError, match="needs a score one"):
        load_config(yaml_file)
    yaml_file.write_text("teachers:\n  - kind: ratings\n  - kind: ratings\n")
    with pytest.raises(PerpairError, match="share the id"):
        load_config(yaml_file)
    yaml_file.write_text("teachers:\n  - kind: ratings\n    colour: red\n")
    with pytest.raises(PerpairError, match="colour"):
        load_config(yaml_file)
    with pytest.raises(PerpairError, match="shard"):
        load_config(None, teachers=["ratings"], shard="4/4")
    # true/false where a number goes (YAML's yes/on too): pydantic would read them as 1 and 0
    for key in ("limit", "min_valid_share"):
        yaml_file.write_text(f"{key}: yes\nteachers: [{{kind: ratings}}]\n")
        with pytest.raises(PerpairError, match=f"{key}: expected a number, got true"):
            load_config(yaml_file)
    with pytest.raises(PerpairError, match="no teacher"):
        load_config(None)


def test_settings_that_would_change_no_annotation_are_refused(tmp_path):
    """A seed with the ratings teacher alone (it reads the data's scores, no responses in an order) and a weight on
    the only teacher (it weighs votes against other teachers'): each was accepted and changed nothing."""
    with pytest.raises(PerpairError, match=r"^invalid annotate settings: seed orders the two responses a teacher "
                                           r"model reads, and the ratings teacher reads none .*; drop it$"):
        load_config(None, teachers=["ratings"], seed=3)
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("teachers:\n  - kind: local\n    model: smollm2\n    weight: 2\n")
    with pytest.raises(PerpairError, match=f"^file {yaml_file}: invalid annotate settings: teachers.0.weight weighs "
                                           "a teacher's votes against the other teachers', and this run has one"):
        load_config(yaml_file)
    # read: a seed where a model reads the responses, a weight beside another teacher
    assert load_config(None, teachers=["ratings", "local:smollm2"], seed=3).seed == 3
    yaml_file.write_text("seed: 2\nteachers:\n  - kind: local\n    model: smollm2\n    weight: 2\n  - kind: ratings\n")
    assert load_config(yaml_file).teachers[0].weight == 2
    assert load_config(None, teachers=["ratings"]).seed == 0
