"""The train stage's batches: the one greedy packer (steps and the reference pass), and that a packed row holds
the pairs' tokens and nothing else (no padding)."""

from __future__ import annotations

import pytest

from perpair.train.batches import greedy_groups
from perpair.train.logprobs import pack
from perpair.train.tokenize import TokenizedPair


@pytest.mark.parametrize(("sizes", "budget", "groups"), [
    ([3, 4, 2, 5], 0, [[0], [1], [2], [3]]),  # 0: one item per group
    ([3, 4, 2, 5], 7, [[0, 1], [2, 3]]),  # 3 + 4 = 7 fits exactly; 2 + 5 = 7 too
    ([3, 4, 2, 5], 6, [[0], [1, 2], [3]]),
    ([9, 1, 1], 5, [[0], [1, 2]]),  # larger than the budget: a group of its own
    ([], 5, []),
])
def test_greedy_groups_by_hand(sizes, budget, groups):
    assert greedy_groups(sizes, budget) == groups


def test_a_packed_row_holds_exactly_the_pairs_tokens():
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([7], [8, 9, 10], [11, 12]),
             TokenizedPair([], [13], [14, 15])]
    packed = pack(pairs)
    assert packed.input_ids.shape == (1, sum(p.tokens for p in pairs)) == (1, 15)
    assert packed.input_ids[0].tolist() == list(range(1, 16))  # every token once, in order: nothing padded


class _Tokenizer:
    """A chat template of one token per message (enough for build_step_batches: every pair fits)."""

    def apply_chat_template(self, messages, tokenize, return_dict, add_generation_prompt):
        return {"input_ids": list(range(len(messages) + add_generation_prompt))}


@pytest.mark.parametrize("steps", [None, 12])
def test_a_step_across_two_shuffled_epochs_never_holds_a_pair_twice(steps):
    """--shuffle reshuffles every epoch, and a step that spans two takes the new order's first pairs: those already
    in the step wait until it is full (they repeated in it), and every epoch still trains every pair once."""
    import numpy as np
    import pyarrow as pa

    from perpair.train import load_config
    from perpair.train.batches import PairData, build_step_batches, shuffled

    n, batch = 7, 4
    message = [{"role": "user", "content": "x"}]
    table = pa.table({"prompt": [message] * n, "chosen": [message] * n, "rejected": [message] * n})
    repeated = 0
    for seed in range(20):
        config = load_config(None, {"model": "m", "data": "d.parquet", "out": "o", "steps": steps,
                                    "batch_size": batch, "shuffle": True, "seed": seed})
        order = shuffled(np.arange(n), seed)
        data = PairData(None, table, [str(i) for i in range(n)], np.full(n, 0.1), np.zeros(n), np.zeros(n, int),
                        np.zeros(n, bool), None, order, "shuffled")
        result = build_step_batches(config, data, _Tokenizer())
        assert all(len(set(step)) == batch for step in result.steps), result.steps
        sequence = [row for step in result.steps for row in step]
        assert sequence[:n] == order.tolist()  # the first epoch in its order
        for start in range(0, len(sequence) - n + 1, n):  # each whole epoch: every pair once
            assert sorted(sequence[start:start + n]) == list(range(n))
        # how often the next epoch's plain order would have put a pair twice into the step spanning the two
        tail = sequence[n - n % batch:n]
        repeated += bool(set(tail) & set(shuffled(order, [seed, 1])[:batch - len(tail)].tolist()))
    assert repeated  # the case arose


class _CharTokenizer:
    """A chat template of one token per character of each message, and one for the generation prompt."""

    def apply_chat_template(self, messages, tokenize, return_dict, add_generation_prompt):
        ids = [ord(c) for m in messages for c in m["content"]]
        return {"input_ids": ids + [0] * add_generation_prompt}


def test_pairs_trained_with_a_response_cut_to_max_length_are_counted():
    """keep_start truncation cuts prompt + response to max_length; the run counts the pairs it trains cut (the
    summary's truncated_pairs), apart from those whose prompt fills max_length (skipped) and from pairs routed to
    SFT whose long rejected response is never computed."""
    import numpy as np
    import pyarrow as pa

    from perpair.train import load_config
    from perpair.train.batches import PairData, build_step_batches
    from perpair.train.losses import ROUTE_PREFERENCE, ROUTE_SFT

    def turn(role, text):
        return [{"role": role, "content": text}]

    # prompt 4 tokens, max_length 10: room for 6 completion tokens
    rows = [("pppp", "c" * 6, "r" * 6, ROUTE_PREFERENCE),  # fits
            ("pppp", "c" * 7, "r" * 2, ROUTE_PREFERENCE),  # chosen cut
            ("pppp", "c" * 2, "r" * 9, ROUTE_PREFERENCE),  # rejected cut
            ("pppp", "c" * 3, "r" * 9, ROUTE_SFT),  # its rejected response is not trained: not cut
            ("p" * 10, "c", "r", ROUTE_PREFERENCE)]  # the prompt fills max_length: skipped
    table = pa.table({"prompt": [turn("user", r[0]) for r in rows], "chosen": [turn("assistant", r[1]) for r in rows],
                      "rejected": [turn("assistant", r[2]) for r in rows]})
    n = len(rows)
    data = PairData(None, table, [str(i) for i in range(n)], np.full(n, 0.1), np.zeros(n),
                    np.array([r[3] for r in rows]), np.zeros(n, bool), None, np.arange(n), "file order")
    config = load_config(None, {"model": "m", "data": "d.parquet", "out": "o", "batch_size": 2, "max_length": 10})
    result = build_step_batches(config, data, _CharTokenizer())
    assert (result.skipped, result.truncated) == (1, 2)
    assert [len(result.tokenized[i].chosen) for i in range(4)] == [6, 6, 2, 3]
    assert [result.tokenized[i].truncated for i in range(4)] == [False, True, True, False]


