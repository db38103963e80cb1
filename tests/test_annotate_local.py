"""The local teacher: a causal LM ranks the label options by likelihood, so every annotation is valid."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, tiny_llama
from perpair.annotate import annotate, calls_path, load_config, read_annotations
from perpair.annotate.schema import CATEGORIES


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


def test_local_teacher_with_a_tiny_model_resumes_from_the_cache(uf_pairs, tmp_path, tiny_model):
    model, tokenizer = tiny_model
    config = load_config(None, teachers=["local:tiny"], limit=12)
    overrides = {"local:tiny": {"model": model, "tokenizer": tokenizer}}
    out = tmp_path / "local.parquet"
    result = annotate(uf_pairs, config, out, teacher_overrides=overrides)
    assert result.status == {"ok": 12} and result.annotated_pairs == 12
    table, _ = read_annotations(out)
    assert set(table.column("category").to_pylist()) <= set(CATEGORIES)
    for row in pq.read_table(calls_path(out)).to_pylist():
        assert row["template"] == "gap-local@v1" and row["magnitude"] in (0.0, 1.0, 2.0, 3.0)
        assert 1 / len(CATEGORIES) <= row["confidence"] <= 1  # the winner's normalised probability
        assert (row["category"] == "mislabeled") == (row["preferred"] == "rejected")
    again = annotate(uf_pairs, config, out, teacher_overrides=overrides)
    assert again.cached == 12


def test_a_model_retrained_at_the_same_path_is_asked_again(uf_pairs, tmp_path):
    """The cache key holds the contents of a local teacher's weights, not only its path: weights rewritten in
    place (a retraining saved to the same folder) are asked again, where the old model's answers were reused."""
    from conftest import rewrite_weights, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "teacher")
    out = tmp_path / "ann.parquet"
    first = run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "3", "-o", out)
    assert "0 from the cache" in first.stdout
    before = pq.read_table(calls_path(out)).column("raw_response").to_pylist()
    assert "3 from the cache" in run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "3",
                                         "-o", out).stdout
    rewrite_weights(folder)
    again = run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "3", "-o", out)
    assert "0 from the cache" in again.stdout
    assert pq.read_table(calls_path(out)).column("raw_response").to_pylist() != before  # the new model's scores


def test_a_chat_template_edited_in_place_is_asked_again(uf_pairs, tmp_path):
    """The local teacher scores the prompt its chat template renders, and the cache key held the weights only: a
    template edited in the model folder (the weights untouched) got the old template's answers from the cache."""
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "teacher", layers=1)
    out = tmp_path / "ann.parquet"
    args = ("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "3", "-o", out)
    assert "0 from the cache" in run_cli(*args).stdout
    before = pq.read_table(calls_path(out)).column("raw_response").to_pylist()
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert "0 from the cache" in run_cli(*args).stdout
    assert pq.read_table(calls_path(out)).column("raw_response").to_pylist() != before  # the new prompts' scores
    assert "3 from the cache" in run_cli(*args).stdout


def test_a_tokenizer_that_splits_a_digit_is_refused_before_the_run(tmp_path, monkeypatch):
    """The local teacher reads each magnitude as one token: a tokenizer that encodes a digit alone as two
    (SentencePiece's "▁", "0": Llama 2, Mistral) ended in a ValueError traceback after the weights loaded, the
    answer cache made. Now check() refuses it, naming the teacher and the model."""
    import perpair.models
    from conftest import save_tiny_llama
    from perpair.annotate.teachers import make_teacher
    from perpair.errors import PerpairError

    folder = save_tiny_llama(tmp_path / "teacher", layers=1)
    real = perpair.models.load_tokenizer

    def splitting(path):
        tokenizer = real(path)

        def encode(text, **options):
            ids = tokenizer(text, **options)["input_ids"]
            return {"input_ids": [tokenizer.eos_token_id, *ids] if text.isdigit() else ids}
        return encode

    config = load_config(None, teachers=[f"local:{folder}"]).teachers[0]
    make_teacher(config).check()  # SmolLM2's tokenizer: one token a digit
    monkeypatch.setattr(perpair.models, "load_tokenizer", splitting)
    with pytest.raises(PerpairError, match=f"teacher local:{folder}: the tokenizer of {folder} encodes the "
                                           "magnitude 0 as more than one token"):
        make_teacher(config).check()


@pytest.mark.slow
@pytest.mark.parametrize("template", ["", " \n"])
def test_a_teacher_whose_chat_template_file_is_empty_is_refused(uf_pairs, tmp_path, template):
    """A chat_template.jinja of 0 bytes gives the tokenizer the template "", which the local teacher took for a
    model without one: it annotated with the plain "User: ..." layout, exit 0; one of whitespace only rendered
    every prompt as blanks, exit 0. Now one error naming the model and the file."""
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "teacher", layers=1)
    (folder / "chat_template.jinja").write_text(template)
    out = tmp_path / "ann.parquet"
    result = run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "2", "-o", out, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: model {folder}: {folder / 'chat_template.jinja'}: the chat template is empty or only whitespace "
        "(every conversation would render as blanks); restore the model's chat template"], result.stderr
    assert not out.exists()


