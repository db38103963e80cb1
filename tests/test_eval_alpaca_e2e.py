"""AlpacaEval 2.0 end to end, offline, through the real CLI: SmolLM2-135M-Instruct as the evaluated model and as
the judge (local, then through llama.cpp's OpenAI-compatible server) on 20 instructions."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import SHARED_DATA, run_cli
from llama_server import JUDGE_ALIAS
from perpair.artifacts import file_sha256

AE = SHARED_DATA / "alpaca_eval"
N = 20
COMMON = ("--model", "smollm2", "--limit", str(N), "--max-new-tokens", "24", "--batch-size", "4", "--offline",
          "--reference", str(AE / "reference_outputs_gpt4_1106_preview.json.gz"),
          "--judge-prompt", str(AE / "judge_prompt_alpaca_eval_clf.txt"),
          "--difficulty", str(AE / "instruction_difficulty_reconstructed.csv"), "--data-dir", str(AE), "--json")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _count(db, kind: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results WHERE kind = ?", (kind,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _check_files(out, name: str) -> list[dict]:
    outputs = json.loads((out / "model_outputs.json").read_text())
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(outputs) == len(annotations) == N
    assert set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
    assert {"instruction", "output_1", "generator_1", "output_2", "generator_2", "preference", "annotator",
            "raw_completion"} <= set(annotations[0])
    assert all(a["generator_2"] == name and 1 <= a["preference"] <= 2 for a in annotations)
    return annotations


def _check_row(row: dict) -> None:
    assert row["n_total"] == N
    assert 0 <= row["win_rate"] <= 100 and row["standard_error"] > 0
    assert 0 < row["length_controlled_winrate"] < 100
    assert row["lc_method"] == "fit_offline_approximation" and "approximation" in row["lc_note"]
    # which reference was read: the data folder's copy, by path and by what it held
    reference = AE / "reference_outputs_gpt4_1106_preview.json.gz"
    assert (row["reference"], row["reference_sha256"]) == (str(reference), file_sha256(reference))


def test_local_judge_cached_resumable_after_kill(tmp_path):
    out = tmp_path / "ae"
    args = [sys.executable, "-m", "perpair", "eval", "alpaca-eval", *COMMON, "--judge", "smollm2", "-o", str(out)]
    # Kill the first run (SIGKILL: no clean-up at all) once some answers are in the cache.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    db = out / "cache.sqlite"
    deadline = time.monotonic() + 120
    while _count(db, "generation") < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = _count(db, "generation")
    assert 4 <= done_before < N

    resumed = json.loads(run_cli("eval", "alpaca-eval", *COMMON, "--judge", "smollm2", "-o", out).stdout)
    assert resumed["n_generated"] == N - done_before  # nothing finished is generated twice
    assert resumed["n_judged"] == N
    _check_row(resumed)
    annotations = _check_files(out, "smollm2-135m-instruct")

    again = json.loads(run_cli("eval", "alpaca-eval", *COMMON, "--judge", "smollm2", "-o", out).stdout)
    assert (again["n_generated"], again["n_judged"]) == (0, 0)
    assert again["win_rate"] == resumed["win_rate"]
    assert again["length_controlled_winrate"] == resumed["length_controlled_winrate"]
    assert json.loads((out / "annotations.json").read_text()) == annotations

    # the written annotations are alpaca_eval files: `eval score` reads them and agrees
    scored = json.loads(run_cli("eval", "score", "--json", "--offline", "--difficulty",
                                AE / "instruction_difficulty_reconstructed.csv", "--data-dir", AE,
                                out / "annotations.json").stdout)
    assert scored["win_rate"] == pytest.approx(resumed["win_rate"])
    assert scored["length_controlled_winrate"] == pytest.approx(resumed["length_controlled_winrate"])


def _probe_logprobs(url: str, model: str) -> None:
    """Skip, saying why, when this llama.cpp build cannot serve the judge: it needs top_logprobs of a chat
    completion (server started with --logits_all True) and a build that survives a multi-token prompt."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Answer with m or M."}],
                       "max_tokens": 1, "logprobs": True, "top_logprobs": 5}).encode()
    request = urllib.request.Request(url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            choice = json.loads(response.read())["choices"][0]
    except urllib.error.HTTPError as exc:
        pytest.skip(f"llama.cpp server refuses logprobs ({exc.code}: {exc.read()[:200]!r}); the fixture must start "
                    "it with logits_all")
    except OSError as exc:
        pytest.skip(f"llama.cpp server died on a one-token chat completion ({exc}); llama-cpp-python as built "
                    "here segfaults on multi-token prompts (Llama.create_completion, SIGSEGV)")
    if not (choice.get("logprobs") or {}).get("content"):
        pytest.skip("llama.cpp server returned no top_logprobs for a chat completion")


def test_llama_cpp_server_judge(llama_server, tmp_path):
    url, out = llama_server, tmp_path / "ae"  # the session's server, shared with the annotate tests
    _probe_logprobs(url, JUDGE_ALIAS)
    first = json.loads(run_cli("eval", "alpaca-eval", *COMMON, "--judge", url, "--judge-name", JUDGE_ALIAS,
                               "--judge-concurrency", "2", "-o", out).stdout)
    assert (first["n_generated"], first["n_judged"]) == (N, N)
    _check_row(first)
    annotations = _check_files(out, "smollm2-135m-instruct")
    assert all(a["raw_completion"]["logprobs"]["content"][0]["top_logprobs"] for a in annotations)
    again = json.loads(run_cli("eval", "alpaca-eval", *COMMON, "--judge", url, "--judge-name", JUDGE_ALIAS,
                               "-o", out).stdout)
    assert (again["n_generated"], again["n_judged"]) == (0, 0)
    assert again["win_rate"] == first["win_rate"]
