"""Arena-Hard-Auto v0.1 maths: verdict parser, battle weights, Bradley–Terry score and bootstrap interval."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from conftest import SHARED_DATA, run_cli
from perpair.eval.arena_hard import (
    OUTCOME_LABELS,
    STRONG_WEIGHT,
    arena_score,
    battles_from_games,
    bradley_terry_score,
    game_outcome,
    judge_messages,
    parse_verdict,
    style_features,
)


@pytest.mark.parametrize("label", ["A>>B", "A>B", "A=B", "B>A", "B>>A"])
def test_parser_every_verdict_form(label):
    verdict = parse_verdict(f"My own answer... Assistant B forgot X.\n\nMy final verdict is: [[{label}]]")
    assert (verdict.label, verdict.retry, verdict.conflicting) == (label, False, False)


def test_parser_none_and_conflicting():
    none = parse_verdict("Both answers are fine. Final verdict: A is better.")
    assert none.label is None and none.retry and not none.conflicting
    conflicting = parse_verdict("First I thought [[A>B]] but then [[B>>A]].")
    assert conflicting.label is None and not conflicting.retry and conflicting.conflicting
    repeated = parse_verdict("[[B>A]] ... so again: [[B>A]]")
    assert repeated.label == "B>A"
    odd = parse_verdict("[[A<B]]")  # a label outside the five counts for nothing
    assert odd.label == "A<B" and game_outcome(odd.label, model_is_a=False) == (0, 0)


def test_outcomes_swap_with_position():
    # game 1: A = baseline, B = model; game 2: A = model, B = baseline
    assert game_outcome("B>>A", model_is_a=False) == (1, STRONG_WEIGHT)
    assert game_outcome("B>>A", model_is_a=True) == (-1, STRONG_WEIGHT)
    assert game_outcome("A>B", model_is_a=True) == (1, 1)
    assert game_outcome("A=B", model_is_a=True) == (0, 1)
    assert game_outcome(None, model_is_a=True) == (0, 0)


def test_score_equals_weighted_win_rate_and_interval_contains_it():
    rng = np.random.default_rng(0)
    labels = ["A>>B", "A>B", "A=B", "B>A", "B>>A", None]
    games = [(labels[i], bool(j)) for i, j in zip(rng.integers(0, 6, 400), rng.integers(0, 2, 400), strict=True)]
    wins = ties = total = 0
    for label, model_is_a in games:
        outcome, weight = game_outcome(label, model_is_a)
        total += weight
        wins += weight * (outcome == 1)
        ties += weight * (outcome == 0)
    expected = 100 * (wins + ties / 2) / total
    battles = battles_from_games(games)
    assert len(battles) == total
    result = arena_score(battles)
    assert result.score == pytest.approx(expected, abs=1e-9)
    assert result.lower <= expected <= result.upper
    assert result.upper - result.lower < 15


def test_hand_worked_score():
    # question 1: baseline much better in game 1 (3 battles), model slightly better in game 2 (1 battle);
    # question 2: a tie in both games (2 battles) → (0·3 + 1 + 0.5·2) / 6
    games = [("A>>B", False), ("A>B", True), ("A=B", False), ("A=B", True)]
    assert bradley_terry_score(battles_from_games(games)) == pytest.approx(100 * 2 / 6)


def test_style_control_removes_a_length_effect():
    # the model's answer is longer 80% of the time and it wins 80% of those, 20% of the others: at equal length
    # it is as good as the baseline, so style control must pull its score (68 raw) towards 50
    rng = np.random.default_rng(1)
    games, mf, bf = [], [], []
    for _ in range(600):
        longer = rng.random() < 0.8
        wins = rng.random() < (0.8 if longer else 0.2)
        games.append(("B>A" if wins else "A>B", False))
        mf.append([2000.0 if longer else 500.0, 0, 0, 0])
        bf.append([1000.0, 0, 0, 0])
    battles = battles_from_games(games, mf, bf)
    plain = arena_score(battles, n_rounds=20)
    controlled = arena_score(battles, style_control=True, n_rounds=20)
    assert plain.score == pytest.approx(100 * np.mean([g[0] == "B>A" for g in games]))
    assert abs(controlled.score - 50) < 6 < abs(plain.score - 50)
    assert controlled.lower <= controlled.score <= controlled.upper


def test_style_features_and_prompt():
    text = "# Title\n\n- one\n- two\n1. three\n\nSome **bold** and __also__."
    assert style_features(text)[1:] == [1.0, 3.0, 2.0]
    messages = judge_messages("Q?", "ans A", "ans B")
    assert messages[0]["role"] == "system" and "[[A>>B]]" in messages[0]["content"]
    assert "<|The Start of Assistant A's Answer|>\nans A\n" in messages[1]["content"]


def test_bootstrap_draws_what_pandas_sample_draws():
    import pandas as pd

    rng = np.random.default_rng(3)
    games = [(["A>B", "B>A", "A=B", "B>>A"][i], False) for i in rng.integers(0, 4, 60)]
    battles = battles_from_games(games)
    result = arena_score(battles, n_rounds=50, seed=7)
    state = np.random.RandomState(7)
    frame = pd.DataFrame({"y": battles.outcome})
    samples = [100 * ((frame.sample(frac=1.0, replace=True, random_state=state)["y"] + 1) / 2).mean()
               for _ in range(50)]
    # the percentiles of the Elo ratings (linear in the logit of the win rate), as show_result.py takes them
    logits = np.log(np.array(samples) / (100 - np.array(samples)))
    assert result.lower == pytest.approx(100 / (1 + np.exp(-np.percentile(logits, 2.5))), abs=1e-9)
    assert result.upper == pytest.approx(100 / (1 + np.exp(-np.percentile(logits, 97.5))), abs=1e-9)


def test_no_verdict_gives_null_score():
    result = arena_score(battles_from_games([(None, False), ("[[C]]", True)]))
    assert result.n_battles == 0
    assert result.as_dict()["score"] is None and result.as_dict()["rating_q025"] is None


def test_question_sources_hub_then_data_folder(monkeypatch, tmp_path):
    """The questions and baseline answers come from the Hub online, else the data folder; results.json named the
    Hub file without its commit, and a local file by its path alone, so two results could not tell whether they
    answered the same questions. Each source now says the commit the Hub file was read at (the one downloaded),
    and the SHA-256 of what was read."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from perpair.artifacts import file_sha256
    from perpair.errors import PerpairError
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig
    from perpair.models import hub_commit

    local = SHARED_DATA / "arena_hard"
    config = arena_run.ArenaHardConfig(model="m", output_dir=tmp_path, judge=JudgeConfig(judge="smollm2"), limit=2,
                                       offline=True, data_dir=local)
    questions, baseline, sources = arena_run.load_questions(config)
    assert len(questions) == 2 and len(baseline) == 500
    hashes = {"questions_sha256": file_sha256(local / arena_run.LOCAL_QUESTIONS),
              "baseline_sha256": file_sha256(local / arena_run.LOCAL_BASELINE)}
    assert sources == {"questions_source": f"local:{local / arena_run.LOCAL_QUESTIONS}",
                       "baseline_source": f"local:{local / arena_run.LOCAL_BASELINE}", **hashes}
    with pytest.raises(PerpairError, match="--data-dir"):  # offline with no folder: said, not guessed
        arena_run.load_questions(config.model_copy(update={"data_dir": None}))

    served = {"commit": "a" * 40}  # the commit the dataset's main points to on the Hub
    downloads = []

    def download(*, repo_id, filename, repo_type, revision):  # what hf_hub_download would return, online
        downloads.append((repo_id, repo_type, filename, revision))
        return str(local / (arena_run.LOCAL_QUESTIONS if filename == arena_run.HUB_QUESTIONS
                            else arena_run.LOCAL_BASELINE))

    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, *, repo_type=None, revision=None, timeout=None:
                        SimpleNamespace(sha=served["commit"]) if (repo_id, repo_type) == (arena_run.HUB_REPO,
                                                                                          "dataset") else None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = config.model_copy(update={"offline": False})
    hub_commit.cache_clear()
    try:
        _, _, sources = arena_run.load_questions(online)
        assert sources == {"questions_source": f"hub:{arena_run.HUB_REPO}/{arena_run.HUB_QUESTIONS}@{'a' * 40}",
                           "baseline_source": f"hub:{arena_run.HUB_REPO}/{arena_run.HUB_BASELINE}@{'a' * 40}",
                           **hashes}
        assert downloads == [("lmarena-ai/arena-hard-auto", "dataset", "data/arena-hard-v0.1/question.jsonl", "a" * 40),
                             ("lmarena-ai/arena-hard-auto", "dataset",
                              "data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl", "a" * 40)]
        served["commit"] = "b" * 40  # the repository moves: another run reads (and says) the new commit
        hub_commit.cache_clear()
        assert arena_run.load_questions(online)[2]["questions_source"].endswith("@" + "b" * 40)
    finally:
        hub_commit.cache_clear()

    # a questions file given: its path, and what it held (one question fewer is other questions)
    lines = gzip.open(local / arena_run.LOCAL_QUESTIONS, "rt").read().splitlines(keepends=True)
    fewer = tmp_path / "question.jsonl"
    fewer.write_text("".join(lines[1:]))
    sources = arena_run.load_questions(config.model_copy(update={"questions": fewer}))[2]
    assert sources["questions_source"] == str(fewer) and sources["questions_sha256"] == file_sha256(fewer)
    assert sources["questions_sha256"] != hashes["questions_sha256"]