def test_local_smollm2_on_30_pairs(uf_pairs, tmp_path):
    out = tmp_path / "smollm2.parquet"
    started = time.monotonic()
    result = run_cli("annotate", uf_pairs, "--teacher", "local:smollm2", "-o", out, "--limit", "30")
    elapsed = time.monotonic() - started
    table, provenance = read_annotations(out)
    assert table.num_rows == 30 and None not in table.column("category").to_pylist()
    assert provenance["counts"]["ok"] == 30 and "30 pairs annotated" in result.stdout
    print(f"local teacher (SmolLM2-135M, 2 cores): 30 pairs in {elapsed:.1f}s incl. start-up")


@pytest.mark.parametrize(("threads", "expected"), [(None, 1), (2, 2)])  # default on a CPU: one thread
def test_threads_setting_applies_while_scoring_only(uf_pairs, tmp_path, tiny_model, monkeypatch, threads, expected):
    import torch

    from perpair.llm.scoring import OptionScorer

    model, tokenizer = tiny_model
    seen = []
    original = OptionScorer.score

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OptionScorer, "score", spy)
    config = load_config(None, teachers=["local:tiny"], limit=2)
    config = config.model_copy(update={"teachers": [config.teachers[0].model_copy(update={"threads": threads})]})
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = annotate(uf_pairs, config, tmp_path / "t.parquet",
                          teacher_overrides={"local:tiny": {"model": model, "tokenizer": tokenizer}})
        assert result.status == {"ok": 2} and seen and set(seen) == {expected}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_calibration_divides_out_the_content_free_label_prior(tiny_model):
    """Calibrated, the content-free pair itself is a uniform tie over the labels; uncalibrated it is not, and on
    a real pair calibration moves each label's log-probability by exactly the content-free one, in the order the
    pair is shown (a swapped pair's prompt names "B" as preferred: it was divided by the unswapped prompt's prior)."""
    import math

    from perpair.annotate.config import LocalTeacherConfig
    from perpair.annotate.teachers import Call, LocalTeacher
    from perpair.annotate.templates import get_template

    model, tokenizer = tiny_model
    answer = [{"role": "assistant", "content": "N/A"}]
    empty = {"prompt": [{"role": "user", "content": "N/A"}], "chosen": answer, "rejected": answer}
    real = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    calls = [Call(key=f"{name}{'-swapped' * swapped}", pair_id=name, teacher="t", template="gap-local@v1",
                  swapped=swapped, pair=pair) for name, pair in (("empty", empty), ("real", real))
             for swapped in (False, True)]
    results = {}
    for calibrate in (True, False):
        teacher = LocalTeacher(LocalTeacherConfig(model="tiny", calibrate=calibrate), model=model, tokenizer=tokenizer)
        results[calibrate] = {r.key: json.loads(r.raw_response)["category"] for r in teacher.annotate_batch(calls)}
    for empty_key in ("empty", "empty-swapped"):
        assert all(p == pytest.approx(1 / len(CATEGORIES), abs=1e-6) for p in results[True][empty_key].values())
        assert max(results[False][empty_key].values()) > 1 / len(CATEGORIES) + 1e-3
    # on a real pair: softmax(log p(label | pair) - log p(label | content-free pair)), from unrounded scores
    template = get_template("gap-local@v1")
    scorer = teacher._load()
    for swapped in (False, True):
        real_lp, empty_lp = (teacher._score(scorer, [teacher.prompt_text(template, pair, swapped)])[0].logprob
                             for pair in (real, empty))
        weights = [math.exp(a - b) for a, b in zip(real_lp, empty_lp, strict=True)]
        expected = [w / sum(weights) for w in weights]
        got = results[True]["real-swapped" if swapped else "real"]
        assert [got[c] for c in CATEGORIES] == pytest.approx(expected, abs=2e-6)


def test_shards_of_other_model_files_at_the_same_path_do_not_merge(uf_pairs, tmp_path):
    """A shard's provenance named a local teacher by its settings (its path) only: shards annotated by other models
    at one path (another machine's copy, a retraining between shards) merged into one file of two teachers, exit 0.
    The provenance now holds the model's content identity, and merge refuses them."""
    from conftest import rewrite_weights, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "teacher", layers=1)
    shards = [tmp_path / f"ann.{i}.parquet" for i in range(2)]
    for i, shard in enumerate(shards):
        if i == 1:
            rewrite_weights(folder)
        run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "4", "--shard", f"{i}/2", "-o", shard)
    merged = tmp_path / "merged.parquet"
    result = run_cli("annotate", "merge", *shards, "-o", merged, check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: file {shards[1]}: its teachers (their settings, or a local teacher's model files) differs from "
        f"{shards[0]}'s; shards must come from one pairs file and one configuration"], result.stderr
    assert not merged.exists()
    run_cli("annotate", uf_pairs, "--teacher", f"local:{folder}", "--limit", "4", "--shard", "0/2", "-o", shards[0])
    run_cli("annotate", "merge", *shards, "-o", merged)  # the same model's shards merge
