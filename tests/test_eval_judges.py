"""The AlpacaEval judging protocol against the official annotations, and the judge prompt formatting."""

from __future__ import annotations

import gzip
import json
import math
import os

import pytest

from conftest import SHARED_DATA, run_cli
from perpair.eval.judges import (
    UNCACHED,
    chatml_to_messages,
    fill_template,
    is_switched,
    judged_preference,
    preference_from_logprobs,
)

AE = SHARED_DATA / "alpaca_eval"
TEMPLATE = (AE / "judge_prompt_alpaca_eval_clf.txt").read_text()


def _logprobs(raw: dict) -> dict[str, float]:
    top = raw["logprobs"]["content"][0]["top_logprobs"]
    out: dict[str, float] = {}
    for entry in top:
        out.setdefault(entry["token"], entry["logprob"])
    return out


@pytest.mark.parametrize("model", ["claude-2.1", "alpaca-7b"])
def test_protocol_reproduces_official_preferences(model):
    """Order (switch seeded on the instruction) + parser (2 − P(m)/(P(m)+P(M)), mapped back) give the published
    preference of every annotation from its raw judge completion."""
    records = json.load(gzip.open(AE / "annotations" / f"{model}.json.gz"))
    checked = 0
    for record in records:
        raw = record["raw_completion"]
        if not isinstance(raw, dict) or record["output_1"] == record["output_2"]:
            continue
        value = judged_preference(_logprobs(raw), is_switched(record["instruction"]))
        assert value == pytest.approx(record["preference"], abs=1e-6), record["instruction"][:60]
        checked += 1
    assert checked > 790
    # both orders occur
    assert 0.3 < sum(is_switched(r["instruction"]) for r in records) / len(records) < 0.7


def test_template_filled_like_alpaca_eval():
    utils = pytest.importorskip("alpaca_eval.utils")
    import pandas as pd

    row = {"instruction": "Say {output_1} twice", "output_1": "x } {y", "output_2": "second {instruction}"}
    ours = fill_template(TEMPLATE, **row)
    official = utils.make_prompts(pd.DataFrame([row]), TEMPLATE)[0][0]
    assert ours == official
    messages = chatml_to_messages(ours)
    assert messages == utils.prompt_to_chatml(official)
    assert [m["role"] for m in messages] == ["system", "user"]


def test_preference_from_logprobs_edge_cases():
    assert preference_from_logprobs({"m": 0.0}) == 1.0  # only m present: P(m) = 1, first output wins
    assert preference_from_logprobs({"M": -0.1}) == 2.0
    assert math.isnan(preference_from_logprobs({"Based": -0.1}))
    assert preference_from_logprobs({"m": math.log(0.25), "M": math.log(0.75)}) == pytest.approx(1.75)
    assert judged_preference({"m": math.log(0.25), "M": math.log(0.75)}, switched=True) == pytest.approx(1.25)


def test_local_judge_and_generation_in_bfloat16_are_their_own_cache_entries(tmp_path):
    """``dtype: bfloat16`` (perpair run's eval.alpaca_eval.dtype) loads the judge's weights in bfloat16, whose
    log-probs are near float32's but not equal, so they are cached apart; so are answers generated in bfloat16.
    ``auto`` is keyed as it resolves (float32 on this CPU)."""
    import torch

    from conftest import save_tiny_llama
    from perpair.eval.alpaca_eval import JudgeConfig, judge_identity, load_judge
    from perpair.eval.generate import GenerationConfig, generation_identity
    from perpair.models import model_fingerprint, tokenizer_identity

    model = str(save_tiny_llama(tmp_path / "judge", layers=1))
    messages = [[{"role": "user", "content": f"Which is better, {a} or {b}? Answer m or M."}]
                for a, b in (("tea", "coffee"), ("a long answer about rivers", "no"))]
    judged = {}
    for dtype in ("auto", "bfloat16"):
        judge = load_judge(JudgeConfig(judge=model, dtype=dtype))
        assert judge.scorer.model.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        judged[dtype] = [[r["logprobs"][t] for t in ("m", "M")] for r in judge.judge(messages)]
    difference = max(abs(a - b) for x, y in zip(judged["auto"], judged["bfloat16"], strict=True)
                     for a, b in zip(x, y, strict=True))
    assert 0 < difference < 0.1
    tokenizer = {"tokenizer": tokenizer_identity(model)}
    assert judge_identity(JudgeConfig(judge=model)) == ["local", model_fingerprint(model), "float32", tokenizer]
    assert judge_identity(JudgeConfig(judge=model, dtype="bfloat16")) == ["local", model_fingerprint(model), "bfloat16",
                                                                          tokenizer]
    # a local judge's prompt bound cuts long prompts: judgments under another bound are others
    assert judge_identity(JudgeConfig(judge=model, max_prompt_tokens=512)) == [
        "local", model_fingerprint(model), "float32", tokenizer, {"max_prompt_tokens": 512}]
    plain = generation_identity("f", GenerationConfig(max_new_tokens=8))
    assert plain["settings"]["dtype"] == "float32"  # auto, as it resolves on a CPU
    assert generation_identity("f", GenerationConfig(max_new_tokens=8, dtype="bfloat16")) != plain


