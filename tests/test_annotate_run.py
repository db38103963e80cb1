"""`perpair annotate` end to end through the CLI against loopback stub endpoints (fast): artifacts and the
plan-stage contract, resume from the cache, byte-identical reruns, shards and merge, validation and
re-asking, structured-output fallback, ensembles, and the API key kept out of every output."""

from __future__ import annotations

import json
import re
import threading

import pyarrow.parquet as pq
import pytest

from conftest import cached_call_keys, run_cli
from llama_server import LoopbackServer, Reply, Request, chat_completion
from perpair.annotate import calls_path, read_annotations
from perpair.artifacts import file_sha256, read_artifact

VALID = {"better": "A", "category": "factuality", "magnitude": 2, "confidence": 0.8, "rationale": "B is wrong"}


class Stub:
    """A chat endpoint whose answers depend on the request; counts requests per call id."""

    def __init__(self, answer=None):
        self.answer = answer or (lambda body, request: json.dumps(VALID))
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = LoopbackServer(self.handle)

    async def handle(self, request: Request) -> Reply:
        with self.lock:
            self.requests.append(request)
        result = self.answer(request.json(), request)
        return result if isinstance(result, Reply) else Reply(body=chat_completion(result))

    def __enter__(self) -> str:
        return self.server.__enter__() + "/v1"

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)


def annotate(pairs, out, *args, check=True, fresh=False):
    return run_cli("annotate", pairs, "-o", out, *args, check=check, fresh=fresh)


def test_api_run_contract_resume_and_identical_rerun(uf_pairs, tmp_path):
    out = tmp_path / "ann.parquet"
    with Stub() as url:
        first = annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "12", "--concurrency", "4")
        table, provenance = read_annotations(out)  # the plan stage's reader accepts it
        assert table.num_rows == 12 and provenance["pairs_sha256"] == file_sha256(uf_pairs)
        calls, calls_provenance = read_artifact(calls_path(out), kind="annotation_calls", schema_version=1)
        assert calls.num_rows == 12 and set(calls.column("status").to_pylist()) == {"ok"}
        assert calls.column("template").to_pylist() == ["gap@v1"] * 12
        assert table.column("pair_id").to_pylist() == sorted(table.column("pair_id").to_pylist())
        # Positions were randomised per pair and mapped back: "A" is the chosen one only when not swapped.
        for swapped, category in zip(calls.column("swapped").to_pylist(), calls.column("category").to_pylist(),
                                     strict=True):
            assert category == ("mislabeled" if swapped else "factuality")
        assert 0 < sum(calls.column("swapped").to_pylist()) < 12
        assert provenance["teachers"][0]["id"] == "api:stub" and "gap@v1" in provenance["templates"]
        assert "12 pairs annotated" in first.stdout
        assert re.search(r"throughput: \d+\.\d\d pairs/s \(12 calls asked this run", first.stdout)
        before = out.read_bytes(), calls_path(out).read_bytes()
    second = Stub()
    with second as url:  # another server, another port: the cache key holds no URL
        rerun = annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "12")
        assert "12 from the cache" in rerun.stdout
        assert "throughput" not in rerun.stdout  # nothing was asked
        assert (out.read_bytes(), calls_path(out).read_bytes()) == before
        assert second.requests == []
        # A larger limit asks only for the new pairs.
        annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "15")
    assert read_annotations(out)[0].num_rows == 15


