"""Arena-Hard-Auto v0.1 end to end: answer the questions, judge two games per question (positions swapped) with
one retry when no verdict, and score with Bradley–Terry and a bootstrap interval (:mod:`perpair.eval.arena_hard`).

Files (arena-hard-auto's formats): ``model_answer.jsonl`` (question_id, answer_id, model_id, choices[0].turns),
``judgment.jsonl`` (question_id, model, judge, games: user_prompt, judgment, score), ``results.json``, and
``cache.sqlite`` (every answer and judgment; re-runs and killed runs repeat nothing finished; a game an API judge's
empty reply left without a verdict is not kept, so a re-run asks again).

Questions and baseline answers: the files given, else the Hub (``lmarena-ai/arena-hard-auto``, the dataset
repository arena-hard-auto's README clones, via ``hf_hub_download``) when online, else the copies in the data
folder given (laid out as ``../shared/data/arena_hard/``); the row says which (``questions_source``,
``baseline_source``: a Hub file with the commit it was read at) and what they held (``questions_sha256``,
``baseline_sha256``), so two results tell whether they answered the same questions. A game whose
judgment has no usable label after the one retry weighs 0 (``note`` counts them); when no game has one there is no
score: an error, after the answers and judgments are written and cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from perpair.artifacts import file_sha256
from perpair.errors import InputError, PerpairError
from perpair.eval.alpaca_eval import JudgeConfig, check_judge, judge_identity, model_label, output_lock
from perpair.eval.arena_hard import (
    BASELINE,
    N_BOOTSTRAP,
    OUTCOME_LABELS,
    RETRY_MESSAGE,
    arena_score,
    battles_from_games,
    judge_messages,
    parse_verdict,
    style_features,
)
from perpair.eval.cache import ResultCache, cache_key
from perpair.eval.generate import GenerationConfig, generate_answers
from perpair.eval.judges import UNCACHED, ApiChatJudge, LocalChatJudge
from perpair.eval.sources import (
    check_results_owner,
    data_file,
    hub_file,
    is_offline,
    model_identity,
    name_of_file,
    read_jsonl,
    write_json_records,
)

LOCAL_QUESTIONS = "question_v0.1.jsonl.gz"
LOCAL_BASELINE = "baseline_answers_gpt-4-0314.jsonl.gz"
# arena-hard-auto v0.1's answer length cap (config/gen_answer_config.yaml: max_tokens 4096): an answer cut shorter
# loses games to a baseline that was not
MAX_NEW_TOKENS = 4096


class ArenaHardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    name: str | None = None
    output_dir: Path
    judge: JudgeConfig
    generation: GenerationConfig = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    questions: Path | None = Field(None, description="question.jsonl(.gz) of Arena-Hard-Auto v0.1.")
    baseline_answers: Path | None = Field(None, description="The gpt-4-0314 answers (model_answer format).")
    limit: int | None = Field(None, ge=1)
    judge_max_tokens: int = Field(4096, ge=1, description="arena-hard-auto's judge max_tokens.")
    style_control: bool = False
    n_rounds: int = Field(N_BOOTSTRAP, ge=1)
    offline: bool | None = Field(None, description="The questions and baseline answers from the paths given or "
                                 "data_dir, never from the Hub (None: online unless HF_HUB_OFFLINE=1).")
    data_dir: Path | None = Field(None, description="Offline copies, laid out as ../shared/data/arena_hard.")


# The v0.1 files on the Hub (the dataset repository arena-hard-auto's README clones) and their offline copies.
HUB_REPO = "lmarena-ai/arena-hard-auto"
HUB_QUESTIONS = "data/arena-hard-v0.1/question.jsonl"
HUB_BASELINE = f"data/arena-hard-v0.1/model_answer/{BASELINE}.jsonl"


def _source(given: Path | None, hub_name: str, local_name: str, config: ArenaHardConfig) -> tuple[Path, str]:
    """A file given on the command line, else the Hub (online), else the data folder's copy (offline); with
    where it came from (a Hub file: at the commit main points to, which the source names)."""
    if given is not None:
        return data_file(given, None, local_name), str(given)
    if not is_offline(config.offline):
        hint = "pass --questions and --baseline-answers, or --offline with --data-dir"
        return hub_file(hub_name, repo_id=HUB_REPO, hint=hint)
    local = data_file(None, config.data_dir, local_name)
    if local is None:
        raise PerpairError(f"offline, Arena-Hard needs --questions and --baseline-answers (question.jsonl, and the "
                           f"{BASELINE} answers of arena-hard-auto v0.1), or --data-dir (a folder holding "
                           f"{LOCAL_QUESTIONS} and {LOCAL_BASELINE})")
    return local, f"local:{local}"


def load_questions(config: ArenaHardConfig) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """``(questions, baseline answer by question_id, sources)``."""
    questions_path, questions_from = _source(config.questions, HUB_QUESTIONS, LOCAL_QUESTIONS, config)
    baseline_path, baseline_from = _source(config.baseline_answers, HUB_BASELINE, LOCAL_BASELINE, config)
    questions = read_jsonl(Path(questions_path))
    if not questions:  # else the run went on to a model, an empty answers file and "no verdict in 0 games"
        raise InputError("no questions", file=str(questions_path))
    baseline = {}
    for i, row in enumerate(read_jsonl(Path(baseline_path))):
        try:
            question, content = row["question_id"], row["choices"][0]["turns"][0]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError("expected question_id and choices[0].turns[0].content", file=str(baseline_path),
                             row=i + 1) from None
        if not isinstance(question, str | int) or isinstance(question, bool):  # (a list: a TypeError traceback)
            raise InputError(f"expected a string or an integer, got {type(question).__name__}",
                             file=str(baseline_path), row=i + 1, field="question_id")
        if question in baseline:  # the last one was taken, without a word: which answer is the baseline's is unknown
            raise InputError(f"a second answer to question {question}", file=str(baseline_path), row=i + 1,
                             field="question_id")
        baseline[question] = content
        if not isinstance(content, str):
            raise InputError(f"expected a string, got {type(content).__name__}", file=str(baseline_path), row=i + 1,
                             field="choices[0].turns[0].content")
    seen = set()
    for i, q in enumerate(questions):
        try:
            text = q["turns"][0]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError("expected turns[0].content (the question)", file=str(questions_path), row=i + 1,
                             field="turns") from None
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}", file=str(questions_path), row=i + 1,
                             field="turns[0].content")
        if not isinstance(q.get("question_id"), str | int) or isinstance(q.get("question_id"), bool):
            raise InputError(f"expected a string or an integer, got {type(q.get('question_id')).__name__}",
                             file=str(questions_path), row=i + 1, field="question_id")
        if q.get("question_id") not in baseline:
            raise InputError(f"no baseline answer for question {q.get('question_id')}", file=str(questions_path),
                             row=i + 1, field="question_id")
        if q["question_id"] in seen:
            raise InputError(f"question {q['question_id']} appears twice", file=str(questions_path), row=i + 1,
                             field="question_id")
        seen.add(q["question_id"])
    sources = {"questions_source": questions_from, "questions_sha256": file_sha256(questions_path),
               "baseline_source": baseline_from, "baseline_sha256": file_sha256(baseline_path)}
    return (questions[:config.limit] if config.limit else questions), baseline, sources


def run_arena_hard(config: ArenaHardConfig,
                   on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    out = Path(config.output_dir)
    with output_lock(out):
        return _run_arena_hard(config, out, on_progress)


def _run_arena_hard(config: ArenaHardConfig, out: Path,
                    on_progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    from perpair.models import resolve_model

    check_results_owner(out / "results.json", "arena_hard_v0.1", "-o/--output")
    progress = on_progress or (lambda stage, done, total: None)
    questions, baseline, sources = load_questions(config)
    model_path = resolve_model(config.model)
    check_judge(config.judge)
    name = config.name or model_label(model_path)
    texts = [q["turns"][0]["content"] for q in questions]
    # the folder's files are rewritten below: a results.json of an earlier run must not stand beside them if this
    # one stops before its own (perpair eval report would show its numbers with this run's answers)
    (out / "results.json").unlink(missing_ok=True)
    with ResultCache(out / "cache.sqlite") as cache:
        answers, n_generated = generate_answers(model_path, config.generation, texts, cache,
                                                lambda d, t: progress("generating", d, t))
        (out / "model_answer.jsonl").write_text("".join(json.dumps(
            {"question_id": q["question_id"], "answer_id": cache_key(name, q["question_id"])[:22], "model_id": name,
             "choices": [{"index": 0, "turns": [{"content": a}]}]}, ensure_ascii=False) + "\n"
            for q, a in zip(questions, answers, strict=True)), encoding="utf-8")

        # game 1: A = baseline, B = model; game 2: A = model, B = baseline
        games = []
        for q, text, answer in zip(questions, texts, answers, strict=True):
            games.append((q["question_id"], False, judge_messages(text, baseline[q["question_id"]], answer)))
            games.append((q["question_id"], True, judge_messages(text, answer, baseline[q["question_id"]])))
        judged, n_judged = _judge_games(config, [g[2] for g in games], cache,
                                        lambda d, t: progress("judging", d, t))
    judgments = [j["judgment"] for j in judged]

    labels = [parse_verdict(j).label for j in judgments]
    records: dict[str, dict[str, Any]] = {}
    for (qid, model_is_a, messages), judgment, label in zip(games, judgments, labels, strict=True):
        # the judge by its model's name, as arena-hard-auto writes it (an API judge's URL named none, and two judges
        # served at one URL passed as one)
        record = records.setdefault(qid, {"question_id": qid, "model": name, "games": [],
                                          "judge": config.judge.model_name if config.judge.is_api else
                                          config.judge.judge})
        record["games"].append({"user_prompt": messages[1]["content"], "judgment": judgment, "score": label,
                                "model_is_a": model_is_a})
    for record, j in zip((g for r in records.values() for g in r["games"]), judged, strict=True):
        record["retried"] = j.get("retried", False)
    (out / "judgment.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()),
                                        encoding="utf-8")
    by_qid = {q["question_id"]: a for q, a in zip(questions, answers, strict=True)}
    battles = battles_from_games([(label, g[1]) for g, label in zip(games, labels, strict=True)],
                                 [style_features(by_qid[g[0]]) for g in games],
                                 [style_features(baseline[g[0]]) for g in games])
    n_empty = sum(UNCACHED in j for j in judged)
    if len(battles) == 0:  # the judgments are written, and cached but for empty replies: nothing done is lost
        raise PerpairError(f"{_NO_VERDICT.format(n=len(games))}{_empty_note(n_empty)}; the judgments are in "
                           f"{out / 'judgment.jsonl'}")
    score = arena_score(battles, style_control=config.style_control, n_rounds=config.n_rounds)
    n_no_verdict = sum(label not in OUTCOME_LABELS for label in labels)
    row = {"benchmark": "arena_hard_v0.1", "name": name, "model": config.model,
           "model_path": model_identity(config.model), "judge": config.judge.judge,
           "judge_name": config.judge.model_name, "judge_max_tokens": config.judge_max_tokens,
           "generation": config.generation.model_dump(mode="json"), "limit": config.limit,
           **score.as_dict(), "n_questions": len(questions), "n_games": len(games),
           "n_no_verdict": n_no_verdict, "n_retried": sum(bool(j.get("retried")) for j in judged),
           "n_empty_reply": n_empty,
           "note": " ".join(filter(None, [_note(len(games), n_no_verdict) + _empty_note(n_empty),
                                          STYLE_NOTE if config.style_control else ""])), **sources,
           "avg_length": int(sum(len(a) for a in answers) / max(len(answers), 1)),
           "n_generated": n_generated, "n_judged": n_judged, "output_dir": str(out)}
    write_json_records(out / "results.json", [row])
    return row


STYLE_NOTE = ("Style control is perpair's own variant (answer length in characters and markdown counts, normalised "
              "differences not centred), not arena-hard-auto's style-controlled score: compare it with other perpair "
              "runs only.")
_NO_VERDICT = ("no verdict: the judge gave none of the five [[...]] labels in any of the {n} games (after the one "
               "retry), so there is no score")


def _note(n_games: int, n_no_verdict: int) -> str:
    if n_no_verdict:
        return f"{n_no_verdict} of {n_games} games without a verdict (after one retry) weigh 0, as in show_result.py"
    return ""


def _empty_note(n_empty: int) -> str:
    """How many of the games without a verdict had an empty reply from an API judge: not cached, so a re-run asks
    again (an empty reply is the server's failure, a reasoning judge out of max tokens or a content filter, not the
    judge's verdict-less judgment)."""
    if not n_empty:
        return ""
    return (f"; {n_empty} of them got an empty reply from the judge (content null or \"\", or a request it "
            "refused: HTTP 400, 413, 422), not cached: a re-run asks the judge again")


def _judge_games(config: ArenaHardConfig, conversations: list[list[dict[str, str]]], cache: ResultCache,
                 progress: Callable[[int, int], None]) -> tuple[list[dict[str, Any]], int]:
    """One ``{"judgment", "retried"}`` per conversation (cached; not a game an API judge's empty reply left without
    a verdict, which is marked ``UNCACHED``), and how many were judged now."""
    identity = [judge_identity(config.judge), config.judge_max_tokens]
    keys = [cache_key(identity, c) for c in conversations]
    results: list[dict[str, Any] | None] = [cache.get("arena_judgment", key) for key in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    done = len(results) - len(todo)
    progress(done, len(results))
    if todo:
        from perpair.models import resolve_model

        judge = (ApiChatJudge(config.judge.client_config()) if config.judge.is_api else
                 LocalChatJudge(resolve_model(config.judge.judge), batch_size=config.judge.batch_size,
                                max_prompt_tokens=config.judge.max_prompt_tokens, dtype=config.judge.dtype))
        step = judge.batch_size if not config.judge.is_api else max(config.judge.concurrency * 4, 32)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            replies = judge.complete([conversations[i] for i in chunk], config.judge_max_tokens)
            # an API judge's empty reply (None): no judgment from the server, not the judge's verdict-less one
            empty = {k for k, t in enumerate(replies) if t is None}
            texts = [t or "" for t in replies]
            # gen_judgment.py: no verdict → one more turn asking for it; the judgment is both turns joined
            retry = [k for k, t in enumerate(texts) if parse_verdict(t).retry]
            if retry:
                follow = [conversations[chunk[k]] + [{"role": "assistant", "content": texts[k]},
                                                     {"role": "user", "content": RETRY_MESSAGE}] for k in retry]
                for k, extra in zip(retry, judge.complete(follow, config.judge_max_tokens), strict=True):
                    if extra is None:
                        empty.add(k)
                    texts[k] = texts[k] + "\n" + (extra or "")
            payloads = [{"judgment": t, "retried": k in retry} for k, t in enumerate(texts)]
            for k in empty:  # a game left without a verdict by an empty reply is asked again by the next run
                if parse_verdict(texts[k]).label not in OUTCOME_LABELS:
                    payloads[k][UNCACHED] = "the judge's reply was empty"
            cache.put_many("arena_judgment", [(keys[i], p) for i, p in zip(chunk, payloads, strict=True)
                                              if UNCACHED not in p])
            for i, p in zip(chunk, payloads, strict=True):
                results[i] = p
            done += len(chunk)
            progress(done, len(results))
    return results, len(todo)  # type: ignore[return-value]


# arena-hard-auto v2.0's judgment rows: questions by uid, each with its category, judged against that category's
# baseline (its labels include forms such as B<A and A<<B), not v0.1's gpt-4-0314
V2_FIELDS = ("uid", "category")


def _check_v01_row(row: dict[str, Any], path: Path, number: int) -> None:
    """A row of arena-hard-auto v0.1's gen_judgment.py (``question_id, model, judge, games``), or refused: a v2.0
    row was scored as one and said to be "vs gpt-4-0314", its baselines being others."""
    for field in V2_FIELDS:
        if field in row:
            raise InputError(f"a row with {field!r}, as arena-hard-auto v2.0 writes its judgments (per-category "
                             f"baselines, not {BASELINE}); arena-hard score reads v0.1's judgments only (question_id, "
                             "model, judge, games)", file=str(path), row=number, field=field)
    if "question_id" not in row:
        raise InputError("no question_id: not a judgment row of arena-hard-auto v0.1 (question_id, model, judge, "
                         "games)", file=str(path), row=number, field="question_id")


def score_judgment_file(path: str | Path, *, n_rounds: int = N_BOOTSTRAP) -> dict[str, Any]:
    """Score an existing judgment file in arena-hard-auto v0.1's layout (``model_judgment/JUDGE/MODEL.jsonl``:
    one line per question with ``model`` and two ``games``, each with its verdict label under ``score``; game 1
    shows the baseline as A, game 2 the model as A) as ``show_result.py`` does: battles weighted by verdict,
    Bradley–Terry score against the baseline, bootstrap 95% interval. Nothing is generated or judged. A row of
    another layout (v2.0's ``uid``, ``category``; no ``question_id``) and a file whose rows name several judges are
    refused by file, row and field."""
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise InputError("no judgments", file=str(path))
    games: list[tuple[str | None, bool]] = []
    models = set()
    judges: dict[str, int] = {}  # the judge each row names → the first row naming it
    for number, row in enumerate(rows, 1):
        _check_v01_row(row, path, number)
        if row.get("judge") is not None:
            judge_of_row = str(row["judge"])
            judges.setdefault(judge_of_row, number)
            if len(judges) > 1:  # one judge per file (model_judgment/JUDGE/MODEL.jsonl): mixed, the score is neither's
                first = next(iter(judges))
                raise InputError(f"judged by {judge_of_row!r}, and row {judges[first]} by {first!r}: judgments of "
                                 "several judges in one file; arena-hard-auto keeps one folder per judge",
                                 file=str(path), row=number, field="judge")
        pair = row.get("games")
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(g, dict) for g in pair):
            raise InputError("expected 'games': a list of the two games' objects", file=str(path), row=number,
                             field="games")
        for game, model_is_a in zip(pair, (False, True), strict=True):
            label = game.get("score")
            if label is not None and not isinstance(label, str):
                raise InputError(f"expected a verdict label such as 'A>B' or null, got {label!r}", file=str(path),
                                 row=number, field="games.score")
            games.append((label, model_is_a))
        if row.get("model") is not None and not isinstance(row["model"], str):  # (a list: a TypeError traceback)
            raise InputError(f"expected the model's name or null, got {type(row['model']).__name__}",
                             file=str(path), row=number, field="model")
        models.add(row.get("model"))
    if len(models) > 1:
        raise InputError(f"judgments of several models in one file ({', '.join(sorted(map(str, models)))}); "
                         "arena-hard-auto keeps one file per model", file=str(path), field="model")
    name = models.pop() or name_of_file(path)
    # the judge the rows name (arena-hard-auto and perpair write it on every row), else the folder's name
    # (model_judgment/JUDGE/MODEL.jsonl): perpair's own judgment.jsonl lies in OUT/arena_hard, no judge's name
    judge = next(iter(judges)) if judges else path.parent.name
    battles = battles_from_games(games)
    if len(battles) == 0:
        raise InputError(_NO_VERDICT.format(n=len(games)), file=str(path))
    score = arena_score(battles, n_rounds=n_rounds)
    n_no_verdict = sum(label not in OUTCOME_LABELS for label, _ in games)
    return {"benchmark": "arena_hard_v0.1", "name": str(name), "judge": judge, **score.as_dict(),
            "n_questions": len(rows), "n_games": len(games), "n_no_verdict": n_no_verdict,
            "note": _note(len(games), n_no_verdict), "file": str(path)}