@pytest.mark.component
def test_local_judge_scores_one_prompt_per_pass_on_a_cpu_unless_told(tiny_model_dir):
    """By default a local AlpacaEval judge on a CPU runs its prompts one by one (no padding: faster there); a
    batch size given is kept; both give the same judgments up to float noise."""
    from perpair.eval.judges import LocalLogprobJudge

    instructions = ["Name a colour.", "Write two sentences about the sea and one about the sky, please."]
    prompts = [chatml_to_messages(fill_template(TEMPLATE, text, "an answer", "another, longer answer " * k))
               for k, text in enumerate(instructions, start=1)]
    default, batched = LocalLogprobJudge(str(tiny_model_dir)), LocalLogprobJudge(str(tiny_model_dir), batch_size=3)
    assert (default.batch_size, default.scorer.batch_size) == (1, 1)
    assert (batched.batch_size, batched.scorer.batch_size) == (3, 3)
    for one, many in zip(default.judge(prompts), batched.judge(prompts), strict=True):
        assert one["logprobs"] == pytest.approx(many["logprobs"], abs=1e-4)


def test_the_judge_is_told_each_prompt_with_the_models_output_left_empty(tmp_path, monkeypatch):
    """What the evaluations of one instruction share: the prompt up to the evaluated model's output, wherever the
    official order shows it (first when switched), so a local judge keeps that beginning's cache."""
    import pandas as pd

    from perpair.eval import alpaca_eval
    from perpair.eval.alpaca_eval import JudgeConfig, judge_alpaca_eval
    from perpair.eval.cache import ResultCache

    instructions = [f"Instruction number {i}: say something." for i in range(8)]
    switched = [is_switched(text) for text in instructions]
    assert any(switched) and not all(switched)
    told = []

    class Judge:
        batch_size = 8

        def judge(self, prompts, shared):
            told.extend(zip(prompts, shared, strict=True))
            return [{"logprobs": {"m": -1.0, "M": -0.5}} for _ in prompts]

    monkeypatch.setattr(alpaca_eval, "load_judge", lambda config: Judge())
    reference = pd.DataFrame({"instruction": instructions, "output": [f"baseline {i}" for i in range(8)],
                              "generator": "gpt4"})
    outputs = [f"model answer {i}" for i in range(8)]
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        judge_alpaca_eval(reference, outputs, "m", JudgeConfig(judge="local-model"), TEMPLATE, cache,
                          lambda done, total: None)
    assert len(told) == 8
    for i, (prompt, shared) in enumerate(told):
        content, empty = prompt[1]["content"], shared[1]["content"]
        assert empty == content.replace(outputs[i], "", 1)
        assert (content.index(outputs[i]) < content.index(f"baseline {i}")) == switched[i]


def test_alpaca_eval_command_keeps_the_judge_prefixes_where_told_or_refuses(tmp_path, tiny_model_dir):
    """``perpair eval alpaca-eval --judge-prefix-cache DIR``: the judge prompts' beginnings that do not depend on
    the evaluated model are stored there, and the next evaluation given the folder reads them (it stores nothing
    new). Where the option could not be used (an API judge, several prompts per pass) the command refuses it (exit
    2, one error line, nothing written) instead of ignoring it, and so is a path that cannot be a folder, before any
    answer is generated."""
    from conftest import run_cli

    prefixes = tmp_path / "prefixes"
    common = ("eval", "alpaca-eval", "--model", tiny_model_dir, "--judge", tiny_model_dir, "--limit", "3",
              "--max-new-tokens", "4", "--offline", "--reference", AE / "reference_outputs_gpt4_1106_preview.json.gz",
              "--judge-prompt", AE / "judge_prompt_alpaca_eval_clf.txt", "--difficulty",
              AE / "instruction_difficulty_reconstructed.csv", "--json", "--judge-prefix-cache", prefixes)
    first = json.loads(run_cli(*common, "-o", tmp_path / "first").stdout)
    stored = {path.name: path.stat().st_mtime_ns for path in prefixes.iterdir()}
    assert first["n_judged"] == 3 and len(stored) == 3  # one beginning per instruction
    second = json.loads(run_cli(*common, "--name", "again", "-o", tmp_path / "second").stdout)
    assert second["n_judged"] == 3 and second["win_rate"] == first["win_rate"]
    assert {path.name: path.stat().st_mtime_ns for path in prefixes.iterdir()} == stored

    (tmp_path / "a file").write_text("x")
    for extra, says in ((("--judge", "http://127.0.0.1:9/v1", "--judge-name", "j"), "an API judge"),
                        (("--judge-batch-size", "4"), "--judge-batch-size is 4"),
                        (("--judge-prefix-cache", tmp_path / "a file"), "not a folder"),
                        (("--judge-prefix-cache", tmp_path / "a file" / "sub"), "not a folder")):
        # the option extra gives again taken out of common, with its value (an option given twice is refused)
        at = [i for i, part in enumerate(common) if part in extra and str(part).startswith("--")]
        given = [part for i, part in enumerate(common) if i not in at and i - 1 not in at]
        result = run_cli(*given, *extra, "-o", tmp_path / "refused", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --judge-prefix-cache")
        assert says in lines[0] and not (tmp_path / "refused").exists()


def test_the_vllm_backend_without_vllm_is_one_error_line(monkeypatch):
    """``--backend vllm`` where vLLM is not installed: a message saying so (it was a ModuleNotFoundError)."""
    import importlib.util

    from perpair.errors import PerpairError
    from perpair.eval.generate import GenerationConfig, load_generator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PerpairError, match=r"^backend vllm: vLLM is not installed \(pip install vllm"):
        load_generator("model", GenerationConfig(backend="vllm"))


