"""Option scoring with a tiny randomly initialised causal LM: the KV-cache-sharing, padded, batched path
must equal scoring each full sequence on its own."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from perpair.llm.scoring import OptionScorer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(max_positions=256)


def brute_force(model, scorer, prompt, option, suffix="", then=()):
    ids, opt, suf = scorer.encode(prompt), scorer.encode(option), scorer.encode(suffix) if suffix else []
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids + opt + suf])).logits[0].float(), -1)
    total = sum(float(logp[len(ids) - 1 + j, opt[j]]) for j in range(len(opt)))
    return total, [float(logp[-1, scorer.encode(t)[0]]) for t in then]


PROMPTS = ["Which one?", "A much longer prompt that goes on about many things before it asks. Category:", "x"]


def test_multi_token_options_suffix_and_then_match_brute_force(tiny):
    model, tokenizer = tiny
    scorer = OptionScorer(model, tokenizer, batch_size=2)
    options = [" safety", " instruction_following", " style"]
    results = scorer.score(PROMPTS, options, suffix="\nMagnitude: ", then=["0", "1", "2"])
    for prompt, result in zip(PROMPTS, results, strict=True):
        for k, option in enumerate(options):
            total, then = brute_force(model, scorer, prompt, option, "\nMagnitude: ", ["0", "1", "2"])
            assert result.logprob[k] == pytest.approx(total, abs=1e-4)
            assert result.then_logprob[k] == pytest.approx(then, abs=1e-4)
        assert sum(result.probabilities()) == pytest.approx(1.0)


def test_single_token_fast_path_and_batching_invariance(tiny):
    model, tokenizer = tiny
    one = OptionScorer(model, tokenizer, batch_size=1).score(PROMPTS, ["m", "M"])
    many = OptionScorer(model, tokenizer, batch_size=8).score(PROMPTS, ["m", "M"])
    for prompt, a, b in zip(PROMPTS, one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        expected = brute_force(model, OptionScorer(model, tokenizer), prompt, "m")[0]
        assert a.logprob[0] == pytest.approx(expected, abs=1e-4)


def test_then_needs_single_tokens(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="single tokens"):
        OptionScorer(model, tokenizer).score(["p"], [" a"], then=[" instruction_following"])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_options_of_unequal_length_match_brute_force(tiny, batch_size):
    # The options share one packed pass after the prompt's cache: each must see only the prompt and itself.
    model, tokenizer = tiny
    scorer = OptionScorer(model, tokenizer, batch_size=batch_size)
    options = [" a", " mislabeled no_clear_gap", " b", " instruction_following"]
    for suffix, then in (("\nMagnitude (0-3): ", ["0", "3"]), ("\nnext", None)):
        results = scorer.score(PROMPTS, options, suffix=suffix, then=then)
        for prompt, result in zip(PROMPTS, results, strict=True):
            for k, option in enumerate(options):
                total, then_lp = brute_force(model, scorer, prompt, option, suffix, then or ())
                assert result.logprob[k] == pytest.approx(total, abs=1e-4)
                if then:
                    assert result.then_logprob[k] == pytest.approx(then_lp, abs=1e-4)
                else:
                    assert result.then_logprob is None


def test_a_shared_beginning_is_computed_once_stored_and_read_with_the_same_scores(tiny, tmp_path):
    """Prompts given a ``shared`` beginning run it, then the rest on its cache; the beginning's cache is stored and
    the next call (another process, in perpair run) reads it instead of running it: the same scores to the bit,
    and those of the whole prompt in one pass up to float rounding."""
    from perpair.llm.scoring import PREFIX_MARGIN, PrefixStore, _shared_length

    model, tokenizer = tiny
    head = "Instruction shared by every prompt of this test: compare two answers about rivers and the sea." * 2
    prompts = [head + " Answer: blue.", head + " Answer: a much longer answer, with several more words in it."]
    store = PrefixStore(tmp_path / "kv", ["tiny", "float32"])
    scorer = OptionScorer(model, tokenizer, batch_size=1, prefix_store=store)
    lengths = [len(scorer.encode(p)) for p in prompts]
    begins = _shared_length(scorer.encode(prompts[0]), scorer.encode(head))
    assert begins == len(scorer.encode(head)) - PREFIX_MARGIN > 0
    seen: list[int] = []  # the tokens of each forward pass
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[-1]),
                                           with_kwargs=True)
    try:
        first = scorer.score(prompts, ["m", "M"], shared=[head, head])
        computed, seen[:] = list(seen), []
        again = OptionScorer(model, tokenizer, batch_size=1, prefix_store=store).score(prompts, ["m", "M"],
                                                                                      shared=[head, head])
        read = list(seen)
    finally:
        hook.remove()
    assert computed == [begins, lengths[0] - begins, lengths[1] - begins]  # the second prompt read the first's
    assert read == [lengths[0] - begins, lengths[1] - begins]
    assert len(list((tmp_path / "kv").glob("*.safetensors"))) == 1
    whole = OptionScorer(model, tokenizer, batch_size=1).score(prompts, ["m", "M"])
    for a, b, c in zip(first, again, whole, strict=True):
        assert a.logprob == b.logprob
        assert a.logprob == pytest.approx(c.logprob, abs=1e-4)
    assert PrefixStore(tmp_path / "kv", ["other model", "float32"]).load(scorer.encode(prompts[0])[:begins]) is None
    assert _shared_length(scorer.encode(prompts[0]), scorer.encode("Something else entirely")) == 0
    with pytest.raises(ValueError, match="one prompt per pass"):
        OptionScorer(model, tokenizer, batch_size=2, prefix_store=store).score(prompts, ["m"], shared=[head, head])


def test_a_stored_beginning_cut_short_or_of_another_shape_is_one_error_naming_it(tmp_path):
    """It was safetensors' (or a KeyError's) traceback in the middle of judging."""
    import re

    import torch

    from perpair.errors import PerpairError
    from perpair.llm.scoring import PrefixStore

    store = PrefixStore(tmp_path / "kv", ["tiny", "float32"])
    store.save([1, 2, 3], [(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4))])
    path = store.path([1, 2, 3])
    whole, named = path.read_bytes(), re.escape(f"judge prefix cache {path}: cannot be read")
    assert torch.equal(store.load([1, 2, 3])[0][1], torch.ones(1, 2, 3, 4))
    for damaged in (b"", whole[:40]):
        path.write_bytes(damaged)
        with pytest.raises(PerpairError, match=rf"^{named} .*remove it"):
            store.load([1, 2, 3])
    from safetensors.torch import save_file

    save_file({"other.0": torch.zeros(2), "other.1": torch.zeros(2)}, path)
    with pytest.raises(PerpairError, match=rf"^{named}"):
        store.load([1, 2, 3])