def test_rerun_sends_no_request_and_shards_merge(uf_pairs, tmp_path):
    stub = Stub()
    with stub as url:
        whole = tmp_path / "whole.parquet"
        annotate(uf_pairs, whole, "--teacher", f"api:{url}/stub", "--limit", "20")
        assert len(stub.requests) == 20
        annotate(uf_pairs, whole, "--teacher", f"api:{url}/stub", "--limit", "20")
        assert len(stub.requests) == 20  # everything came from the cache
        parts = []
        for i in range(3):
            part = tmp_path / f"part{i}.parquet"
            annotate(uf_pairs, part, "--teacher", f"api:{url}/stub", "--limit", "20", "--shard", f"{i}/3")
            parts.append(part)
    merged = tmp_path / "merged.parquet"
    run_cli("annotate", "merge", *parts, "-o", merged)
    whole_table, _ = read_annotations(whole)
    merged_table, provenance = read_annotations(merged)
    assert merged_table.equals(whole_table)
    assert pq.read_table(calls_path(merged)).equals(pq.read_table(calls_path(whole)))
    assert provenance["merged_from"] == ["0/3", "1/3", "2/3"]
    incomplete = run_cli("annotate", "merge", *parts[:2], "-o", tmp_path / "bad.parquet", check=False)
    assert incomplete.returncode == 2 and "not exactly" in incomplete.stderr


def test_shards_that_differ_in_max_reasks_or_prices_merge_and_in_temperature_not(uf_pairs, tmp_path):
    """max_reasks shapes no answer (it left the cache key): a shard re-run with more re-asks to recover its
    failures was refused by merge ("its teachers … differs", pointing at model files); so were other prices."""
    def config(name, url, extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{extra}")
        return path

    with Stub() as url:
        parts = []
        for i, extra in enumerate(("    max_reasks: 2\n", "    max_reasks: 5\n    price_prompt_per_1k: 0.01\n",
                                   "    temperature: 0.7\n")):
            part = tmp_path / f"part{i}.parquet"
            annotate(uf_pairs, part, "--config", config(f"c{i}", url, extra), "--limit", "8", "--shard",
                     f"{min(i, 1)}/2")
            parts.append(part)
    merged = run_cli("annotate", "merge", *parts[:2], "-o", tmp_path / "merged.parquet", check=False)
    assert merged.returncode == 0, merged.stderr
    other = run_cli("annotate", "merge", parts[0], parts[2], "-o", tmp_path / "other.parquet", check=False)
    assert other.returncode == 2 and "its teachers (their settings, or a local teacher's model files) differs" \
        in other.stderr, other.stderr


def test_merge_refuses_a_shard_of_other_columns_or_shard_naming_the_file(uf_pairs, tmp_path):
    """Shards that read but are not what a --shard run writes (a column gone from the annotations or from the calls
    table beside them, a provenance whose shard is not i/n: another program's or edited files) ended `perpair
    annotate merge` in pyarrow's traceback or an IndexError; each is one error naming the file, nothing written."""
    def rewrite(path, edit_table=lambda t: t, edit_header=lambda h: None):
        table = pq.read_table(path)
        metadata = dict(table.schema.metadata)
        header = json.loads(metadata[b"perpair"])
        edit_header(header)
        metadata[b"perpair"] = json.dumps(header).encode()
        pq.write_table(edit_table(table).replace_schema_metadata(metadata), path)

    shards = [tmp_path / f"shard{i}.parquet" for i in range(2)]
    damages = {
        "annotations without category": (shards[1], lambda: rewrite(shards[1], lambda t: t.drop_columns(["category"])),
                                         "field 'category': required column is missing"),
        "calls without pair_id": (calls_path(shards[1]),
                                  lambda: rewrite(calls_path(shards[1]), lambda t: t.drop_columns(["pair_id"])),
                                  "not a calls table: no column 'pair_id' of string values"),
        "a shard not i/n": (shards[1], lambda: rewrite(shards[1], edit_header=lambda h: h["provenance"].update(
            shard="x")), "its provenance's shard 'x' is not i/n"),
    }
    for damage, (file, write, said) in damages.items():
        for i, shard in enumerate(shards):
            annotate(uf_pairs, shard, "--teacher", "ratings", "--shard", f"{i}/2")
        write()
        merged = tmp_path / "merged.parquet"
        result = run_cli("annotate", "merge", *shards, "-o", merged, check=False)
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, (damage, result.stderr)
        assert lines[0].startswith(f"error: file {file}") and said in lines[0], (damage, lines)
        assert not merged.exists() and not calls_path(merged).exists()


def test_invalid_answers_are_reasked_then_recorded_as_failures(uf_pairs, tmp_path):
    def first_invalid(body, request):  # 4 is out of range; the re-ask (more messages) gets a valid answer
        return json.dumps({**VALID, "magnitude": 4}) if len(body["messages"]) <= 2 else json.dumps(VALID)

    with Stub(first_invalid) as url:
        out = tmp_path / "reask.parquet"
        annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "5")
        calls = pq.read_table(calls_path(out)).to_pylist()
        assert all(c["status"] == "ok" and c["reasks"] == 1 and c["attempts"] == 2 for c in calls)

    with Stub(lambda body, request: "I think A is better.") as url:
        out = tmp_path / "never.parquet"
        result = annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "4", check=False)
        assert result.returncode == 3  # no pair got an annotation; the files are written all the same
        calls = pq.read_table(calls_path(out)).to_pylist()
        assert all(c["status"] == "failed" and "invalid answer after 2 re-asks" in c["reason"] for c in calls)
        assert all(c["raw_response"] == "I think A is better." for c in calls)
        table, _ = read_annotations(out)
        assert table.column("category").to_pylist() == [None] * 4 and "failed × 4" in result.stdout