def test_vllm_shows_the_prompt_transformers_shows_cut_to_max_prompt_tokens(monkeypatch, tiny_model_dir):
    """The vLLM backend sent every prompt whole to ``LLM.chat`` (no ``max_prompt_tokens``), where Transformers keeps
    a long prompt's last ``max_prompt_tokens`` tokens: the same settings gave other answers per backend, or an error
    past the model's length. Now vLLM is given the tokens the Transformers backend generates from."""
    import sys
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from perpair.eval.generate import GenerationConfig, TransformersGenerator, VLLMGenerator

    seen: dict = {}

    class LLM:  # vLLM is not installed here: a stand-in that records what it is given
        def __init__(self, model, dtype):
            self.tokenizer = AutoTokenizer.from_pretrained(model)

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, inputs, params, use_tqdm=True):
            seen["generate"] = inputs
            return [SimpleNamespace(outputs=[SimpleNamespace(text=" answer ")]) for _ in inputs]

        def chat(self, conversations, params, use_tqdm=True):
            seen["chat"] = conversations
            return [SimpleNamespace(outputs=[SimpleNamespace(text=" answer ")]) for _ in conversations]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    config = GenerationConfig(max_new_tokens=2, max_prompt_tokens=48)
    prompts = [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "one two three four " * 20}]]
    assert VLLMGenerator(str(tiny_model_dir), config).generate(prompts) == ["answer", "answer"]

    transformers = TransformersGenerator(str(tiny_model_dir), config)
    shown = []
    real = transformers.model.generate
    monkeypatch.setattr(transformers.model, "generate", lambda **kw: shown.append(kw) or real(**kw))
    transformers.generate(prompts)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(shown[0]["input_ids"], shown[0]["attention_mask"],
                                                              strict=True)]
    assert "chat" not in seen and [p["prompt_token_ids"] for p in seen["generate"]] == rows
    assert len(rows[1]) == 48 and len(rows[0]) < 48  # the long prompt lost its beginning, the short one nothing