# --- scoring existing judgment files ----------------------------------------------------------------------

_LABELS = ["A>>B", "A>B", "A=B", "B>A", "B>>A", None, "A<B"]


def _judgment_file(folder, model: str, seed: int, n: int = 150, weights=None):
    """A judgment file in arena-hard-auto v0.1's layout, model_judgment/JUDGE/MODEL.jsonl."""
    rng = np.random.default_rng(seed)
    path = folder / "model_judgment" / "gpt-4-1106-preview" / f"{model}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    swap = {"A>>B": "B>>A", "A>B": "B>A", "B>A": "A>B", "B>>A": "A>>B"}  # game 2 shows the model as A
    rows = []
    for i in range(n):
        first, second = (_LABELS[k] for k in rng.choice(len(_LABELS), size=2, p=weights))
        rows.append({"question_id": f"q{i}", "model": model, "judge": "gpt-4-1106-preview",
                     "games": [{"user_prompt": "…", "judgment": "…", "score": first},
                               {"user_prompt": "…", "judgment": "…", "score": swap.get(second, second)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _show_result(rows: list[dict], n_rounds: int = 100, seed: int = 42) -> tuple[float, float, float]:
    """show_result.py (v0.1) worked independently: battles (strong verdicts three times, game 2's sides swapped),
    Elo by unpenalised logistic regression on the doubled battles (a tie = one win each), the baseline anchored
    at 1000, bootstrap by pandas sampling, percentiles of the Elo, then the win rate against the baseline."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    winners = {"A=B": ("tie", 1), "A>B": ("model_a", 1), "A>>B": ("model_a", 3), "B>A": ("model_b", 1),
               "B>>A": ("model_b", 3)}
    battles = []
    for row in rows:
        for number, game in enumerate(row["games"]):
            winner, weight = winners.get(game["score"], (None, 0))
            if number == 1 and winner != "tie":  # game 2 shows the model as A
                winner = {"model_a": "model_b", "model_b": "model_a"}.get(winner)
            battles += [{"model_a": "gpt-4-0314", "model_b": row["model"], "winner": winner}] * weight
    frame = pd.DataFrame(battles)

    def elo(df) -> float:
        doubled = pd.concat([df, df], ignore_index=True)
        x = np.tile([np.log(10), -np.log(10)], (len(doubled), 1))  # columns: baseline, model
        y = np.array(doubled["winner"] == "model_a", float)
        tie = np.array(doubled["winner"] == "tie")
        tie[len(tie) // 2:] = False
        y[tie] = 1.0
        coef = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-8).fit(x, y).coef_[0]
        ratings = 400 * coef + 1000
        return ratings[1] + 1000 - ratings[0]

    def win_rate(rating: float) -> float:
        return 100 / (1 + 10 ** ((1000 - rating) / 400))

    state = np.random.RandomState(seed)
    samples = [elo(frame.sample(frac=1.0, replace=True, random_state=state)) for _ in range(n_rounds)]
    return win_rate(elo(frame)), win_rate(np.percentile(samples, 2.5)), win_rate(np.percentile(samples, 97.5))


def test_cli_scores_judgment_files_as_show_result(tmp_path):
    strong = [0.05, 0.1, 0.2, 0.25, 0.3, 0.05, 0.05]  # a model better than the baseline
    weak = [0.3, 0.3, 0.15, 0.1, 0.05, 0.05, 0.05]
    files = [_judgment_file(tmp_path, "strong-model", 1, weights=strong),
             _judgment_file(tmp_path, "weak-model", 2, weights=weak)]
    result = run_cli("eval", "arena-hard", "score", "--json", *(path for path, _ in files))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row, (path, judgments) in zip(rows, files, strict=True):
        score, lower, upper = _show_result(judgments)
        assert (row["name"], row["judge"], row["n_questions"], row["n_games"]) == (
            path.stem, "gpt-4-1106-preview", 150, 300)
        assert row["n_no_verdict"] == sum(g["score"] not in OUTCOME_LABELS for j in judgments for g in j["games"])
        assert row["score"] == pytest.approx(score, abs=1e-3)
        # the interval: the same draws, the percentiles taken on the Elo scale as there
        assert row["rating_q025"] == pytest.approx(lower, abs=1e-4)
        assert row["rating_q975"] == pytest.approx(upper, abs=1e-4)
    assert rows[0]["score"] > 55 > 45 > rows[1]["score"]
    table = run_cli("eval", "arena-hard", "score", files[0][0]).stdout
    first = rows[0]
    assert f"score {first['score']:.1f} (95% CI {first['rating_q025']:.1f} to {first['rating_q975']:.1f})" in table


def test_a_judgment_file_without_model_is_named_by_its_whole_file_name(tmp_path):
    """Without `model` in its rows a judgment file's model is its file's name: Llama-3.1-8B.jsonl was `Llama-3`."""
    path, rows = _judgment_file(tmp_path, "Llama-3.1-8B", 5, n=4)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model"}) + "\n" for r in rows))
    row = json.loads(run_cli("eval", "arena-hard", "score", "--json", path).stdout)
    assert row["name"] == "Llama-3.1-8B"


def test_a_judgment_file_is_said_judged_by_the_judge_its_rows_name(tmp_path):
    """perpair's own judgment.jsonl lies in OUT/arena_hard: its score was said judged by `arena_hard` (the folder's
    name), not by the judge every row names."""
    path, rows = _judgment_file(tmp_path, "m", 6, n=4)
    mine = tmp_path / "eval" / "m" / "arena_hard" / "judgment.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text(path.read_text())
    row = json.loads(run_cli("eval", "arena-hard", "score", "--json", mine).stdout)
    assert (row["name"], row["judge"]) == ("m", "gpt-4-1106-preview")


def test_bad_judgment_files_are_refused_with_file_and_row(tmp_path):
    path, rows = _judgment_file(tmp_path, "m", 3, n=5)
    rows[3]["games"] = rows[3]["games"][:1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other, _ = _judgment_file(tmp_path / "two", "m", 3, n=5)
    other.write_text(other.read_text() + json.dumps({**rows[0], "model": "n"}) + "\n")
    for bad, words in ((path, "row 4, field 'games'"), (other, "several models"),
                       (tmp_path / "missing.jsonl", "no such file")):
        result = run_cli("eval", "arena-hard", "score", bad, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error:") and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_judgments_of_arena_hard_v2_or_of_several_judges_are_refused_naming_file_row_and_field(tmp_path):
    """v2.0's judgment rows (uid, category; per-category baselines, labels like B<A) were scored and printed "vs
    gpt-4-0314", and a file mixing judges was scored as one judge's: each is refused by file, row and field; a
    v0.1 file still scores."""
    path, rows = _judgment_file(tmp_path, "m", 7, n=6)
    v2 = [{"uid": f"u{i}", "category": "hard_prompt", "judge": "gpt-4.1", "model": "m",
           "games": [{"score": "B<A", "judgment": {"answer": "…"}, "prompt": []},
                     {"score": "A<<B", "judgment": {"answer": "…"}, "prompt": []}]} for i in range(3)]
    cases = {"v2": (v2, "row 1, field 'uid'"),
             "category": ([*rows[:2], {**rows[2], "category": "creative_writing"}], "row 3, field 'category'"),
             "no_question_id": ([*rows[:4], {k: v for k, v in rows[4].items() if k != "question_id"}],
                                "row 5, field 'question_id'"),
             "judges": ([*rows[:3], {**rows[3], "judge": "gpt-4o"}, *rows[4:]], "row 4, field 'judge'"),
             # a model that is no name (a TypeError traceback)
             "model": ([*rows[:1], {**rows[1], "model": ["m"]}, *rows[2:]], "row 2, field 'model': expected the "
                                                                              "model's name or null, got list")}
    for case, (bad_rows, words) in cases.items():
        bad = tmp_path / case / "m.jsonl"
        bad.parent.mkdir()
        bad.write_text("".join(json.dumps(r) + "\n" for r in bad_rows))
        result = run_cli("eval", "arena-hard", "score", bad, check=False)
        error = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(error) == 1 and error[0].startswith(f"error: file {bad}, "), case
        assert words in error[0] and "Traceback" not in result.stderr, (case, result.stderr)
    assert "v2.0" in run_cli("eval", "arena-hard", "score", tmp_path / "v2" / "m.jsonl", check=False).stderr
    row = json.loads(run_cli("eval", "arena-hard", "score", "--json", path).stdout)  # v0.1: one judge on every row
    assert (row["judge"], row["n_questions"]) == ("gpt-4-1106-preview", 6)


def test_judgments_without_any_verdict_are_an_error_not_a_null_score(tmp_path):
    """No game with one of the five labels: there is no score to report, so exit 2 (it was exit 0 with a null
    score); one game with a verdict is enough for a score, and the others are counted in the note."""
    path, rows = _judgment_file(tmp_path, "m", 4, n=6, weights=[0, 0, 0, 0, 0, 0.5, 0.5])  # None and A<B only
    result = run_cli("eval", "arena-hard", "score", path, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error:"), (result.stdout, result.stderr)
    assert "no verdict" in result.stderr and "12 games" in result.stderr and "Traceback" not in result.stderr
    rows[0]["games"][0]["score"] = "A>B"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = json.loads(run_cli("eval", "arena-hard", "score", "--json", path).stdout)
    assert (row["score"], row["n_battles"], row["n_no_verdict"]) == (0.0, 1, 11)
    assert row["note"].startswith("11 of 12 games without a verdict")


def test_questions_without_text_or_twice_are_refused_with_file_and_row(tmp_path):
    """A question row without turns[0].content used to stop the run with a KeyError traceback after the files were
    read; a question given twice would be answered and judged twice, its battles counted twice."""
    from perpair.errors import InputError
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig

    baseline = tmp_path / "b.jsonl"
    baseline.write_text("".join(json.dumps({"question_id": q, "choices": [{"turns": [{"content": "ans"}]}]}) + "\n"
                                for q in ("q1", "q2")))
    good = {"question_id": "q1", "turns": [{"content": "Why?"}]}
    for rows, field in (([good, {"question_id": "q2"}], "turns"),
                        ([good, {"question_id": "q2", "turns": [{"content": 3}]}], "turns[0].content"),
                        ([good, good], "question_id")):
        questions = tmp_path / "q.jsonl"
        questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = arena_run.ArenaHardConfig(model="m", output_dir=tmp_path, judge=JudgeConfig(judge="smollm2"),
                                           questions=questions, baseline_answers=baseline, offline=True)
        with pytest.raises(InputError) as info:
            arena_run.load_questions(config)
        assert (info.value.row, info.value.field) == (2, field), str(info.value)


def test_an_empty_questions_file_is_refused_naming_it(tmp_path):
    """An empty questions file went on to load the model, overwrite the folder's answers and judgments with empty
    files and end in "no verdict in 0 games"."""
    from perpair.errors import InputError
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig

    empty = tmp_path / "q.jsonl"
    empty.write_text("\n")
    config = arena_run.ArenaHardConfig(model="m", output_dir=tmp_path, judge=JudgeConfig(judge="smollm2"),
                                       questions=empty, baseline_answers=empty, offline=True)
    with pytest.raises(InputError, match="no questions") as info:
        arena_run.load_questions(config)
    assert info.value.file == str(empty)


def test_a_question_answered_twice_in_the_baseline_file_is_refused_with_file_and_row(tmp_path):
    """The last of the two answers was taken as the baseline's, without a word."""
    from perpair.errors import InputError
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig

    baseline = tmp_path / "b.jsonl"
    baseline.write_text("".join(json.dumps({"question_id": q, "choices": [{"turns": [{"content": a}]}]}) + "\n"
                                for q, a in (("q1", "one"), ("q2", "two"), ("q1", "another"))))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "turns": [{"content": "Why?"}]}) + "\n"
                                 for q in ("q1", "q2")))
    config = arena_run.ArenaHardConfig(model="m", output_dir=tmp_path, judge=JudgeConfig(judge="smollm2"),
                                       questions=questions, baseline_answers=baseline, offline=True)
    with pytest.raises(InputError, match="a second answer to question q1") as info:
        arena_run.load_questions(config)
    assert (info.value.file, info.value.row, info.value.field) == (str(baseline), 3, "question_id")
    # a question_id that is a list, in either file: a TypeError traceback at the lookup
    for path, rows in ((baseline, [{"question_id": ["q1"], "choices": [{"turns": [{"content": "one"}]}]}]),
                       (questions, [{"question_id": ["q1"], "turns": [{"content": "Why?"}]}])):
        if path == questions:
            baseline.write_text(json.dumps({"question_id": "q1", "choices": [{"turns": [{"content": "a"}]}]}) + "\n")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(InputError, match="expected a string or an integer, got list") as info:
            arena_run.load_questions(config)
        assert (info.value.file, info.value.row, info.value.field) == (str(path), 1, "question_id")


