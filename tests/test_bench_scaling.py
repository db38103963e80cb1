"""The non-timing logic of ``benchmarks/scaling.py``: pairs that fill the max length, the memory watchdog, the
slope and 24 GiB extrapolation, which points a run skips."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import UF_TRAIN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402

MIB = 2**20


@pytest.mark.parametrize("max_length", [128, 512])
def test_pairs_fill_the_max_length_exactly(max_length):
    from transformers import AutoTokenizer

    from perpair.models import resolve_model
    from perpair.train.tokenize import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    pairs = scaling.filled_pairs(tokenizer, scaling.uf_texts(UF_TRAIN), max_length, 3)
    assert len({p["chosen"] for p in pairs}) == 3  # distinct pairs, not one repeated
    for pair in pairs:
        tokenized = tokenize_pair(tokenizer, [{"role": "user", "content": pair["prompt"]}],
                                  [{"role": "assistant", "content": pair["chosen"]}],
                                  [{"role": "assistant", "content": pair["rejected"]}], max_length)
        assert len(tokenized.prompt) + len(tokenized.chosen) == max_length
        assert len(tokenized.prompt) + len(tokenized.rejected) == max_length
        assert len(tokenized.prompt) < max_length // 2  # the responses, not the prompt, fill the length
        untruncated = tokenize_pair(tokenizer, [{"role": "user", "content": pair["prompt"]}],
                                    [{"role": "assistant", "content": pair["chosen"]}],
                                    [{"role": "assistant", "content": pair["rejected"]}], None)
        assert len(untruncated.prompt) + len(untruncated.chosen) > max_length  # the text overshoots: no padding


def _child(megabytes: int) -> subprocess.Popen:
    """A process that allocates (and touches) 20 MiB every 20 ms up to ``megabytes``, then sleeps 1 s."""
    code = (f"import time\nheld = []\nwhile len(held) * 20 < {megabytes}:\n"
            f"    held.append(bytearray(20 * 2**20))\n    time.sleep(0.02)\ntime.sleep(1)\n")
    return subprocess.Popen([sys.executable, "-c", code])


def test_watchdog_kills_a_child_past_its_cap_and_spares_one_below():
    child = _child(600)
    watchdog = scaling.Watchdog(child.pid, 200 * MIB, progress=lambda: "step 3")
    assert child.wait(timeout=10) == -signal.SIGKILL  # left alone, it would exit 0
    assert watchdog.stop() == "out of memory above 0.195 GiB at step 3"

    child = _child(60)
    watchdog = scaling.Watchdog(child.pid, 200 * MIB)
    assert child.wait(timeout=10) == 0
    assert watchdog.stop() is None


def test_slope_and_24_gib_extrapolation_of_a_power_law():
    xs = [256, 512, 1024, 2048]
    ys = [1.5 + 0.002 * x**1.5 for x in xs]  # fixed 1.5 GiB + growth ∝ x^1.5
    assert scaling.loglog_slope(xs, [y - 1.5 for y in ys]) == pytest.approx(1.5)
    assert scaling.reaches(xs, ys, 1.5, 24.0) == pytest.approx((22.5 / 0.002) ** (1 / 1.5))
    assert scaling.reaches(xs, [2.0, 2.0, 2.0, 2.0], 1.5, 24.0) is None  # no growth: never reached
    assert scaling.reaches(xs, [1.5 + 1e-3 * x**0.05 for x in xs], 1.5, 24.0) == math.inf


def test_points_above_an_out_of_memory_point_are_not_run():
    killed = scaling.Point("135M", "trl", 1024, 2)
    results = {killed: {"killed": "out of memory above 14 GiB at step 1"}}
    assert "out of memory" in scaling.blocked_by(scaling.Point("135M", "trl", 2048, 2), results)
    assert scaling.blocked_by(scaling.Point("135M", "perpair", 2048, 2), results) is None  # other implementation
    assert scaling.blocked_by(scaling.Point("135M", "trl", 512, 2), results) is None  # shorter
    assert scaling.blocked_by(scaling.Point("360M", "trl", 2048, 2), results) is None  # other model


def test_progress_names_the_step_of_each_implementation(tmp_path):
    (tmp_path / "stderr").write_text("loading\nstep 1\nstep 2\n")
    assert scaling.progress_of(tmp_path) == "step 2"  # TRL's worker
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert scaling.progress_of(tmp_path) == "step 3"  # perpair: two steps done, the third running
