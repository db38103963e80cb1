"""The API teacher end to end against a real OpenAI-compatible server: llama.cpp's, serving SmolLM2-135M on
loopback (slow). SmolLM2 answers in JSON but breaks the schema's bounds (magnitude 10, confidence 25), so
validation and re-asking run for real. Covers: 50 pairs; faults injected by a proxy; SIGKILL and resume.

Answers at temperature 0 do not depend on request order: llama-cpp-python's server runs one request at a time
(a lock around the model), seed 0, and its reuse of the previous prompt's KV cache leaves the logits bit for
bit the same (checked: the same prompt after different ones gives identical top_logprobs). The session's one
server (tests/llama_server.py, shared with the judge test) memoizes answers at temperature 0: a request already
made in the session (most of the faults test's, the same as the 50-pair test's; the SIGKILL test's
uninterrupted reference run) is answered from memory. Time is the server's: about 1-3 s a request on a shared
2-core machine, and the SIGKILL test at its full size sends some 450 requests (200 pairs twice, re-asks, lost
in-flight ones), so CI runs it on 40 pairs (PERPAIR_CRASH_TEST_PAIRS sets the size)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import cached_call_keys, run_cli
from llama_server import Proxy
from perpair.annotate import calls_path, read_annotations
from perpair.annotate.schema import CATEGORIES

pytestmark = pytest.mark.slow


def write_config(path, url, **extra) -> None:
    settings = {"max_tokens": 64, "max_chars": 200, "templates": "[gap-brief]", "concurrency": 2, **extra}
    lines = ["teachers:", "  - kind: api", "    model: smollm2", f"    base_urls: [{url}]"]
    lines += [f"    {k}: {v}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def check_rows(out, n: int) -> list[dict]:
    table, provenance = read_annotations(out)
    calls = pq.read_table(calls_path(out)).to_pylist()
    assert table.num_rows == n and len(calls) == n and len({c["pair_id"] for c in calls}) == n
    for call in calls:
        if call["status"] == "ok":
            assert call["category"] in CATEGORIES and 0 <= call["magnitude"] <= 3 and 0 <= call["confidence"] <= 1
        else:
            assert call["status"] == "failed" and call["reason"]
    return calls


def test_50_pairs_against_llama_cpp(llama_server, uf_pairs, tmp_path):
    config = tmp_path / "real.yaml"
    write_config(config, llama_server, timeout_s=120)
    out = tmp_path / "real.parquet"
    started = time.monotonic()
    result = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "50")
    calls = check_rows(out, 50)
    ok = sum(c["status"] == "ok" for c in calls)
    reasked = sum(c["reasks"] > 0 for c in calls)
    assert ok >= 40, result.stdout
    assert all(c["prompt_tokens"] > 0 for c in calls)
    print(f"\n50 pairs via llama.cpp in {time.monotonic() - started:.0f}s: {ok} valid, {50 - ok} failed with a "
          f"reason, {reasked} re-asked")


def test_faults_are_retried_within_the_bound(llama_server, uf_pairs, tmp_path):
    # Each stall costs its call the whole timeout (4 stalls here): 8 s, where the server's answers take 1-3 s
    # (most come from the session's memo); a real answer slower than that is retried like a stall, within the bound.
    timeout_s, max_retries, max_reasks = 8, 8, 3
    proxy = Proxy(llama_server, fault_rate=0.3, stall_s=timeout_s + 2, seed=1, retry_after_s=0.3)
    with proxy as url:
        config = tmp_path / "faults.yaml"
        write_config(config, url, timeout_s=timeout_s, max_retries=max_retries, max_reasks=max_reasks,
                     backoff_initial_s=0.1, backoff_max_s=1.0)
        out = tmp_path / "faults.parquet"
        result = run_cli("annotate", uf_pairs, "-o", out, "--config", config, "--limit", "30")
        calls = check_rows(out, 30)
    assert all(proxy.faults.values()), proxy.faults  # every kind of fault happened
    assert not [c for c in calls if c["status"] == "failed" and c["reason"].startswith("request failed")]
    assert sum(c["status"] == "ok" for c in calls) >= 25, result.stdout
    # The bound: each of at most max_reasks + 1 asks takes at most max_retries + 1 attempts.
    assert max(c["attempts"] for c in calls) <= (max_retries + 1) * (max_reasks + 1)
    assert sum(c["attempts"] for c in calls) > sum(c["reasks"] + 1 for c in calls)  # faults were retried


def test_sigkill_and_resume_loses_nothing_and_repeats_nothing(llama_server, uf_pairs, tmp_path):
    # The acceptance size is 200 pairs (passed: 1,069 s on 2 shared cores, some 450 requests); CI runs
    # 40 to stay within the suite's time budget. PERPAIR_CRASH_TEST_PAIRS=200 runs the full size.
    n, kills = int(os.environ.get("PERPAIR_CRASH_TEST_PAIRS", "40")), 5
    rng = random.Random(7)
    proxy = Proxy(llama_server)
    with proxy as url:
        config = tmp_path / "crash.yaml"
        # The form llama.cpp takes, named: probing it (auto) repeats the first requests of every resumed run.
        write_config(config, url, max_chars=50, max_tokens=48, timeout_s=120, structured="json_object")
        out, cache = tmp_path / "crash.parquet", tmp_path / "crash.sqlite"
        command = [sys.executable, "-m", "perpair", "annotate", str(uf_pairs), "-o", str(out), "--config",
                   str(config), "--limit", str(n), "--cache", str(cache)]
        thresholds = sorted(rng.sample(range(5, n - 10), kills))
        lost = 0  # requests of calls that a kill cut short (their answers never reached the cache)
        for threshold in thresholds:
            mark = len(proxy.sent)
            before = cached_call_keys(cache)
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while len(cached_call_keys(cache)) < threshold and process.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.5))  # land inside a request, not just after a commit
            assert process.poll() is None, "the run ended before the kill"
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            time.sleep(0.3)  # let the proxy read what the process wrote just before it died
            sent = proxy.sent[mark:]
            # Nothing finished before this run was sent again during it ...
            assert not before & set(sent)
            # ... and what it sent without finishing are the calls in flight at the kill: `concurrency` at most.
            unfinished = [key for key in sent if key not in cached_call_keys(cache)]
            assert len(set(unfinished)) <= 2
            lost += len(unfinished)
        mark, before = len(proxy.sent), cached_call_keys(cache)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert not before & set(proxy.sent[mark:])
    # Every pair annotated exactly once; every request is one of a recorded call's attempts (the first ask
    # and its re-asks), or was lost with a call in flight at a kill.
    calls = check_rows(out, n)
    assert len({c["key"] for c in calls}) == n and cached_call_keys(cache) == {c["key"] for c in calls}
    assert len(proxy.sent) == sum(c["attempts"] for c in calls) + lost
    assert lost <= kills * 2 * 3  # each of at most `concurrency` calls per kill had asked at most 1 + max_reasks

    # Identical to an uninterrupted run at temperature 0. Its requests are the killed runs' again, answered by
    # the session's memo of the server's answers, not recomputed: what is compared is perpair's resume (which
    # calls were kept, re-asked, recorded, in which order), and any request it makes differently from the
    # killed runs still reaches the server.
    reference = tmp_path / "ref" / "crash.parquet"
    reference.parent.mkdir()
    write_config(config.with_name("ref.yaml"), llama_server, max_chars=50, max_tokens=48, timeout_s=120,
                 structured="json_object")
    run_cli("annotate", uf_pairs, "-o", reference, "--config", config.with_name("ref.yaml"), "--limit", str(n))
    assert reference.read_bytes() == out.read_bytes()
    assert calls_path(reference).read_bytes() == calls_path(out).read_bytes()


@pytest.mark.component  # the session's memo, on a loopback stub: no llama.cpp needed
def test_memo_answers_only_a_repeated_temperature_0_request_from_memory():
    import json
    import urllib.request

    from llama_server import LoopbackServer, stub_handler

    upstream_calls = []
    stub = stub_handler(lambda body: (upstream_calls.append(body), f"answer {len(upstream_calls)}")[1])

    def post(url, **body):
        request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    with LoopbackServer(stub) as upstream, Proxy(upstream + "/v1", memoize=True) as url:
        asks = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0}
        assert post(url, **asks) == post(url, **asks) == "answer 1"  # computed once
        assert post(url, **{**asks, "max_tokens": 5}) == "answer 2"  # any other byte: computed
        assert post(url, **{**asks, "temperature": 1.0}) == "answer 3"  # sampled: never from memory
        assert post(url, **{**asks, "temperature": 1.0}) == "answer 4"
    assert len(upstream_calls) == 4


@pytest.mark.component  # the fault proxy itself, on a loopback stub: no llama.cpp needed
def test_every_fault_kind_comes_in_turn_and_a_memoized_answer_can_be_truncated():
    import http.client
    import json
    import urllib.parse

    from llama_server import LoopbackServer, stub_handler

    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
    with LoopbackServer(stub_handler("fine")) as upstream:
        proxy = Proxy(upstream + "/v1", fault_rate=1.0, stall_s=0.2, memoize=True)
        proxy.memo[("POST", "/v1/chat/completions", body)] = b'{"choices": []}'  # answered from memory
        with proxy as url:
            address = urllib.parse.urlsplit(url)
            seen = []
            for _ in range(2 * len(Proxy.FAULTS)):
                connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
                try:
                    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    seen.append((response.status, response.read()))
                except (http.client.IncompleteRead, http.client.RemoteDisconnected) as exc:
                    seen.append(type(exc).__name__)
                finally:
                    connection.close()
    assert proxy.faults == {kind: 2 for kind in Proxy.FAULTS}  # ten faults: each kind twice
    assert seen[:5] == [(429, b'{"error": "slow down"}'), (500, b'{"error": "boom"}'), "RemoteDisconnected",
                        (200, b'{"choices": [{"message": '), "IncompleteRead"]  # the memo's answer, cut short
    assert seen[5:] == seen[:5]
