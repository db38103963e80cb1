"""`perpair annotate` at its borders, through the CLI against loopback stubs: exit codes that tell the truth
(too few valid annotations is exit 3 with the files written), attempt counts, re-asking cached failures, the
API-key hints, and bad teachers, shards and output paths refused before anything is written."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HH_TEST, run_cli
from llama_server import Reply, chat_completion
from perpair.annotate import calls_path, read_annotations
from perpair.artifacts import read_artifact, write_artifact
from perpair.data.schema import KIND as PAIRS_KIND
from perpair.data.schema import SCHEMA_VERSION as PAIRS_VERSION
from test_annotate_run import VALID, Stub, annotate

FAST = "    backoff_initial_s: 0.001\n    backoff_max_s: 0.002\n"


def api_config(tmp_path, url, extra=""):
    path = tmp_path / "teacher.yaml"
    path.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{FAST}{extra}")
    return path


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def even_call(request) -> bool:
    return request.headers.get("x-client-request-id", "0")[-1] in "02468ace"


def test_all_failed_exits_3_with_the_files_written(uf_pairs, tmp_path):
    out = tmp_path / "dead.parquet"
    with Stub(lambda body, request: Reply(404, b'{"error": "no such model"}')) as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url), "--limit", "6",
                         check=False)
    assert result.returncode == 3, result.stderr
    assert len(error_lines(result)) == 1 and "no pair of 6 got a valid annotation" in result.stderr
    assert "Traceback" not in result.stderr
    assert "failed × 6: request failed: HTTP 404" in result.stdout
    assert "re-run with --retry-failed" in result.stdout
    assert "--retry-failed asks them again" in error_lines(result)[0]
    table, _ = read_annotations(out)  # nothing lost: both artifacts are there, every call recorded
    assert table.num_rows == 6 and pq.read_table(calls_path(out)).num_rows == 6


def test_no_annotation_that_asking_again_cannot_change_is_not_sent_to_retry_failed(tmp_path):
    """HH-RLHF pairs have no ratings: the ratings teacher answers none of them. Its error line said "--retry-failed
    asks them again", which asks nothing (no call failed) and could change nothing; it now names the reason."""
    pairs = tmp_path / "hh.parquet"
    run_cli("prepare", HH_TEST, "-o", pairs, "--limit", "5")
    result = run_cli("annotate", pairs, "--teacher", "ratings", "-o", tmp_path / "ann.parquet", check=False)
    assert result.returncode == 3
    [line] = error_lines(result)
    assert line == ("error: no pair of 5 got a valid annotation; the files were written; 5 calls got no annotation "
                    "(the pair has no ratings), which asking again does not change")


def test_min_valid_share_decides_the_exit_code(uf_pairs, tmp_path):
    def half(body, request):
        return Reply(404, b'{"error": "nope"}') if even_call(request) else json.dumps(VALID)

    with Stub(half) as url:
        config = api_config(tmp_path, url)
        out = tmp_path / "half.parquet"
        default = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20", check=False)
        failed = pq.read_table(calls_path(out)).column("status").to_pylist().count("failed")
        assert 0 < failed < 20
        # The default reports the failures and succeeds: some pairs were annotated.
        assert default.returncode == 0 and f"{failed} calls failed" in default.stdout
        assert f"{20 - failed} pairs annotated" in default.stdout
        strict = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20", "--min-valid", "1.0",
                         check=False)
        assert strict.returncode == 3 and f"{20 - failed} of 20 pairs" in strict.stderr
        assert "fewer than the 100.0% asked for" in strict.stderr
        low = (20 - failed) / 20
        assert run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20", "--min-valid",
                       str(low), check=False).returncode == 0
        config.write_text(config.read_text() + "min_valid_share: 1.0\n")  # the same from the config file
        assert run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20",
                       check=False).returncode == 3
    bad = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--min-valid", "1.5", check=False)
    assert bad.returncode == 2 and "min_valid_share" in bad.stderr


def test_attempt_counts_are_the_attempts_made(uf_pairs, tmp_path):
    stub = Stub(lambda body, request: Reply(503, b'{"error": "busy"}'))
    with stub as url:  # structured 'auto' probes the first form with the teacher's own retries
        out = tmp_path / "busy.parquet"
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url, "    max_retries: 5\n"),
                         "--limit", "1", check=False)
    assert result.returncode == 3
    (call,) = pq.read_table(calls_path(out)).to_pylist()
    assert len(stub.requests) == 6 and call["attempts"] == 6
    assert "(gave up after 6 attempts)" in call["reason"] and "gave up after 1 attempts" not in result.stdout


