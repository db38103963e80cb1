"""The loss catalogue through ``perpair train`` on a tiny Llama: a batch-level loss (AOT) sees the whole step in
one call however the step is split into forwards, weighted combinations and f-divergences run from the command
line, and impossible loss settings are one clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli

ARGS = ("--steps", "2", "--batch-size", "4", "--max-length", "96", "--lr", "1e-2", "--threads", "1",
        "--set", "save_model=false", "--set", "final_checkpoint=false")


def _train(model, data, out: Path, *extra, check=True):
    # an option of ARGS that extra gives again is extra's (the command line refuses an option given twice)
    again = {a for a in extra if isinstance(a, str) and a.startswith("--") and a != "--set"}
    pairs = [ARGS[i:i + 2] for i in range(0, len(ARGS), 2)]
    base = [part for pair in pairs if pair[0] not in again for part in pair]
    return run_cli("train", "--model", model, "--data", data, "--out", out, *base,
                   "--set", f"reference_cache={out.parent / 'refcache'}", *extra, check=check)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_aot_sorts_over_the_whole_step_whatever_the_forwards(tiny_model_dir, uf_pairs, tmp_path):
    """The loop hands a batch-level loss all the step's pairs in one forward (per pair, AOT would be sigmoid), so
    a packing budget would change nothing: tokens_per_forward is refused beside it, one pair per forward too."""
    for budget in (0, 2000):
        refused = _train(tiny_model_dir, uf_pairs, tmp_path / f"budget{budget}", "--loss", "aot", "--set",
                         f"tokens_per_forward={budget}", check=False)
        assert refused.returncode == 2 and "tokens_per_forward would be ignored: loss 'aot'" in refused.stderr
    _train(tiny_model_dir, uf_pairs, tmp_path / "one", "--loss", "aot")
    _train(tiny_model_dir, uf_pairs, tmp_path / "dpo", "--loss", "sigmoid")
    one, dpo = (_losses(tmp_path / name) for name in ("one", "dpo"))
    # step 1 starts at the reference (every log-ratio 0: log 2 for both); at step 2 sorting makes AOT differ
    assert one[0] == pytest.approx(math.log(2), abs=1e-6) and dpo[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(one[1] - dpo[1]) > 1e-5  # float32 noise is ~1e-7


def test_a_weighted_combination_with_an_f_divergence_runs(tiny_model_dir, uf_pairs, tmp_path):
    """MPO-like weights with the Jensen–Shannon divergence; at step 1 (policy = reference) sigmoid and hinge are
    known: js scores are log 2 + log σ(0) = 0 for both responses, so 0.5·log 2 + 2·max(0, 1 − 0) = 0.5 log 2 + 2."""
    out = tmp_path / "combo"
    _train(tiny_model_dir, uf_pairs, out, "--loss", "sigmoid,hinge", "--set", "loss_weights=[0.5,2.0]",
           "--set", "f_divergence_type=js_divergence")
    losses = _losses(out)
    assert losses[0] == pytest.approx(0.5 * math.log(2) + 2.0, abs=1e-6)
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(("extra", "message"), [
    (("--loss", "exo_pair"), "loss 'exo_pair' needs label_smoothing > 0"),
    (("--loss", "nca_pair", "--set", "f_divergence_type=forward_kl"), "f_divergence_type forward_kl only applies"),
    (("--loss", "sigmoid,sft", "--set", "loss_weights=[1]"), "loss: 1 loss weights for 2 losses"),
    (("--loss", "sigmoid,kto"), "loss 'kto' is unknown"),
    (("--loss", "sigmoid,sft", "--set", "ld_alpha=0.5"), "ld_alpha weights the preference log-probs"),
    (("--loss", "aot", "--set", "use_weighting=true"), "use_weighting cannot weight 'aot'"),
])
def test_impossible_loss_settings_are_one_clear_error(tiny_model_dir, uf_pairs, tmp_path, extra, message):
    result = _train(tiny_model_dir, uf_pairs, tmp_path / "bad", *extra, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")


def test_ld_dpo_reference_is_cached_apart_from_the_plain_sums(tiny_model_dir, uf_pairs, tmp_path):
    """LD-DPO weights policy and reference alike, so at step 1 (policy = reference) every log-ratio is 0 and the
    loss is log 2, also when a plain run filled the same reference cache before (the LD sums are other values)."""
    _train(tiny_model_dir, uf_pairs, tmp_path / "plain", "--steps", "1")
    _train(tiny_model_dir, uf_pairs, tmp_path / "ld", "--steps", "1", "--set", "ld_alpha=0.3")
    assert _losses(tmp_path / "ld")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(list((tmp_path / "refcache").glob("*.parquet"))) == 2


def test_wpo_weighting_runs_and_scales_the_loss(tiny_model_dir, uf_pairs, tmp_path):
    """WPO at step 1 (policy = reference, so every DPO term is log 2): the loss is log 2 times the mean WPO weight,
    not log 2."""
    _train(tiny_model_dir, uf_pairs, tmp_path / "wpo", "--steps", "1", "--set", "use_weighting=true")
    loss = _losses(tmp_path / "wpo")[0]
    assert math.isfinite(loss) and abs(loss - math.log(2)) > 1e-4