def test_eval_commands_refuse_api_judge_options_for_a_local_judge_and_bad_output_folders(tmp_path, tiny_model_dir):
    """--judge-name, --judge-api-key-env and --judge-concurrency are read by an API judge only: given with a local
    judge they are refused (they used to be ignored); so are -o '' and a file where the output folder goes. Exit
    2, one error line, nothing written."""
    from conftest import run_cli

    (tmp_path / "a file").write_text("x")
    out = tmp_path / "out"
    for command in (("eval", "alpaca-eval"), ("eval", "arena-hard", "run")):
        common = (*command, "--model", tiny_model_dir, "--judge", tiny_model_dir, "--offline")
        for extra, says in ((("--judge-name", "foo", "--judge-api-key-env", "NOPE", "-o", out),
                             "--judge-name, --judge-api-key-env: options of an API judge"),
                            (("--judge-concurrency", "3", "-o", out), "--judge-concurrency: an option of an API"),
                            (("-o", ""), "-o/--output: an empty path"),
                            (("-o", tmp_path / "a file"), "a file, not a folder")):
            result = run_cli(*common, *extra, check=False)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert says in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]
    # and the other way round: a local judge's batch size given to an API judge (it sends requests one prompt each)
    for command in (("eval", "alpaca-eval"), ("eval", "arena-hard", "run")):
        result = run_cli(*command, "--model", tiny_model_dir, "--judge", "http://127.0.0.1:9/v1", "--judge-name",
                         "j", "--judge-batch-size", "4", "--offline", "-o", out, check=False)
        assert result.returncode == 2 and result.stderr.strip() == (
            "error: --judge-batch-size: an option of a local judge, and --judge http://127.0.0.1:9/v1 is an API "
            "judge (requests in flight: --judge-concurrency); drop it"), result.stderr
    result = run_cli("eval", "alpaca-eval", "--model", tiny_model_dir, "--judge", "http://127.0.0.1:9/v1",
                     "--judge-name", "j", "--judge-prefix-cache", tmp_path / "prefixes", "--offline", "-o", out,
                     check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --judge-prefix-cache: an option of a local judge, and --judge http://127.0.0.1:9/v1 is an API "
        "judge (requests in flight: --judge-concurrency); drop it"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_an_evaluation_into_a_folder_another_one_is_writing_is_refused(tmp_path, tiny_model_dir):
    """Two evaluations into one folder at once (two judges of one model share its default folder) interleaved
    their files: one's answers beside the other's judgments and results.json, exit 0 for both. The second is now
    refused before it reads or writes anything, naming the folder and the process writing it."""
    from conftest import run_cli
    from perpair.artifacts import folder_lock

    out, ae = tmp_path / "out", SHARED_DATA / "alpaca_eval"
    inputs = ("--reference", ae / "reference_outputs_gpt4_1106_preview.json.gz", "--judge-prompt",
              ae / "judge_prompt_alpaca_eval_clf.txt", "--data-dir", ae, "--limit", "2", "--max-new-tokens", "4")
    for command, extra in ((("eval", "alpaca-eval"), inputs), (("eval", "arena-hard", "run"), ())):
        with folder_lock(out, "held", "by the test"):  # what a running evaluation holds
            result = run_cli(*command, "--model", tiny_model_dir, "--judge", tiny_model_dir, "--offline", *extra,
                             "-o", out, check=False)
            assert sorted(p.name for p in out.iterdir()) == [".lock"]
        assert result.returncode == 2 and result.stderr.strip() == (
            f"error: -o/--output {out}: another evaluation is writing it (process {os.getpid()}); wait for it to "
            "finish, or give this one another folder (-o)"), result.stderr
        assert not out.exists()  # (the holder made it and left it empty)


def test_run_config_refuses_judge_options_the_judge_would_ignore():
    from pydantic import ValidationError

    from perpair.pipeline.config import AlpacaEvalSection

    with pytest.raises(ValidationError, match="judge_batch_size: a key of a local judge, and judge http://h/v1 is an "
                                              "API judge; drop it"):
        AlpacaEvalSection(judge="http://h/v1", judge_name="m", judge_batch_size=2)
    with pytest.raises(ValidationError, match="judge_name, judge_api_key_env: keys of an API judge, and judge "
                                              "smollm2 is a local judge; drop them"):
        AlpacaEvalSection(judge="smollm2", judge_name="m", judge_api_key_env="K")
    assert AlpacaEvalSection(judge="smollm2", judge_batch_size=2).judge_batch_size == 2  # each where it applies
    assert AlpacaEvalSection(judge="http://h/v1", judge_name="m").judge_name == "m"
    # an API judge without the model name the server expects: refused at validation, not after the answers
    with pytest.raises(ValidationError, match="http://h/v1 is an API judge: give judge_name"):
        AlpacaEvalSection(judge="http://h/v1")


def test_an_api_judge_without_its_model_name_is_refused_before_any_answer(tiny_model_dir, tmp_path):
    """`perpair eval arena-hard run --judge URL` without --judge-name (the README's own example) generated every
    answer, then stopped at the judge: the name is now asked for before the model is loaded."""
    for command, data in ((("eval", "alpaca-eval"), AE), (("eval", "arena-hard", "run"), SHARED_DATA / "arena_hard")):
        out = tmp_path / command[-1]
        result = run_cli(*command, "--model", tiny_model_dir, "--judge", "http://127.0.0.1:9/v1", "--offline",
                         "--data-dir", data, "--limit", "1", "--max-new-tokens", "2", "-o", out, check=False)
        assert result.returncode == 2 and result.stderr == (
            "error: --judge http://127.0.0.1:9/v1 is an API judge: give --judge-name, the model name the server "
            "expects\n"), result.stderr
        assert not out.exists()


def test_a_chat_template_edited_in_place_is_generated_and_judged_again(tmp_path):
    """The weights' fingerprint does not cover the tokenizer: an evaluated model or a judge whose chat template
    is edited in place (the same weights) shows other prompts, so its cached answers and judgments are not reused."""
    from transformers import AutoTokenizer

    from conftest import save_tiny_llama
    from perpair.eval.alpaca_eval import JudgeConfig, judge_identity
    from perpair.eval.cache import ResultCache
    from perpair.eval.generate import GenerationConfig, generate_answers

    model = str(save_tiny_llama(tmp_path / "model", layers=1))
    config = GenerationConfig(max_new_tokens=2, batch_size=2)
    before = judge_identity(JudgeConfig(judge=model))
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        assert generate_answers(model, config, ["Hi.", "Name a colour."], cache)[1] == 2
        assert generate_answers(model, config, ["Hi.", "Name a colour."], cache)[1] == 0  # cached
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### Answer:"
        tokenizer.save_pretrained(model)
        assert generate_answers(model, config, ["Hi.", "Name a colour."], cache)[1] == 2
    assert judge_identity(JudgeConfig(judge=model)) != before


def test_answers_are_cached_per_backend_and_dtype_as_they_resolve(tmp_path, monkeypatch, tiny_model_dir):
    """Answers generated by Transformers were served to a run that asked for (or resolved auto to) vLLM, and answers
    generated in float32 on a CPU to dtype auto on a GPU (bfloat16): the cache key held neither. Now both are in it,
    as they resolve on the machine that generates."""
    import importlib.util

    import torch

    from perpair.eval import generate
    from perpair.eval.cache import ResultCache
    from perpair.eval.generate import GenerationConfig, generate_answers

    class StandIn:  # vLLM is not installed here, and no GPU: what would answer there
        name = "stand-in"

        def generate(self, prompts):
            return ["other"] * len(prompts)

    texts = ["Hi.", "Name a colour."]
    model = str(tiny_model_dir)
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        assert generate_answers(model, GenerationConfig(max_new_tokens=2, batch_size=2), texts, cache)[1] == 2
        loads = []
        monkeypatch.setattr(generate, "load_generator", lambda m, c: loads.append(c.backend) or StandIn())
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm"
                            else find_spec(name, *a))
        # vLLM installed: backend vllm, and auto on a GPU machine, are vLLM's answers, not the cached ones
        assert generate_answers(model, GenerationConfig(max_new_tokens=2, batch_size=2, backend="vllm"), texts,
                                cache) == (["other", "other"], 2)
        transformers = GenerationConfig(max_new_tokens=2, batch_size=2, backend="transformers")
        assert generate_answers(model, transformers, texts, cache)[1] == 0  # the first answers: Transformers, float32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert generate_answers(model, transformers, texts, cache)[1] == 2  # auto is bfloat16 there
        monkeypatch.setattr(generate, "_has_cuda", lambda: True)
        assert generate_answers(model, GenerationConfig(max_new_tokens=2, batch_size=2), texts, cache)[1] == 0
    assert loads == ["vllm", "transformers"]