def test_retry_failed_asks_cached_failures_again(uf_pairs, tmp_path):
    out = tmp_path / "retry.parquet"
    with Stub(lambda body, request: Reply(404, b'{"error": "not yet"}')) as url:
        assert annotate(uf_pairs, out, "--config", api_config(tmp_path, url), "--limit", "5",
                        check=False).returncode == 3
    good = Stub()
    with good as url:
        config = api_config(tmp_path, url)
        cached = annotate(uf_pairs, out, "--config", config, "--limit", "5", check=False)
        assert cached.returncode == 3 and good.requests == []  # failures are cached: nothing asked
        assert "re-run with --retry-failed" in cached.stdout
        retried = annotate(uf_pairs, out, "--config", config, "--limit", "5", "--retry-failed")
        assert len(good.requests) == 5 and "(5 cached failures asked again)" in retried.stdout
    table, _ = read_annotations(out)
    assert None not in table.column("category").to_pylist()


def test_401_names_the_key_variable_or_says_none_is_sent(uf_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("PERPAIR_TEST_KEY", "sk-wrong")
    with Stub(lambda body, request: Reply(401, b'{"error": "invalid api key"}')) as url:
        keyed = annotate(uf_pairs, tmp_path / "k.parquet", "--teacher", f"api:{url}/stub", "--api-key-env",
                         "PERPAIR_TEST_KEY", "--limit", "1", check=False)
        bare = annotate(uf_pairs, tmp_path / "b.parquet", "--teacher", f"api:{url}/stub", "--limit", "1",
                        check=False)
    assert keyed.returncode == 3 and "environment variable PERPAIR_TEST_KEY" in keyed.stdout
    assert "sends no API key" not in keyed.stderr
    assert bare.returncode == 3 and "no API key was sent" in bare.stdout and "api_key_env" in bare.stdout
    assert "note: teacher api:stub sends no API key" in bare.stderr


def test_missing_local_model_leaves_nothing_behind(uf_pairs, tmp_path):
    for spec in ("local:/nonexistent", f"local:{tmp_path}"):  # no folder; a folder that is not a model
        out = tmp_path / "local.parquet"
        result = annotate(uf_pairs, out, "--teacher", spec, "--limit", "2", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(error_lines(result)) == 1 and "teacher local:" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "no cache or artifact may be left"
    assert "model /nonexistent: no such folder, and not a Hub id" in annotate(
        uf_pairs, tmp_path / "x.parquet", "--teacher", "local:/nonexistent", check=False).stderr


def test_non_hex_pair_id_with_shard_is_an_error(uf_pairs, tmp_path):
    table, provenance = read_artifact(uf_pairs, kind=PAIRS_KIND, schema_version=PAIRS_VERSION)
    ids = table.column("pair_id").to_pylist()
    ids[2] = "pair-three"
    pairs = tmp_path / "named.parquet"
    write_artifact(pairs, table.set_column(0, "pair_id", pa.array(ids, pa.string())), kind=PAIRS_KIND,
                   schema_version=PAIRS_VERSION, provenance=provenance)
    out = tmp_path / "out" / "ann.parquet"
    result = annotate(pairs, out, "--teacher", "ratings", "--shard", "0/2", "--limit", "5", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"file {pairs}, row 3, field 'pair_id': pair_id 'pair-three' is not hexadecimal" in result.stderr
    assert not out.parent.exists()
    assert annotate(pairs, out, "--teacher", "ratings", "--limit", "5").returncode == 0  # no shard: fine


def test_output_equal_to_the_input_is_refused(uf_pairs, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(uf_pairs.read_bytes())
    before = pairs.read_bytes()
    for out in (pairs, tmp_path / "." / "pairs.parquet"):
        result = annotate(pairs, out, "--teacher", "ratings", check=False)
        assert result.returncode == 2 and "would overwrite the input" in result.stderr
    assert pairs.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]
    shard = tmp_path / "s.parquet"
    merged = run_cli("annotate", "merge", shard, "-o", shard, check=False)
    assert merged.returncode == 2 and "would overwrite the input" in merged.stderr


def test_ratings_teacher_summary_on_overall_scores_only(uf_pairs, tmp_path):
    result = annotate(uf_pairs, tmp_path / "r.parquet", "--teacher", "ratings")
    assert "884 pairs have no per-aspect ratings" in result.stdout and "teacher LLM" in result.stdout


def test_local_teacher_prints_no_dependency_noise(uf_pairs, tmp_path):
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    # a fresh process: in this one, libraries' once-per-process notices may have been shown already
    result = annotate(uf_pairs, tmp_path / "local.parquet", "--teacher", f"local:{model}", "--limit", "2",
                      fresh=True)
    assert result.stderr == ""  # no transformers progress bars, notices or FutureWarnings (stderr is piped)
    assert "2 pairs annotated" in result.stdout


def test_ratings_without_any_score_exit_3_and_say_why(tmp_path):
    from plan_helpers import make_pairs

    pairs = tmp_path / "unscored.parquet"
    make_pairs(pairs, [(None, None)] * 3 + [(7.0, 5.0)])
    result = annotate(pairs, tmp_path / "a.parquet", "--teacher", "ratings", check=False)
    assert result.returncode == 0 and "no annotation × 3: the pair has no ratings" in result.stdout
    make_pairs(pairs, [(None, None)] * 3)
    result = annotate(pairs, tmp_path / "b.parquet", "--teacher", "ratings", check=False)
    assert result.returncode == 3 and "no annotation × 3: the pair has no ratings" in result.stdout
    assert "no pair of 3 got a valid annotation" in result.stderr


def _refused(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def _small_pairs(tmp_path):
    from plan_helpers import make_pairs

    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0), (5.0, 4.0)])
    return pairs


def test_output_paths_that_cannot_be_written_leave_nothing_behind(tmp_path, monkeypatch):
    """-o '' / -o . used to end in a traceback, -o FOLDER in an error naming perpair's temporary file and a
    FOLDER.cache.sqlite left behind; merge -o the same. Each is one error line now, before the cache exists."""
    pairs = _small_pairs(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "a file").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, says in ((("-o", ""), "-o/--output: an empty path"), (("-o", "."), "-o/--output .: a folder"),
                       (("-o", "d"), "-o/--output d: a folder; name a file"),
                       (("-o", "a file/ann.parquet"), "is a file, not a folder"),
                       (("-o", "ann.parquet", "--cache", ""), "--cache: an empty path"),
                       (("-o", "ann.parquet", "--cache", "d"), "--cache d: a folder")):
        assert says in _refused(run_cli("annotate", pairs, "--teacher", "ratings", *args, check=False))
    for output in ("", ".", "d"):
        assert "-o/--output" in _refused(run_cli("annotate", "merge", "x.parquet", "-o", output, check=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list((tmp_path / "d").iterdir()) == []


def test_an_answer_cache_that_cannot_be_opened_is_one_error_line(tmp_path, monkeypatch):
    """SQLite refusing the cache (a folder that cannot be written: `unable to open database file`) used to be a
    traceback."""
    import sqlite3

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", refuse)
    out = tmp_path / "ann.parquet"
    line = _refused(annotate(_small_pairs(tmp_path), out, "--teacher", "ratings", check=False))
    assert f"answer cache {tmp_path / 'ann.cache.sqlite'}: cannot be opened (unable to open database file)" in line
    assert not out.exists()


def test_a_model_folder_without_weights_leaves_no_cache(tmp_path):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "model", layers=1)
    (folder / "model.safetensors").unlink()
    out = tmp_path / "out" / "x.parquet"
    line = _refused(annotate(_small_pairs(tmp_path), out, "--teacher", f"local:{folder}", check=False))
    assert f"teacher local:{folder}: model {folder}: the folder holds no weights" in line
    assert not out.parent.exists(), "no cache or artifact may be left"


def test_api_teacher_options_are_checked_whatever_the_teachers(tmp_path):
    """--concurrency 0 is refused with a ratings teacher too (it used to pass: the value went nowhere), and the
    options only API teachers read are refused where there is none."""
    pairs = _small_pairs(tmp_path)
    out = tmp_path / "out" / "ann.parquet"
    line = _refused(annotate(pairs, out, "--teacher", "ratings", "--concurrency", "0", check=False))
    assert "--concurrency 0" in line and "(from the command line)" in line
    line = _refused(annotate(pairs, out, "--teacher", "ratings", "--concurrency", "4", "--api-key-env", "KEY",
                             check=False))
    assert "--concurrency, --api-key-env set the API teachers; this run has none (ratings)" in line
    assert not out.parent.exists()


def test_teachers_given_on_the_command_line_replace_the_configs_with_a_note(tmp_path):
    """--teacher and a --config that lists teachers: the command line's replace the file's (overrides win), and the
    run says so instead of dropping the file's silently."""
    pairs = _small_pairs(tmp_path)
    config = tmp_path / "teachers.yaml"
    config.write_text("teachers:\n  - kind: ratings\n  - kind: ratings\n    name: second\n")
    result = annotate(pairs, tmp_path / "ann.parquet", "--config", config, "--teacher", "ratings", check=False)
    assert f"note: --teacher replaces the 2 teacher(s) of {config}" in " ".join(result.stderr.split())
    assert len(read_annotations(tmp_path / "ann.parquet")[1]["teachers"]) == 1


def _completion(**changes) -> Reply:
    body = json.loads(chat_completion(json.dumps(VALID)))
    for path, value in changes.items():
        node = body
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return Reply(body=json.dumps(body).encode())


@pytest.mark.parametrize(("changes", "reason"), [
    ({"choices.0.message.content": [{"type": "text", "text": json.dumps(VALID)}]},
     "choices[0].message.content is not a string (list)"),
    ({"choices.0.message.content": 5}, "choices[0].message.content is not a string (int)"),
    ({"choices.0.message": "hello"}, "choices[0].message is not an object (str)"),
    ({"usage": [1, 2]}, "usage is not an object (list)"),
    ({"usage.prompt_tokens": "abc"}, "usage.prompt_tokens is 'abc', not a whole number of tokens"),
    ({"usage.completion_tokens": -5}, "usage.completion_tokens is -5, not a whole number of tokens"),
])
def test_a_malformed_answer_body_is_a_failed_call_not_the_runs_end(uf_pairs, tmp_path, changes, reason):
    """A 200 answer whose message, content or usage is not of the chat-completion form is retried and then
    recorded as a failed call with the reason: it used to end the whole run in a traceback (exit 1), losing the
    calls in flight, or to count negative tokens."""
    out = tmp_path / "ann.parquet"
    with Stub(lambda body, request: _completion(**changes)) as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config",
                         api_config(tmp_path, url, "    max_retries: 1\n"), "--limit", "2", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert [c["status"] for c in calls] == ["failed", "failed"]
    assert all(c["reason"] == f"request failed: malformed response body ({reason}) (gave up after 2 attempts)"
               and c["prompt_tokens"] == 0 for c in calls)
    good = _completion(**{"usage.prompt_tokens": 7.0})  # a whole number written as a float is a count
    with Stub(lambda body, request: good) as url:
        run_cli("annotate", uf_pairs, "-o", tmp_path / "good.parquet", "--config", api_config(tmp_path, url),
                "--limit", "1")
    assert pq.read_table(calls_path(tmp_path / "good.parquet")).column("prompt_tokens").to_pylist() == [7]


def test_a_reply_nested_too_deeply_is_reasked_not_blamed_on_the_input(uf_pairs, tmp_path):
    """A reply whose JSON nests deeper than Python's parser goes: an invalid answer (re-asked, then a failed call),
    not 'error: the input is nested too deeply to read' ending the run with exit 2."""
    deep = '{"better": ' + "[" * 100_000 + "]" * 100_000 + "}"
    out = tmp_path / "ann.parquet"
    with Stub(lambda body, request: deep) as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url), "--limit", "1",
                         check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    (call,) = pq.read_table(calls_path(out)).to_pylist()
    assert call["reason"] == "invalid answer after 2 re-asks: the JSON object is nested too deeply"


def test_an_ensemble_teacher_with_no_valid_answer_exits_3(uf_pairs, tmp_path):
    """An API teacher refused on every call beside a ratings teacher: every pair still has a category (the ratings'),
    which passed as the ensemble's with exit 0. Exit 3 names the teacher; the files are written."""
    def config(url):
        path = tmp_path / "ensemble.yaml"
        path.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{FAST}  - kind: ratings\n")
        return path

    out = tmp_path / "ann.parquet"
    with Stub(lambda body, request: Reply(401, b'{"error": "bad key"}')) as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", config(url), "--limit", "5", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "teacher api:stub gave no valid annotation in 5 calls" in line
    assert read_annotations(out)[0].num_rows == 5 and "5 pairs annotated" in result.stdout
    with Stub() as url:  # the same ensemble answering: exit 0
        assert run_cli("annotate", uf_pairs, "-o", tmp_path / "ok.parquet", "--config", config(url), "--limit",
                       "5").returncode == 0


def test_a_pairs_file_holding_a_pair_twice_is_refused_before_anything_is_written(tmp_path):
    """Two rows with one pair_id (pairs files joined by hand): refused naming both rows, where annotate wrote
    annotations holding the pair twice, which the plan stage then refused as 'annotated twice'."""
    pairs = _small_pairs(tmp_path)
    table, provenance = read_artifact(pairs, kind=PAIRS_KIND, schema_version=PAIRS_VERSION)
    doubled = tmp_path / "doubled.parquet"
    write_artifact(doubled, pa.concat_tables([table, table.slice(0, 1)]), kind=PAIRS_KIND,
                   schema_version=PAIRS_VERSION, provenance=provenance)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("annotate", doubled, "--teacher", "ratings", "-o", tmp_path / "ann.parquet", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    pair_id = table.column("pair_id")[0].as_py()
    assert line == (f"error: file {doubled}, row 3, field 'pair_id': pair {pair_id} appears twice (rows 1 and 3); "
                    "annotations need unique pair ids (perpair prepare keeps the first of identical pairs)")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_cache_named_as_an_output_is_refused(tmp_path):
    """--cache naming -o (or its calls table): the artifact replaced the SQLite cache at the end of the run, so
    every answer the run paid for was gone from it, exit 0, and the next run could not open its cache."""
    pairs = _small_pairs(tmp_path)
    out = tmp_path / "ann.parquet"
    before = sorted(p.name for p in tmp_path.iterdir())
    for cache, name in ((out, "-o/--output"), (tmp_path / "ann.calls.parquet", "calls table of -o/--output")):
        result = run_cli("annotate", pairs, "--teacher", "ratings", "-o", out, "--cache", cache, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        (line,) = error_lines(result)
        assert line.startswith(f"error: --cache {cache} is the {name}: writing it would destroy the answer cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_answer_cache_named_as_an_output_is_refused_untouched(tmp_path):
    """-o naming an existing answer cache (`-o ann.cache.sqlite`, the name completion offers beside ann.parquet) of
    `perpair annotate`, `annotate merge` or `plan`: the artifact replaced the database, every answer paid for gone,
    exit 0. Refused before anything is written; the cache still answers."""
    pairs = _small_pairs(tmp_path)
    shards = [tmp_path / f"ann.{i}.parquet" for i in range(2)]
    for i, shard in enumerate(shards):
        run_cli("annotate", pairs, "--teacher", "ratings", "--shard", f"{i}/2", "-o", shard)
    cache = tmp_path / "ann.0.cache.sqlite"
    held = cache.read_bytes()
    for command in (("annotate", pairs, "--teacher", "ratings"), ("annotate", "merge", *shards),
                    ("plan", pairs, "--preset", "dpo")):
        result = run_cli(*command, "-o", cache, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr)
        (line,) = error_lines(result)
        assert line.startswith(f"error: -o/--output {cache}: an SQLite database"), line
        assert cache.read_bytes() == held
    assert not (tmp_path / "ann.0.cache.sqlite.calls.parquet").exists()
    assert not (tmp_path / "ann.0.cache_report").exists()
    again = run_cli("annotate", pairs, "--teacher", "ratings", "--shard", "0/2", "-o", shards[0])
    assert "0 from the cache" not in again.stdout and " from the cache" in again.stdout


def test_a_teachers_refusal_is_recorded_as_such_not_reasked_as_empty(uf_pairs, tmp_path):
    """OpenAI's structured outputs answer a refusal as message.refusal with null content: it was re-asked twice as
    "the answer is empty" (three paid calls) and recorded as that, the refusal's words nowhere. Now one call, failed
    with the refusal as its reason and raw response."""
    words = "I'm sorry, I can't help with that."

    def refuse(body, request):
        message = {"role": "assistant", "content": None, "refusal": words}
        return Reply(body=json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode())

    out = tmp_path / "refused.parquet"
    stub = Stub(refuse)
    with stub as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url), "--limit", "3",
                         check=False)
    assert result.returncode == 3 and len(stub.requests) == 3, result.stdout
    assert f"failed × 3: the teacher refused: {words}" in result.stdout
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert {(c["status"], c["raw_response"], c["reasks"]) for c in calls} == {("failed", words, 0)}


def test_an_ensemble_template_with_no_valid_answer_exits_3(uf_pairs, tmp_path):
    """An ensemble over templates (--template gap --template gap-brief) in which one template's answers are never
    valid: every pair still had a category (the other template's), which passed as the ensemble's with exit 0, as a
    silent teacher beside another did before it was exit 3. Exit 3 names the teacher and template."""
    def brief_invalid(body, request):  # gap-brief's system prompt; its answers out of range
        brief = "strict grader" in body["messages"][0]["content"]
        return json.dumps({**VALID, "magnitude": 7} if brief else VALID)

    out = tmp_path / "ann.parquet"
    with Stub(brief_invalid) as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url), "--template", "gap",
                         "--template", "gap-brief", "--limit", "4", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stdout
    (line,) = error_lines(result)
    assert "teacher api:stub with template gap-brief@v1 gave no valid annotation in 4 calls" in line
    assert "gap@v1" not in line and read_annotations(out)[0].num_rows == 4
    with Stub() as url:  # both templates answering: exit 0
        assert run_cli("annotate", uf_pairs, "-o", tmp_path / "ok.parquet", "--config", api_config(tmp_path, url),
                       "--template", "gap", "--template", "gap-brief", "--limit", "4").returncode == 0


def test_an_answer_cut_at_max_tokens_is_never_ok(uf_pairs, tmp_path):
    """A reply the server says was cut (finish_reason "length") passed as ok wherever what it held parsed (a draft
    before the answer it never finished, say). Now it is re-asked, then a failed call saying it was cut."""
    out = tmp_path / "cut.parquet"
    stub = Stub(lambda body, request: _completion(**{"choices.0.finish_reason": "length"}))
    with stub as url:
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", api_config(tmp_path, url), "--limit", "2",
                         check=False)
    assert result.returncode == 3 and len(stub.requests) == 6, result.stdout  # each call asked 1 + 2 re-asks
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert {(c["status"], c["reason"]) for c in calls} == {
        ("failed", "invalid answer after 2 re-asks: the answer was cut at max_tokens=256")}
    assert "That answer is invalid: the answer was cut at max_tokens=256." in stub.requests[-1].json()["messages"][-1][
        "content"]

    def cut_first(body, request):  # the re-ask gets the whole answer
        return _completion(**{"choices.0.finish_reason": "length" if len(body["messages"]) <= 2 else "stop"})

    with Stub(cut_first) as url:
        run_cli("annotate", uf_pairs, "-o", tmp_path / "again.parquet", "--config", api_config(tmp_path, url),
                "--limit", "2")
    calls = pq.read_table(calls_path(tmp_path / "again.parquet")).to_pylist()
    assert {(c["status"], c["reasks"]) for c in calls} == {("ok", 1)}


