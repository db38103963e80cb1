"""The train config: YAML + overrides, cross-field checks at load time, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from perpair.errors import PerpairError
from perpair.train import load_config, parse_overrides
from perpair.train.setup import lr_factor

BASE = {"model": "m", "data": "d.parquet", "out": "o", "steps": 10}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.parquet\nout: o\nsteps: 5\nbeta: 0.2\nlora: {r: 8}\n")
    config = load_config(path, parse_overrides(["steps=7", "lora.alpha=4", "lr_schedule=cosine"]))
    assert (config.steps, config.beta, config.lora.r, config.lora.alpha, config.lr_schedule) == (7, 0.2, 8, 4.0,
                                                                                                  "cosine")


@pytest.mark.parametrize(("update", "message"), [
    ({"loss": "ipo", "label_smoothing": 0.1}, "has no meaning for loss 'ipo'"),
    ({"loss": "simpo", "reference_model": "r"}, "reference-free"),
    ({"loss": "kto"}, "loss 'kto' is unknown"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"tokens_per_forward": 10, "max_length": 512}, "tokens_per_forward"),
    ({"lora": {"rank": 4}}, "lora.rank"),
])
def test_impossible_combinations_are_refused_at_load_time(update, message):
    with pytest.raises(PerpairError, match=message):
        load_config(None, {**BASE, **update})


def test_bad_override_syntax():
    with pytest.raises(PerpairError, match="expected key=value"):
        parse_overrides(["beta"])


def test_lr_schedule_shapes():
    config = load_config(None, {**BASE, "warmup_ratio": 0.2, "lr_schedule": "cosine"})
    assert [lr_factor(config, s) for s in (0, 1)] == [0.0, 0.5]
    assert lr_factor(config, 2) == 1.0
    assert lr_factor(config, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = load_config(None, {**BASE, "lr_schedule": "linear"})
    assert [lr_factor(linear, s) for s in (0, 5)] == [1.0, 0.5]
    constant = load_config(None, {**BASE, "lr_schedule": "constant"})
    assert {lr_factor(constant, s) for s in range(10)} == {1.0}
