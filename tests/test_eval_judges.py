"""The AlpacaEval judging protocol against the official annotations, and the judge prompt formatting."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from conftest import SHARED_DATA
from perpair.eval.judges import (
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