def test_an_ensemble_teacher_short_of_min_valid_exits_3(uf_pairs, tmp_path):
    """An API teacher answering a few calls beside a ratings teacher answering all: every pair had a category (the
    ratings'), so --min-valid 1.0 exited 0. Exit 3 now names the teacher that fell short; the default still exits 0,
    and a teacher alone is held to the pairs' share only, as before."""
    def mostly_refused(body, request):
        return json.dumps(VALID) if request.headers.get("x-client-request-id", "")[-1] in "0123" else Reply(
            404, b'{"error": "nope"}')

    with Stub(mostly_refused) as url:
        config = tmp_path / "ensemble.yaml"
        config.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{FAST}"
                          "  - kind: ratings\n")
        out = tmp_path / "ann.parquet"
        assert run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20").returncode == 0
        statuses = [c["status"] for c in pq.read_table(calls_path(out)).to_pylist() if c["teacher"] == "api:stub"]
        valid = statuses.count("ok")
        assert 0 < valid < 20 and read_annotations(out)[0].column("category").null_count == 0
        strict = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20", "--min-valid", "1.0",
                         check=False)
        assert strict.returncode == 3, strict.stdout
        (line,) = error_lines(strict)
        assert (f"teacher api:stub gave a valid annotation in {valid} of 20 calls ({valid / 20:.1%}), fewer than the "
                "100.0% asked for (--min-valid, min_valid_share;") in line and "teacher ratings" not in line
        enough = str(valid / 20)
        assert run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "20", "--min-valid", enough,
                       check=False).returncode == 0