def test_raising_max_reasks_asks_again_only_the_calls_that_ran_out_of_them(uf_pairs, tmp_path):
    """max_reasks was part of an API teacher's cache key: raising it asked every cached answer again (and paid for
    it again), the valid ones too. Now the valid answers stay, the failures for want of re-asks are asked again, and
    answers cached under the keys of before (which held max_reasks) are read, not asked again."""
    import sqlite3

    from perpair.annotate.config import load_config
    from perpair.annotate.teachers import call_key, make_teacher

    def config(url, reasks):
        path = tmp_path / f"teacher{reasks}.yaml"
        path.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n"
                        f"    max_reasks: {reasks}\n    backoff_initial_s: 0.001\n    backoff_max_s: 0.002\n")
        return path

    cache = tmp_path / "answers.sqlite"
    with Stub() as url:  # two pairs answered at once
        annotate(uf_pairs, tmp_path / "a.parquet", "--config", config(url, 2), "--cache", cache, "--limit", "2")
    late = Stub(lambda body, request: json.dumps(VALID if len(body["messages"]) >= 8 else {**VALID, "magnitude": 4}))
    with late as url:  # valid only at the third re-ask: the two new pairs fail with 2
        annotate(uf_pairs, tmp_path / "b.parquet", "--config", config(url, 2), "--cache", cache, "--limit", "4")
        assert len(late.requests) == 2 * 3
        calls = pq.read_table(calls_path(tmp_path / "b.parquet")).to_pylist()
        assert sorted(c["status"] for c in calls) == ["failed", "failed", "ok", "ok"]
        result = annotate(uf_pairs, tmp_path / "c.parquet", "--config", config(url, 3), "--cache", cache,
                          "--limit", "4")
        assert len(late.requests) == 2 * 3 + 2 * 4, result.stdout  # the two failures asked again, 1 + 3 each
        assert "2 cached failures asked again" in result.stdout
    calls = pq.read_table(calls_path(tmp_path / "c.parquet")).to_pylist()
    assert sorted((c["status"], c["reasks"]) for c in calls) == [("ok", 0), ("ok", 0), ("ok", 3), ("ok", 3)]

    # a cache written before max_reasks left the key, by a run with max_reasks 2: its answers are read under today's
    # keys by a run with 3 (the legacy key was looked up with the run's own max_reasks: every answer paid again)
    [teacher] = [make_teacher(t) for t in load_config(config(url, 3)).teachers]
    assert teacher.legacy_fingerprints[2] == {"model": "stub", "temperature": 0.0, "max_tokens": 256, "seed": None,
                                              "max_reasks": 2, "max_chars": teacher.config.max_chars}
    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT key, pair_id, template FROM calls").fetchall()
        for key, pair_id, template in rows:
            db.execute("UPDATE calls SET key = ? WHERE key = ?",
                       (call_key(pair_id, teacher.id, teacher.legacy_fingerprints[2], template, 0), key))
    never = Stub(lambda body, request: "no")
    with never as url:
        annotate(uf_pairs, tmp_path / "d.parquet", "--config", config(url, 3), "--cache", cache, "--limit", "4")
    assert never.requests == []
    assert pq.read_table(calls_path(tmp_path / "d.parquet")).to_pylist() == calls