def test_alpaca_eval_results_record_the_settings_and_count_the_unjudged(tmp_path, monkeypatch, tiny_model_dir):
    """results.json says what produced it (the API judge's model name, not only its URL; the generation settings;
    the limit), and an instruction the judge gave no usable answer for is counted and said, not silently dropped."""
    from perpair.eval import alpaca_eval
    from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, run_alpaca_eval
    from perpair.eval.generate import GenerationConfig

    class Judge:
        batch_size = 8

        def judge(self, prompts, shared):  # the first prompt without m or M among the tokens: no judgment
            return [{"logprobs": {} if k == 0 else {"m": -1.0, "M": -0.5}} for k in range(len(prompts))]

    monkeypatch.setattr(alpaca_eval, "load_judge", lambda config: Judge())
    config = AlpacaEvalConfig(model=str(tiny_model_dir), output_dir=tmp_path / "ae", limit=3, offline=True,
                              data_dir=AE, judge=JudgeConfig(judge="http://127.0.0.1:9/v1", model_name="judge-x"),
                              generation=GenerationConfig(max_new_tokens=2, batch_size=3))
    row = run_alpaca_eval(config)
    saved = json.loads((tmp_path / "ae" / "results.json").read_text())[0]
    for result in (row, saved):
        assert (result["judge"], result["judge_name"], result["limit"]) == ("http://127.0.0.1:9/v1", "judge-x", 3)
        assert result["generation"]["max_new_tokens"] == 2 and result["generation"]["temperature"] == 0.0
        assert (result["n_total"], result["n_unjudged"]) == (2, 1)
        assert result["judgment_note"].startswith("1 of 3 instructions have no judgment")


def test_a_run_that_stops_leaves_no_earlier_results_beside_its_files(tmp_path, monkeypatch, tiny_model_dir):
    """A results.json of an earlier run in the output folder is removed before the new run rewrites the folder's
    files: if the new one stops (here: no judgment at all), perpair eval report cannot show the old numbers with
    the new run's answers."""
    from perpair.errors import PerpairError
    from perpair.eval import alpaca_eval
    from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, run_alpaca_eval
    from perpair.eval.generate import GenerationConfig

    class Judge:
        batch_size = 8

        def judge(self, prompts, shared):
            return [{"logprobs": {}} for _ in prompts]

    monkeypatch.setattr(alpaca_eval, "load_judge", lambda config: Judge())
    out = tmp_path / "ae"
    out.mkdir()
    (out / "results.json").write_text(json.dumps([{"benchmark": "alpaca_eval_2", "name": "earlier", "win_rate": 50}]))
    config = AlpacaEvalConfig(model=str(tiny_model_dir), output_dir=out, limit=2, offline=True, data_dir=AE,
                              judge=JudgeConfig(judge="http://127.0.0.1:9/v1", model_name="judge-x"),
                              generation=GenerationConfig(max_new_tokens=2, batch_size=2))
    with pytest.raises(PerpairError, match="no judged instruction"):
        run_alpaca_eval(config)
    assert (out / "model_outputs.json").is_file() and not (out / "results.json").exists()