def test_a_damaged_compressed_judgment_file_is_refused_naming_it(tmp_path):
    """zlib's error (not an OSError as gzip's own are) was a traceback."""
    path, _ = _judgment_file(tmp_path, "m", 3, n=40)
    data = gzip.compress(path.read_bytes())
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(data[:60] + bytes(b ^ 0xFF for b in data[60:120]) + data[120:])
    result = run_cli("eval", "arena-hard", "score", damaged, check=False)
    assert result.returncode == 2 and f"file {damaged}: not a readable JSON Lines file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_style_controlled_score_says_it_is_perpairs_own_variant(tmp_path, monkeypatch, tiny_model_dir):
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig

    monkeypatch.setattr(arena_run, "generate_answers",
                        lambda path, generation, texts, cache, progress: (["## An answer\n- " + "x" * k
                                                                           for k in range(len(texts))], 0))
    monkeypatch.setattr(arena_run, "_judge_games", lambda config, conversations, cache, progress: (
        [{"judgment": "[[B>A]]" if k % 3 else "[[A>B]]", "retried": False} for k in range(len(conversations))], 0))
    rows = {}
    for style in (False, True):
        config = arena_run.ArenaHardConfig(model=str(tiny_model_dir), output_dir=tmp_path / str(style), limit=12,
                                           judge=JudgeConfig(judge="smollm2"), offline=True, style_control=style,
                                           data_dir=SHARED_DATA / "arena_hard", n_rounds=5)
        rows[style] = arena_run.run_arena_hard(config)
    assert rows[False]["note"] == "" and rows[True]["style_control"]
    assert "perpair's own variant" in rows[True]["note"] and "not arena-hard-auto's" in rows[True]["note"]