def test_structured_output_falls_back_when_the_server_rejects_a_form(uf_pairs, tmp_path):
    seen_formats = []

    def picky(body, request):
        form = body.get("response_format")
        seen_formats.append(form and form["type"])
        if form and form["type"] == "json_schema":
            return Reply(400, b'{"error": "response_format json_schema is not supported"}')
        return json.dumps(VALID)

    with Stub(picky) as url:
        out = tmp_path / "fallback.parquet"
        annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "8", "--concurrency", "2")
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert {c["status"] for c in calls} == {"ok"}
    # A rejected form is not the call's attempt: rows do not depend on which calls came first in a run.
    assert {c["attempts"] for c in calls} == {1}
    assert seen_formats.count("json_schema") <= 2 and seen_formats[-1] == "json_object"


def test_ensemble_of_teachers_and_templates(uf_pairs, tmp_path):
    with Stub() as url:
        out = tmp_path / "ensemble.parquet"
        config = tmp_path / "ensemble.yaml"
        config.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n"
                          "    templates: [gap, gap-brief]\n  - kind: ratings\n    weight: 0.5\n")
        run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "10")
    calls = pq.read_table(calls_path(out))
    assert calls.num_rows == 30
    assert sorted(set(calls.column("template").to_pylist())) == ["gap-brief@v1", "gap@v1", "ratings@v1"]
    table, provenance = read_annotations(out)
    assert table.num_rows == 10 and set(table.column("n_calls").to_pylist()) == {3}
    assert all(0 < a <= 1 for a in table.column("agreement").to_pylist())
    assert [t["id"] for t in provenance["teachers"]] == ["api:stub", "ratings"]


def test_api_key_never_leaves_the_environment(uf_pairs, tmp_path, monkeypatch):
    secret = "sk-perpair-test-SECRET-4c1d9e"
    monkeypatch.setenv("PERPAIR_TEST_API_KEY", secret)

    def half_refused(body, request):  # refuses half the calls, echoing the key back as some servers do
        if request.headers.get("x-client-request-id", "0")[-1] in "02468ace":
            return Reply(401, json.dumps({"error": f"bad key {request.headers['authorization']}"}).encode())
        assert request.headers["authorization"] == f"Bearer {secret}"
        return json.dumps(VALID)

    with Stub(half_refused) as url:
        out = tmp_path / "secret.parquet"
        config = tmp_path / "secret.yaml"
        config.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n"
                          "    api_key_env: PERPAIR_TEST_API_KEY\n")
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "10", "-v")
    statuses = {c["status"] for c in pq.read_table(calls_path(out)).to_pylist()}
    assert statuses == {"ok", "failed"}  # both paths ran
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr
    assert "***" in (result.stdout + result.stderr + pq.read_table(calls_path(out)).to_pandas().to_string())