def test_merge_reports_counts_and_exits_3_as_a_run_would(uf_pairs, tmp_path):
    """`annotate merge` of a shard whose calls all failed printed "merged 2 shards: …" and exited 0. It now counts
    the merged calls and annotated pairs and applies a run's rule: exit 3 when no pair, or fewer than --min-valid of
    them, got a valid annotation (the files written)."""
    good, dead = tmp_path / "good.yaml", tmp_path / "dead.yaml"
    shards = [tmp_path / f"ann.{i}.parquet" for i in range(2)]
    with Stub() as url, Stub(lambda body, request: Reply(404, b'{"error": "no such model"}')) as dead_url:
        good.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{FAST}")
        dead.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{dead_url}]\n{FAST}")
        run_cli("annotate", uf_pairs, "-o", shards[0], "--config", good, "--limit", "10", "--shard", "0/2")
        for shard, index in ((shards[1], 1), (tmp_path / "dead.0.parquet", 0)):
            assert run_cli("annotate", uf_pairs, "-o", shard, "--config", dead, "--limit", "10", "--shard",
                           f"{index}/2", check=False).returncode == 3
    annotated = read_annotations(shards[0])[0].num_rows
    failed = read_annotations(shards[1])[0].num_rows
    assert annotated and failed and annotated + failed == 10
    merged = tmp_path / "merged.parquet"
    result = run_cli("annotate", "merge", *shards, "-o", merged)  # some pairs annotated: exit 0, as a run's default
    assert (f"merged 2 shards: 10 pairs, 10 teacher calls (failed {failed}, ok {annotated}); {annotated} pairs "
            f"annotated -> {merged}") in result.stdout
    strict = run_cli("annotate", "merge", *shards, "-o", tmp_path / "strict.parquet", "--min-valid", "1.0",
                     check=False)
    assert strict.returncode == 3 and (tmp_path / "strict.parquet").exists()
    (line,) = error_lines(strict)
    assert line == (f"error: {annotated} of 10 pairs ({annotated / 10:.1%}) got a valid annotation, fewer than the "
                    "100.0% asked for (--min-valid); the files were written; failed calls are cached in the "
                    "shards' caches; --retry-failed on those shards asks them again, then merge again")
    dead = run_cli("annotate", "merge", tmp_path / "dead.0.parquet", shards[1], "-o", tmp_path / "dead.parquet",
                   check=False)
    assert dead.returncode == 3 and error_lines(dead)[0].startswith("error: no pair of 10 got a valid annotation; ")
    assert "--min-valid 1.5 is not a share" in _refused(
        run_cli("annotate", "merge", *shards, "-o", tmp_path / "bad.parquet", "--min-valid", "1.5", check=False))