def test_a_local_judge_writes_its_judgments_in_the_dtype_they_are_cached_under(tmp_path, monkeypatch, tiny_model_dir):
    """The judgments are cached under the judge's dtype (judge_identity), but the Arena-Hard local judge was loaded
    in the default dtype whatever JudgeConfig.dtype said: bfloat16 asked, float32 judgments cached as bfloat16's."""
    from perpair.eval import arena_run, generate
    from perpair.eval.alpaca_eval import JudgeConfig

    loaded = []

    class Generator:
        def __init__(self, model, config):
            loaded.append(config.dtype)
            self.config = config

        def generate(self, conversations):
            return ["[[A=B]]"] * len(conversations)

    monkeypatch.setattr(generate, "TransformersGenerator", Generator)
    monkeypatch.setattr(arena_run, "generate_answers",
                        lambda path, generation, texts, cache, progress: (["an answer"] * len(texts), 0))
    config = arena_run.ArenaHardConfig(model=str(tiny_model_dir), output_dir=tmp_path / "out", limit=2, n_rounds=2,
                                       judge=JudgeConfig(judge=str(tiny_model_dir), dtype="bfloat16"), offline=True,
                                       data_dir=SHARED_DATA / "arena_hard")
    row = arena_run.run_arena_hard(config)
    assert loaded == ["bfloat16"] and row["n_judged"] == 4 and row["score"] == 50.0