def test_missing_key_variable_is_a_clean_error(uf_pairs, tmp_path):
    config = tmp_path / "nokey.yaml"
    config.write_text("teachers:\n  - kind: api\n    model: m\n    base_urls: [http://127.0.0.1:1/v1]\n"
                      "    api_key_env: PERPAIR_SURELY_UNSET_VAR\n")
    result = run_cli("annotate", uf_pairs, "-o", tmp_path / "x.parquet", "--config", config, check=False)
    assert result.returncode == 2 and "PERPAIR_SURELY_UNSET_VAR is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_ratings_teacher_on_raw_and_binarized_data(uf_pairs, tmp_path):
    from conftest import FIXTURES

    raw_pairs = tmp_path / "raw.parquet"
    run_cli("prepare", FIXTURES / "ultrafeedback_raw.jsonl", "-o", raw_pairs)
    out = tmp_path / "raw_ann.parquet"
    annotate(raw_pairs, out, "--teacher", "ratings")
    table, _ = read_annotations(out)
    assert None not in table.column("category").to_pylist()
    binarized = tmp_path / "bin_ann.parquet"
    annotate(uf_pairs, binarized, "--teacher", "ratings")
    table, provenance = read_annotations(binarized)
    categories = table.column("category").to_pylist()
    # Overall scores only: ties are no_clear_gap, every other pair a gap of known size and unknown kind.
    assert len(categories) == 994 and set(categories) == {"unknown", "no_clear_gap"}
    assert categories.count("no_clear_gap") + categories.count("unknown") == provenance["counts"]["ok"]
    assert categories.count("unknown") == 884  # the count of pairs the old rule left unannotated


def test_ratings_answers_are_not_reused_for_the_same_texts_with_other_scores(tmp_path):
    """The pair id hashes the texts only: the ratings teacher's cache key holds the scores it read, so the same
    texts prepared again with other scores are annotated from the new scores (they got the old answers)."""
    from plan_helpers import make_pairs

    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    ids = make_pairs(first, [(8.0, 3.0), (8.0, 3.0)])
    assert make_pairs(second, [(8.0, 8.0), (8.0, 7.5)]) == ids  # the same texts: the same pair ids
    out = tmp_path / "ann.parquet"
    annotate(first, out, "--teacher", "ratings")
    assert read_annotations(out)[0].column("magnitude").to_pylist() == [3.0, 3.0]
    rerun = annotate(second, out, "--teacher", "ratings")  # the same -o, so the same answer cache
    assert "0 from the cache" in rerun.stdout
    table, provenance = read_annotations(out)
    by_id = dict(zip(table.column("pair_id").to_pylist(), table.select(["category", "magnitude"]).to_pylist(),
                     strict=True))
    assert by_id[ids[0]] == {"category": "no_clear_gap", "magnitude": 0.0}  # a tie now
    assert by_id[ids[1]] == {"category": "unknown", "magnitude": 1.0}
    assert provenance["pairs_sha256"] == file_sha256(second)
    assert "2 from the cache" in annotate(second, out, "--teacher", "ratings").stdout  # unchanged: reused


@pytest.mark.parametrize("spec", ["api:notaurl", "local:"])
def test_bad_teacher_spec(uf_pairs, tmp_path, spec):
    result = annotate(uf_pairs, tmp_path / "x.parquet", "--teacher", spec, check=False)
    assert result.returncode == 2 and "expected 'ratings'" in result.stderr