def test_an_api_judge_without_top_logprobs_gives_no_judgment_not_a_certain_one():
    """A server that returns the sampled token's log-probability but no top_logprobs: P(m) and P(M) are unknown.
    Reading the sampled token alone made a temperature-1 sample a preference of exactly 1 or 2."""
    import asyncio
    from types import SimpleNamespace

    from perpair.eval.judges import ApiLogprobJudge

    class Client:
        def __init__(self, entry):
            self.entry = entry

        async def chat(self, messages, **options):
            return SimpleNamespace(logprobs=[self.entry], response={"choices": [{"text": "m"}]})

    judge = ApiLogprobJudge(SimpleNamespace(model="x"))
    alone = asyncio.run(judge._one(Client({"token": "m", "logprob": -0.7}), []))
    assert alone["logprobs"] == {} and math.isnan(judged_preference(alone["logprobs"], switched=False))
    top = [{"token": "M", "logprob": math.log(0.6)}, {"token": "m", "logprob": math.log(0.4)}]
    full = asyncio.run(judge._one(Client({"token": "m", "logprob": math.log(0.4), "top_logprobs": top}), []))
    assert judged_preference(full["logprobs"], switched=False) == pytest.approx(1.6)
    assert UNCACHED in alone and UNCACHED not in full  # the server's settings, not a verdict: asked again next run

    # a request the server refuses (HTTP 400: the prompt over its context) stopped the whole evaluation; now it is
    # that instruction's missing judgment, asked again next run; a wrong key or model name (401, 404), or a server
    # down (retries spent: a 503), would fail every request, and still stops it, with its own words
    from perpair.llm.client import ChatError

    class Refusing:
        def __init__(self, status):
            self.status = status

        async def chat(self, messages, **options):
            raise ChatError(f"HTTP {self.status}: refused", status=self.status, retryable=self.status == 503)

    refused = asyncio.run(judge._one(Refusing(400), []))
    assert refused["logprobs"] == {} and refused[UNCACHED].startswith("the server refused the request: HTTP 400")
    for status in (401, 404, 503):
        with pytest.raises(ChatError, match=f"HTTP {status}"):
            asyncio.run(judge._one(Refusing(status), []))


def test_a_reply_without_top_logprobs_is_asked_again_by_the_next_run(tmp_path, monkeypatch):
    """Such a reply was cached as a null judgment: after the server was set to return top_logprobs, every re-run
    reused the nulls ("no judged instruction") until the cache was deleted. It is not cached; verdicts are."""
    import pandas as pd

    from perpair.eval import alpaca_eval
    from perpair.eval.alpaca_eval import JudgeConfig, judge_alpaca_eval
    from perpair.eval.cache import ResultCache

    calls = []

    class Judge:
        batch_size = 8

        def __init__(self, served):
            self.served = served

        def judge(self, prompts, shared):
            calls.append(len(prompts))
            if self.served:
                return [{"logprobs": {"m": -0.2, "M": -1.0}} for _ in prompts]
            return [{"logprobs": {}, UNCACHED: "the server returned no top_logprobs"} for _ in prompts]

    reference = pd.DataFrame({"instruction": ["a", "b"], "output": ["x", "y"], "generator": ["base", "base"]})
    cache = ResultCache(tmp_path / "cache.sqlite")
    config = JudgeConfig(judge="http://h:9/v1", model_name="j")
    judged = []
    for served in (False, True, True):
        monkeypatch.setattr(alpaca_eval, "load_judge", lambda c, served=served: Judge(served))
        rows, _ = judge_alpaca_eval(reference, ["p", "q"], "m", config, TEMPLATE, cache, lambda d, t: None)
        judged.append([r["preference"] for r in rows])
    assert judged[0] == [None, None] and None not in judged[1] and judged[2] == judged[1]
    assert calls == [2, 2]  # the third run read the verdicts from the cache