def test_a_weight_on_a_ratings_teacher_that_names_no_category_is_refused(tmp_path):
    """A ratings teacher of an ensemble on overall scores only, each in favour of the chosen response: its answers
    are all 'unknown', which count only where no other teacher names a category, so its `weight` was accepted and
    changed nothing. Refused before anything is written; read where it names a category (a tie here)."""
    from plan_helpers import make_pairs

    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0), (5.0, 4.0)])
    with Stub() as url:
        config = tmp_path / "ensemble.yaml"
        config.write_text(f"teachers:\n  - kind: api\n    model: stub\n    base_urls: [{url}]\n{FAST}"
                          "  - kind: ratings\n    weight: 2\n")
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run_cli("annotate", pairs, "-o", tmp_path / "ann.parquet", "--config", config, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = error_lines(result)
        assert line == ("error: teacher ratings: weight 2 would change nothing: it names no category for any of the 2 "
                        "pairs (they hold overall scores only, each in favour of the chosen response, or no scores), "
                        "and its 'unknown' answers count only where no other teacher names a category, whatever their "
                        "weight; drop the weight (its answers still stand in where the other teachers give none)")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        config.write_text(config.read_text().replace("    weight: 2\n", ""))  # without the weight: read
        run_cli("annotate", pairs, "-o", tmp_path / "ann.parquet", "--config", config)
        make_pairs(pairs, [(8.0, 2.0), (5.0, 5.0)])  # a tie: no_clear_gap, a category its weight weighs
        config.write_text(config.read_text() + "    weight: 2\n")
        run_cli("annotate", pairs, "-o", tmp_path / "tie.parquet", "--config", config)
