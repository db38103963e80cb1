"""Arena-Hard-Auto v0.1 end to end through the real CLI, offline: SmolLM2-135M-Instruct answers 3 questions and
judges them locally (too small to give ``[[...]]`` verdicts: the one-retry-then-no-verdict path, no score and
exit 2 with every judgment kept), a second run repeats nothing; then a stub OpenAI-compatible judge gives
verdicts only after the retry, so the score and its interval are known by hand."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import SHARED_DATA, run_cli
from perpair.eval.arena_hard import RETRY_MESSAGE

AH = SHARED_DATA / "arena_hard"
N = 3
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _read(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture
def short_questions(tmp_path):
    """The 5 questions with the shortest question + baseline answer (a 135M judge on 2 CPU cores reads ~2,000
    tokens a second): real v0.1 rows, fewer tokens."""
    questions = _read(AH / "question_v0.1.jsonl.gz")
    baseline = {r["question_id"]: r for r in _read(AH / "baseline_answers_gpt-4-0314.jsonl.gz")}

    def size(q):
        return len(q["turns"][0]["content"]) + len(baseline[q["question_id"]]["choices"][0]["turns"][0]["content"])

    chosen = sorted(questions, key=size)[:5]
    q_path, b_path = tmp_path / "question.jsonl", tmp_path / "gpt-4-0314.jsonl"
    q_path.write_text("".join(json.dumps(q) + "\n" for q in chosen))
    b_path.write_text("".join(json.dumps(baseline[q["question_id"]]) + "\n" for q in chosen))
    answers = {baseline[q["question_id"]]["choices"][0]["turns"][0]["content"] for q in chosen}
    return q_path, b_path, answers


class _StubJudge(BaseHTTPRequestHandler):
    """No verdict on the first turn; on the retry, the baseline wins when it is assistant A, else a tie."""

    baseline_answers: set[str] = set()
    calls: list[int] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        self.calls.append(len(messages))
        if messages[-1]["content"] != RETRY_MESSAGE:
            text = "Let me think about both answers first."
        else:
            prompt = messages[1]["content"]
            answer_a = prompt.split("<|The Start of Assistant A's Answer|>\n", 1)[1].split(
                "\n<|The End of Assistant A's Answer|>", 1)[0]
            text = "My final verdict is [[A>B]]" if answer_a in self.baseline_answers else "Tie: [[A=B]]"
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _run(out, q_path, b_path, *judge, check: bool = True):
    local = () if judge[1].startswith("http") else ("--judge-batch-size", 2 * N)  # (an API judge refuses it)
    result = run_cli("eval", "arena-hard", "run", "--model", "smollm2", *judge, "--questions", q_path,
                     "--baseline-answers", b_path, "--limit", N, "--max-new-tokens", 16, "--batch-size", N,
                     *local, "--judge-max-tokens", 8, "--offline", "--json", "-o", out, check=check)
    return json.loads(result.stdout) if check else result


def _cached(out) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(out / "cache.sqlite") as db:
        return dict(db.execute("SELECT kind, COUNT(*) FROM results GROUP BY kind").fetchall())


def test_local_judge_cached_then_api_judge(short_questions, tmp_path):
    q_path, b_path, baseline_answers = short_questions
    out = tmp_path / "arena"
    result = _run(out, q_path, b_path, "--judge", "smollm2", check=False)
    answers = [json.loads(line) for line in (out / "model_answer.jsonl").read_text().splitlines()]
    assert len(answers) == N and all(a["choices"][0]["turns"][0]["content"] for a in answers)
    judgments = [json.loads(line) for line in (out / "judgment.jsonl").read_text().splitlines()]
    games = [g for j in judgments for g in j["games"]]
    assert len(games) == 2 * N and [g["model_is_a"] for g in games] == [False, True] * N
    # a game without a label was asked once more (gen_judgment.py), and a label-less retry counts as no verdict
    assert all(g["retried"] for g in games if g["score"] is None)
    assert _cached(out) == {"generation": N, "arena_judgment": 2 * N}
    if result.returncode:  # what a 135M judge with 8 tokens gives: no verdict at all, so no score (exit 2)
        error = result.stderr.splitlines()[-1]
        assert result.returncode == 2 and error.startswith("error: no verdict"), result.stderr
        assert all(g["score"] is None for g in games) and not (out / "results.json").exists()
        again = _run(out, q_path, b_path, "--judge", "smollm2", check=False)
        assert again.returncode == 2 and again.stderr.splitlines()[-1] == error
        assert _cached(out) == {"generation": N, "arena_judgment": 2 * N}  # nothing asked again
        return
    first = json.loads(result.stdout)
    assert (first["n_questions"], first["n_games"], first["n_generated"], first["n_judged"]) == (N, 2 * N, N, 2 * N)
    assert first["n_retried"] == sum(g["retried"] for g in games)
    assert 0 <= first["rating_q025"] <= first["score"] <= first["rating_q975"] <= 100
    assert json.loads((out / "results.json").read_text())[0]["score"] == first["score"]
    again = _run(out, q_path, b_path, "--judge", "smollm2")
    assert (again["n_generated"], again["n_judged"]) == (0, 0)
    assert {k: again[k] for k in ("score", "rating_q025", "rating_q975", "n_no_verdict")} == \
        {k: first[k] for k in ("score", "rating_q025", "rating_q975", "n_no_verdict")}



def test_api_judge_verdicts_after_retry(short_questions, tmp_path):
    q_path, b_path, baseline_answers = short_questions
    out = tmp_path / "arena"
    _StubJudge.baseline_answers = baseline_answers
    _StubJudge.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        row = _run(out, q_path, b_path, "--judge", url, "--judge-name", "stub")
    finally:
        server.shutdown()
    assert (row["n_generated"], row["n_judged"], row["n_retried"], row["n_no_verdict"]) == (N, 2 * N, 2 * N, 0)
    assert sorted(_StubJudge.calls) == [2] * (2 * N) + [4] * (2 * N)
    # per question: game 1 baseline (A) wins, game 2 a tie → (0 + ½) / 2 battles = 25
    assert row["score"] == pytest.approx(25.0) and row["n_battles"] == 2 * N
    assert 0 <= row["rating_q025"] <= 25.0 <= row["rating_q975"] <= 50.0 and row["note"] == ""
    from perpair.artifacts import file_sha256  # the questions and baseline answers it read, by content

    assert (row["questions_source"], row["baseline_source"]) == (str(q_path), str(b_path))
    assert (row["questions_sha256"], row["baseline_sha256"]) == (file_sha256(q_path), file_sha256(b_path))