def test_a_refused_option_value_is_named_by_its_option(tmp_path):
    """The eval commands named a refused value by its config field (`limit: ...`, `batch_size: ...`), where prepare
    and the help name the option (`--limit`); a judge's fields are its --judge-* options."""
    for args, says in ((("eval", "preference", "--model", "m", "--ref", "m", "--data", tmp_path / "p.parquet",
                         "--limit", "0"), "--limit: Input should be greater than or equal to 1 (got 0)"),
                       (("eval", "alpaca-eval", "--model", "m", "--judge", "m", "--max-new-tokens", "0"),
                        "--max-new-tokens: Input should be greater than or equal to 1 (got 0)"),
                       (("eval", "alpaca-eval", "--model", "m", "--judge", "m", "--judge-batch-size", "0"),
                        "--judge-batch-size: Input should be greater than or equal to 1 (got 0)"),
                       (("eval", "arena-hard", "run", "--model", "m", "--judge", "http://h/v1", "--judge-name", "j",
                         "--judge-concurrency", "0"), "--judge-concurrency: Input should be greater than or equal"),
                       (("bench", "controlled", "--quick", "--seeds", "0", "-o", tmp_path / "b"),
                        "--seeds: Input should be greater than or equal to 1 (got 0)")):
        result = run_cli(*args, check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"error: invalid options: {says}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_reference_file_given_is_checked_against_the_official_rows_before_its_lc(tmp_path, monkeypatch,
                                                                                   tiny_model_dir):
    """The annotations' rows are the reference file's, and the LC reads each instruction's difficulty by its row
    position. perpair run has no --data-dir, so a reference file of its config was never checked: a file in another
    order got an LC of other instructions' difficulties. Now it is checked against the data folder's copy, else the
    Hub's; offline without a data folder it gets no LC (its raw figures stand), and the official file gets its LC."""
    from perpair.eval import alpaca_eval, sources
    from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, run_alpaca_eval
    from perpair.eval.generate import GenerationConfig

    class Judge:
        batch_size = 8

        def judge(self, prompts, shared):
            return [{"logprobs": {"m": -0.2 * (k % 3 + 1), "M": -0.5}} for k in range(len(prompts))]

    monkeypatch.setattr(alpaca_eval, "load_judge", lambda config: Judge())
    official = AE / sources.LOCAL_REFERENCE
    records = json.load(gzip.open(official))[:6]
    reordered = tmp_path / "reference.json"
    reordered.write_text(json.dumps(records[::-1]))

    def evaluate(reference, **options):
        config = AlpacaEvalConfig(model=str(tiny_model_dir), output_dir=tmp_path / "ae", limit=6,
                                  reference=reference, judge_prompt=AE / sources.LOCAL_JUDGE_PROMPT,
                                  difficulty=AE / sources.LOCAL_DIFFICULTY, judge=JudgeConfig(judge="http://h:9/v1",
                                                                                              model_name="j"),
                                  generation=GenerationConfig(max_new_tokens=2, batch_size=6), **options)
        return run_alpaca_eval(config)

    # offline, no data folder (a run's config before): nothing to check the file against, so no LC
    row = evaluate(reordered, offline=True)
    assert row["length_controlled_winrate"] is None or math.isnan(row["length_controlled_winrate"])
    assert row["lc_note"].startswith("no LC") and "cannot be checked" in row["lc_note"] and row["n_total"] == 6
    # with the data folder, or online against the Hub's copy: the first row that differs is named
    row = evaluate(reordered, offline=True, data_dir=AE)
    assert "row 1 is" in row["lc_note"] and math.isnan(row["length_controlled_winrate"])
    fetched = []
    monkeypatch.setattr(sources, "hub_file", lambda filename, **kw: (fetched.append(filename) or official, "hub"))
    row = evaluate(reordered, offline=False)
    assert fetched == [sources.HUB_REFERENCE] and "row 1 is" in row["lc_note"]
    # the official file given: its LC
    row = evaluate(official, offline=False)
    assert 0 < row["length_controlled_winrate"] < 100 and row["lc_method"] == "fit_offline_approximation"