def test_sigkill_mid_run_keeps_every_answer_and_the_rerun_asks_only_the_rest(uf_pairs, tmp_path):
    """A run killed with SIGKILL while answers arrive: every answer it committed stays in the cache, the re-run
    asks only the calls the cache lacks (each at least once), and the files equal an uninterrupted run's. On a
    loopback stub, so it runs everywhere (test_annotate_server.py does the same against llama.cpp, when installed)."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import time

    asked: list[str] = []

    async def slow(request: Request) -> Reply:  # 20 ms an answer, 4 in flight: the kill lands mid-run
        asked.append(request.headers.get("x-client-request-id", ""))
        await asyncio.sleep(0.02)
        return Reply(body=chat_completion(json.dumps(VALID)))

    out, cache = tmp_path / "killed.parquet", tmp_path / "killed.sqlite"
    with LoopbackServer(slow) as url:
        args = ["annotate", str(uf_pairs), "-o", str(out), "--cache", str(cache), "--teacher", f"api:{url}/v1/stub",
                "--limit", "60", "--concurrency", "4"]
        process = subprocess.Popen([sys.executable, "-m", "perpair", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(cached_call_keys(cache)) < 20 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before the kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(0.2)
        kept = cached_call_keys(cache)
        assert 20 <= len(kept) < 60 and not out.exists()
        mark = len(asked)
        annotate(uf_pairs, out, "--cache", cache, "--teacher", f"api:{url}/v1/stub", "--limit", "60")
        rerun = asked[mark:]
        reference = tmp_path / "ref" / "uninterrupted.parquet"
        annotate(uf_pairs, reference, "--teacher", f"api:{url}/v1/stub", "--limit", "60")
    calls = pq.read_table(calls_path(out)).to_pylist()
    keys = {c["key"] for c in calls}
    assert len(keys) == 60 and all(c["status"] == "ok" for c in calls)
    assert not kept & set(rerun) and set(rerun) == keys - kept and len(rerun) == 60 - len(kept)
    assert out.read_bytes() == reference.read_bytes()
    assert calls_path(out).read_bytes() == calls_path(reference).read_bytes()


def test_answers_arriving_out_of_order_stay_with_their_pairs(uf_pairs, tmp_path):
    """Under concurrency, answers come back in another order than asked (random delays here): each call's row
    holds the answer to its own pair, not a neighbour's. The stub names a category from the response texts it
    was shown, so a row's category says which pair's request it answered."""
    import asyncio
    import hashlib
    import random

    from perpair.annotate.templates import GAP_CATEGORIES, get_template
    from perpair.data import read_pairs

    rng = random.Random(3)

    def category_of(user: str) -> str:
        return GAP_CATEGORIES[hashlib.sha256(user.encode()).digest()[0] % len(GAP_CATEGORIES)]

    async def shuffled(request: Request) -> Reply:
        await asyncio.sleep(rng.uniform(0, 0.03))
        user = request.json()["messages"][-1]["content"]
        return Reply(body=chat_completion(json.dumps({**VALID, "category": category_of(user)})))

    out = tmp_path / "ann.parquet"
    with LoopbackServer(shuffled) as url:
        annotate(uf_pairs, out, "--teacher", f"api:{url}/v1/stub", "--limit", "40", "--concurrency", "8")
    pairs = {p["pair_id"]: p for p in read_pairs(str(uf_pairs))[0].slice(0, 40).to_pylist()}
    template = get_template("gap@v1")
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert len(calls) == 40 and len({c["gap_category"] for c in calls}) > 1
    for call in calls:
        user = template.render(pairs[call["pair_id"]], call["swapped"])[-1]["content"]
        assert call["gap_category"] == category_of(user)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_call_refused_in_every_form_does_not_turn_structured_output_off(uf_pairs, tmp_path, concurrency):
    """A 400 that is not about the output form (one pair's prompt past the server's context, here the first pair
    asked) is refused in every form: that call fails, and the teacher goes back to the form it started from. It
    used to stay at plain text for the whole run (no schema sent with any later request), recorded nowhere."""
    long_prompt = {}
    forms = []

    def context_limited(body, request):
        call = request.headers.get("x-client-request-id")
        long_prompt.setdefault("id", call)  # the first call asked is the "too long" one
        form = body.get("response_format")
        if call == long_prompt["id"]:
            return Reply(400, b'{"error": "the request exceeds the available context size"}')
        forms.append(form and form["type"])
        return json.dumps(VALID)

    with Stub(context_limited) as url:
        out = tmp_path / "ann.parquet"
        annotate(uf_pairs, out, "--teacher", f"api:{url}/stub", "--limit", "6", "--concurrency", str(concurrency))
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert sorted(c["status"] for c in calls) == ["failed", "ok", "ok", "ok", "ok", "ok"]
    if concurrency == 1:
        assert forms == ["json_schema"] * 5
    else:  # a call in flight beside the refused one may have been asked in the next form meanwhile
        assert forms[-3:] == ["json_schema"] * 3 and forms.count("json_schema") >= 4