class _ThinkingTokenizer:
    """A template whose generation prompt is ``[0, 1]`` (an assistant header, then a "think" token) and which
    renders an assistant message as ``[0] + its characters``, or ``[0, 1] + …`` when it starts with "t" (thought
    out loud): the prompt alone is a prefix of prompt + response only for those."""

    def apply_chat_template(self, messages, tokenize, return_dict, add_generation_prompt):
        ids = []
        for m in messages:
            head = ([0, 1] if m["content"].startswith("t") else [0]) if m["role"] == "assistant" else []
            ids += head + [ord(c) for c in m["content"]]
        return {"input_ids": ids + [0, 1] * add_generation_prompt}


def test_pairs_whose_prompt_the_template_renders_otherwise_are_counted():
    """Where the prompt rendered alone is no prefix of prompt + response (a generation prompt the template drops
    once the answer follows), the pair trains on the common start, as TRL does; the run counts those pairs (the
    summary's prompt_cut_pairs) instead of saying nothing. Both responses must keep the prompt whole."""
    import numpy as np
    import pyarrow as pa

    from perpair.train import load_config
    from perpair.train.batches import PairData, build_step_batches
    from perpair.train.losses import ROUTE_PREFERENCE

    def turn(role, text):
        return [{"role": role, "content": text}]

    rows = [("pp", "tc", "tr"), ("pp", "c", "tr"), ("pp", "tc", "r"), ("pp", "tcc", "trr")]
    table = pa.table({"prompt": [turn("user", r[0]) for r in rows], "chosen": [turn("assistant", r[1]) for r in rows],
                      "rejected": [turn("assistant", r[2]) for r in rows]})
    n = len(rows)
    data = PairData(None, table, [str(i) for i in range(n)], np.full(n, 0.1), np.zeros(n),
                    np.full(n, ROUTE_PREFERENCE), np.zeros(n, bool), None, np.arange(n), "file order")
    config = load_config(None, {"model": "m", "data": "d.parquet", "out": "o", "batch_size": 2, "max_length": 10})
    result = build_step_batches(config, data, _ThinkingTokenizer())
    assert [result.tokenized[i].prompt_cut for i in range(n)] == [False, True, True, False]
    assert result.prompt_cut == 2
    assert result.tokenized[1].prompt == [ord("p")] * 2 + [0]  # the common start: the "think" token left out
    assert result.tokenized[1].rejected == [1, ord("t"), ord("r")]


@pytest.mark.parametrize("template", [None, ""])
def test_a_tokenizer_without_a_chat_template_is_one_error_naming_the_pair(template):
    """sequence_logps (the preference evaluation) tokenizes with the model's chat template as training does: a
    tokenizer without one is one error naming the pair (Transformers' ValueError was a traceback), and so is one
    whose template is empty (a chat_template.jinja of 0 bytes: every conversation was no tokens)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from perpair.errors import PerpairError
    from perpair.models import resolve_model
    from perpair.train.logprobs import tokenize_table

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    tokenizer.chat_template = template
    table = pa.table({"pair_id": ["p1"], "prompt": [[{"role": "user", "content": "hi"}]],
                      "chosen": [[{"role": "assistant", "content": "yes"}]],
                      "rejected": [[{"role": "assistant", "content": "no"}]]})
    with pytest.raises(PerpairError, match="^pair p1: the tokenizer has no chat template"):
        tokenize_table(tokenizer, table, 64)


@pytest.mark.parametrize("template, prompt", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", ""),  # an empty prompt renders as nothing
    # the prompt rendered alone starts otherwise than prompt + response: no token in common
    ("{% if messages[-1].role == 'assistant' %}A: {% else %}Q: {% endif %}{% for m in messages %}{{ m['content'] }}"
     "\n{% endfor %}", "hi"),
])
def test_a_pair_whose_template_renders_no_prompt_token_first_is_refused_naming_it(template, prompt):
    """A pair whose templated conversation has no prompt token before the response would have its first response
    token scored from the position before the pair (another pair's last token in a packed row): refused, naming the
    pair, by training's tokenization and the preference evaluation's alike."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from perpair.errors import PerpairError
    from perpair.models import resolve_model
    from perpair.train.logprobs import tokenize_table

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    tokenizer.chat_template = template
    table = pa.table({"pair_id": ["p1"], "prompt": [[{"role": "user", "content": prompt}]],
                      "chosen": [[{"role": "assistant", "content": "yes"}]],
                      "rejected": [[{"role": "assistant", "content": "no"}]]})
    with pytest.raises(PerpairError, match="^pair p1: the chat template renders no token of the prompt"):
        tokenize_table(tokenizer, table, 64)