def test_a_results_cache_damaged_of_another_program_or_on_a_full_disk_is_one_error_naming_it(tmp_path):
    """The generations and judgments cache in the output folder: a file that is no database (a cut copy), or
    another program's database, is refused by the command with one line naming it (exit 2, the file untouched), and a
    write the disk has no room for is one error naming it, the results committed before it kept. Each ended in
    sqlite3's traceback."""
    import re
    import sqlite3

    from perpair.errors import PerpairError
    from perpair.eval.cache import ResultCache

    out = tmp_path / "out"
    out.mkdir()
    damaged = out / "cache.sqlite"
    damaged.write_bytes(b"not a database, a file cut short " * 40)
    held = damaged.read_bytes()
    result = run_cli("eval", "alpaca-eval", "--model", "smollm2", "--limit", "2", "--offline", "--reference",
                     AE / "reference_outputs_gpt4_1106_preview.json.gz", "--judge-prompt",
                     AE / "judge_prompt_alpaca_eval_clf.txt", "--data-dir", AE, "--judge", "smollm2", "-o", out,
                     check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: results cache {damaged}: cannot be opened (file is not a database)"], result.stderr
    assert damaged.read_bytes() == held

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE results (id INTEGER, score REAL)")
    held = other.read_bytes()
    with pytest.raises(PerpairError, match=re.escape(
            f"results cache {other}: not a perpair results cache (its results table has the columns id, score); "
            "remove it, or name another output folder")):
        ResultCache(other)
    assert other.read_bytes() == held

    path = tmp_path / "full.sqlite"
    with ResultCache(path) as cache:
        cache.put_many("judgment", [("a", {"preference": 1.0})])
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(PerpairError, match=re.escape(
                f"results cache {path}: cannot be written (database or disk is full)")):
            cache.put_many("generation", [(str(i), "x" * 10_000) for i in range(20)])
    with ResultCache(path) as cache:
        assert cache.get("judgment", "a") == {"preference": 1.0} and cache.get("generation", "0") is None


def test_a_judge_prompt_file_cut_short_or_not_text_is_refused_before_any_answer(tmp_path, tiny_model_dir):
    """An empty judge prompt, or one cut before {output_2}, went on to generate every answer and then stopped with
    an error naming no file, or judged prompts without the model's answer; a cut ChatML block, the same after the
    answers; a file not UTF-8 was "text encoding: ..." naming no file."""
    text = (AE / "judge_prompt_alpaca_eval_clf.txt").read_text()
    prompt = tmp_path / "prompt.txt"
    for content, words in ((b"", "no {instruction}, {output_1}, {output_2}"),
                           (text[:text.index("{output_2}")].encode(), "no {output_2}"),
                           (text.rstrip()[:-5].encode(), "not in ChatML"),
                           (b"\xff\xfe" + text.encode("utf-16-le"), "not UTF-8 text")):
        prompt.write_bytes(content)
        out = tmp_path / "out"
        result = run_cli("eval", "alpaca-eval", "--model", tiny_model_dir, "--limit", "2", "--max-new-tokens", "2",
                         "--offline", "--data-dir", AE, "--judge-prompt", prompt, "--judge", tiny_model_dir, "-o", out,
                         check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"error: file {prompt}: "), result.stderr
        assert words in result.stderr and not out.exists(), result.stderr


def test_an_empty_reference_file_is_refused_naming_it(tmp_path, tiny_model_dir):
    """A reference file holding no outputs (``[]``) was pandas' KeyError traceback, after the output folder was
    made."""
    reference = tmp_path / "reference.json"
    reference.write_text("[]")
    out = tmp_path / "out"
    result = run_cli("eval", "alpaca-eval", "--model", tiny_model_dir, "--max-new-tokens", "2", "--offline",
                     "--data-dir", AE, "--reference", reference, "--judge", tiny_model_dir, "-o", out, check=False)
    assert result.returncode == 2 and result.stderr == f"error: file {reference}: no outputs\n", result.stderr
    assert not out.exists()
    # a generator that is no text: refused after every answer was generated and judged, naming perpair's own
    # annotations file (every run after it ending the same way); now the reference, before any work
    reference.write_text(json.dumps([{"instruction": "Hi", "output": "Hello", "generator": 5}]))
    result = run_cli("eval", "alpaca-eval", "--model", tiny_model_dir, "--max-new-tokens", "2", "--offline",
                     "--data-dir", AE, "--reference", reference, "--judge", tiny_model_dir, "-o", out, check=False)
    assert result.returncode == 2 and result.stderr == (f"error: file {reference}, row 1, field 'generator': "
                                                        "expected a string or null, got int\n"), result.stderr
    assert not out.exists()


def test_a_judge_that_is_no_model_is_refused_before_any_answer(tmp_path, tiny_model_dir, monkeypatch):
    """A local --judge that is no model (a mistyped path) was found out after every answer was generated and
    model_outputs.json written, in words that called it a model: it is refused first, as the judge, exit 2."""
    from perpair.eval import generate

    loaded = []
    monkeypatch.setattr(generate, "load_generator", lambda *args: loaded.append(args) or pytest.fail("generated"))
    missing = tmp_path / "no-such-judge"
    for command, data in ((("eval", "alpaca-eval"), AE), (("eval", "arena-hard", "run"), SHARED_DATA / "arena_hard")):
        out = tmp_path / command[-1]
        result = run_cli(*command, "--model", tiny_model_dir, "--judge", missing, "--offline", "--data-dir", data,
                         "--limit", "1", "--max-new-tokens", "2", "-o", out, check=False)
        assert result.returncode == 2 and result.stderr == (
            f"error: judge model {missing}: no such folder, and not a Hub id (NAME or OWNER/NAME)\n"), result.stderr
        assert not any(p.name in ("model_outputs.json", "model_answer.jsonl") for p in out.glob("*"))
    assert loaded == []