@pytest.mark.component  # a loopback stub judge and a tiny model (the file's others are unit)
def test_an_api_judges_empty_reply_is_not_cached_and_the_next_run_asks_again(tmp_path, monkeypatch, tiny_model_dir):
    """An API judge's empty reply (content null or "": a reasoning judge out of max tokens, a content filter) was
    cached as the game's verdict-less judgment for good. It counts as no verdict in its run, the note says so, and
    the next run asks again, as AlpacaEval's judge does with a reply without top log-probs. So does a request the
    server refuses (HTTP 400, a prompt over its context), which stopped the whole run with the judgments of its
    chunk lost, and every run after it at the same game."""
    import sqlite3

    from llama_server import LoopbackServer, Reply, chat_completion
    from perpair.eval import arena_run
    from perpair.eval.alpaca_eval import JudgeConfig

    empty = [True]  # the server's state: empty replies whenever the model's answer is shown as A, or none
    asked = []

    async def judge(request) -> Reply:
        prompt = request.json()["messages"][1]["content"]
        model_is_a = "<|The Start of Assistant A's Answer|>\nMODEL ANSWER" in prompt
        asked.append(model_is_a)
        content = "My final verdict is [[A>B]]" if model_is_a else "My final verdict is [[B>A]]"  # model wins
        if empty[0] and model_is_a:  # null for question 1's, HTTP 400 for question 2's
            if "MODEL ANSWER 0" not in prompt:
                return Reply(status=400, body=b'{"error": {"message": "maximum context length is 8192 tokens"}}')
            content = None
        return Reply(body=chat_completion(content, finish_reason="length"))

    monkeypatch.setattr(arena_run, "generate_answers", lambda path, generation, texts, cache, progress: (
        [f"MODEL ANSWER {k}" for k in range(len(texts))], 0))
    out = tmp_path / "arena"
    with LoopbackServer(judge) as url:
        config = arena_run.ArenaHardConfig(
            model=str(tiny_model_dir), output_dir=out, limit=2, n_rounds=2, offline=True,
            data_dir=SHARED_DATA / "arena_hard", judge=JudgeConfig(judge=f"{url}/v1", model_name="stub"))
        first = arena_run.run_arena_hard(config)
        with sqlite3.connect(out / "cache.sqlite") as db:
            cached = db.execute("SELECT COUNT(*) FROM results WHERE kind = 'arena_judgment'").fetchone()[0]
        empty[0] = False  # the judge answers now
        second = arena_run.run_arena_hard(config)
    # run 1: the two games showing the model as A got empty replies, and the retry's too: no verdict, not cached
    assert (first["n_judged"], first["n_no_verdict"], first["n_empty_reply"], cached) == (4, 2, 2, 2)
    assert (first["score"], first["n_battles"]) == (100.0, 2)
    assert first["note"] == ("2 of 4 games without a verdict (after one retry) weigh 0, as in show_result.py; 2 of "
                             "them got an empty reply from the judge (content null or \"\", or a request it refused: "
                             "HTTP 400, 413, 422), not cached: a re-run asks the judge again")
    assert sorted(asked[:6]) == [False, False, True, True, True, True]  # 2 verdicts; 2 empty, each asked twice
    # run 2 asks those two games again, and only them; the games with a verdict come from the cache
    assert asked[6:] == [True, True]
    assert (second["n_judged"], second["n_no_verdict"], second["n_empty_reply"]) == (2, 0, 0)
    assert (second["score"], second["n_battles"], second["note"]) == (100.0, 4, "")
    # the judgment rows name the judge by its model, as arena-hard-auto does (they named the server's URL)
    rows = [json.loads(line) for line in (out / "judgment.jsonl").read_text().splitlines()]
    assert {row["judge"] for row in rows} == {"stub"}


def test_answers_capped_at_arena_hard_autos_length(monkeypatch, tmp_path):
    """arena-hard-auto v0.1 generates answers up to 4,096 tokens (config/gen_answer_config.yaml, max_tokens); the
    baseline's answers were too. ``arena-hard run`` and ``ArenaHardConfig`` default to that cap, not to the
    2,048 of AlpacaEval's generation."""
    from typer.testing import CliRunner

    import perpair.eval
    from perpair.cli import app
    from perpair.eval import ArenaHardConfig, JudgeConfig

    seen = []

    def capture(config, on_progress=None):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(perpair.eval, "run_arena_hard", capture)
    result = CliRunner().invoke(app, ["eval", "arena-hard", "run", "--model", "smollm2", "--judge", "smollm2",
                                      "-o", str(tmp_path / "arena")])
    assert result.exit_code == 0, result.output
    assert seen[0].generation.max_new_tokens == 4096
    config = ArenaHardConfig(model="m", output_dir=tmp_path, judge=JudgeConfig(judge="smollm2"))
    assert config.generation.max_new_tokens == 4096
