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


def test_an_empty_lora_section_is_refused_not_read_as_full_fine_tuning(tmp_path):
    """`lora:` with its keys commented out is null in YAML: the run trained every weight and wrote OUT/model, exit
    0, where an adapter was meant. Refused, naming the file and key; `lora: {}` is an adapter with the defaults, and
    `--set lora=null` (an override) still turns one off."""
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.parquet\nout: o\nlora:\n  # r: 16\n")
    with pytest.raises(PerpairError, match=f"^file {path}, field 'lora': lora is empty \\(null\\), which trains every "
                                           "weight without an adapter"):
        load_config(path)
    assert load_config(path, parse_overrides(["lora=null"])).lora is None
    path.write_text("model: m\ndata: d.parquet\nout: o\nlora: {}\n")
    assert load_config(path).lora.r == 16


@pytest.mark.parametrize(("update", "message"), [
    ({"loss": "ipo", "label_smoothing": 0.1}, "has no meaning for loss 'ipo'"),
    ({"loss": "simpo", "reference_model": "r"}, "reference-free"),
    ({"loss": "kto"}, "loss 'kto' is unknown"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"tokens_per_forward": 10, "max_length": 512}, "tokens_per_forward"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    # PEFT refused no target only after the reference pass
    ({"lora": {"target_modules": []}}, "lora.target_modules: no module named"),
    ({"lora": {"target_modules": ""}}, "lora.target_modules: no module named"),
])
def test_impossible_combinations_are_refused_at_load_time(update, message):
    with pytest.raises(PerpairError, match=message):
        load_config(None, {**BASE, **update})


def test_an_unknown_loss_is_named_where_it_was_given(tmp_path):
    """`perpair train config.yaml --loss nonsense` blamed the file ("file config.yaml: ... loss 'nonsense' is
    unknown"): the unknown name was checked as a rule across keys, which no key is given for."""
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.parquet\nout: o\n")
    with pytest.raises(PerpairError) as given:
        load_config(path, {"loss": ["sigmoid", "nonsense"]})
    assert str(given.value).endswith("loss 'nonsense' is unknown; choose one of aot, aot_unpaired, apo_down, "
                                     "apo_zero, bco_pair, discopop, exo_pair, hinge, ipo, nca_pair, robust, sft, "
                                     "sigmoid, sigmoid_norm, simpo, sppo_hard (from the command line)")
    assert "train.yaml" not in str(given.value)
    path.write_text("model: m\ndata: d.parquet\nout: o\nloss: nonsense\n")
    with pytest.raises(PerpairError) as written:
        load_config(path, {"steps": 3})
    assert str(written.value).startswith(f"file {path}: ") and "command line" not in str(written.value)


def test_resume_beside_overwrite_is_named_where_they_were_given(tmp_path):
    """`perpair train config.yaml --resume --overwrite` blamed the file, which holds neither."""
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.parquet\nout: o\n")
    with pytest.raises(PerpairError) as given:
        load_config(path, {"resume": True, "overwrite": True})
    assert str(given.value) == ("invalid train config: overwrite: resume continues the run in OUT, overwrite replaces "
                                "it: choose one (from the command line)")
    path.write_text("model: m\ndata: d.parquet\nout: o\nresume: true\noverwrite: true\n")
    with pytest.raises(PerpairError, match=f"^file {path}: invalid train config: overwrite: resume continues"):
        load_config(path, {})


def test_a_key_set_twice_on_the_command_line_is_refused():
    """`--set beta=0.1 --set beta=0.2` kept the last without a word, where a YAML file refuses a key written twice."""
    with pytest.raises(PerpairError, match=r"^override beta: given twice \(--set\); keep one$"):
        parse_overrides(["beta=0.1", "beta=0.2"])
    with pytest.raises(PerpairError, match="override lora: given twice"):
        parse_overrides(["lora.r=8", "lora=null"])
    assert parse_overrides(["lora.r=8", "lora.alpha=4"]) == {"lora": {"r": 8, "alpha": 4}}


def test_bad_override_syntax():
    with pytest.raises(PerpairError, match="expected key=value"):
        parse_overrides(["beta"])
    # a value that is not YAML (`perpair run --set 'data.sources=[a'`): the override named, not a traceback
    with pytest.raises(PerpairError, match=r"^override 'data.sources=\[a': the value is not valid YAML \("):
        parse_overrides(["data.sources=[a"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("steps", "ratio"), [(14, 0.1), (10, 0.1), (7, 0.3), (20, 0.0)])
def test_lr_schedule_is_transformers_for_the_same_warmup_ratio(schedule, steps, ratio, tmp_path):
    """The learning rate of every step equals Transformers' scheduler (what TRL's DPOTrainer runs) given the same
    warmup_ratio: its warm-up steps are the ratio of the steps rounded up (0.1 of 14 is 2, not 1)."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    config = load_config(None, {**BASE, "steps": steps, "warmup_ratio": ratio, "lr_schedule": schedule})
    warmup = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[]).get_warmup_steps(steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(theirs.get_last_lr()[0])
        optimizer.step()
        theirs.step()
    assert config.warmup_steps == warmup
    assert [lr_factor(config, s) for s in range(steps)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_schedule_shapes():
    config = load_config(None, {**BASE, "warmup_ratio": 0.2, "lr_schedule": "cosine"})
    assert [lr_factor(config, s) for s in (0, 1)] == [0.0, 0.5]
    assert lr_factor(config, 2) == 1.0
    assert lr_factor(config, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = load_config(None, {**BASE, "lr_schedule": "linear"})
    assert [lr_factor(linear, s) for s in (0, 5)] == [1.0, 0.5]
    constant = load_config(None, {**BASE, "lr_schedule": "constant"})
    assert {lr_factor(constant, s) for s in range(10)} == {1.0}


@pytest.mark.parametrize(("update", "message"), [
    ({"loss": "sft", "plan": "p.parquet"}, "loss 'sft' .* would ignore the plan"),
    ({"loss": "sigmoid", "simpo_gamma": 1.0}, "simpo_gamma is used by loss 'simpo' only"),
    ({"save_every": 10, "final_checkpoint": False}, "would write no checkpoint"),
    # settings that would change nothing: each was accepted and silently unused
    ({"loss": "sigmoid", "discopop_tau": 0.1}, "discopop_tau is used by loss 'discopop' only"),
    ({"f_alpha_divergence_coef": 0.3}, "f_alpha_divergence_coef is the alpha of f_divergence_type alpha_divergence"),
    ({"f_divergence_type": "forward_kl", "f_alpha_divergence_coef": 0.3}, "not forward_kl; drop it"),
    ({"loss": "sft", "beta": 0.5}, "loss 'sft' .* would ignore beta; drop it"),
    ({"loss": "sft", "f_divergence_type": "forward_kl"}, "loss 'sft' .* would ignore f_divergence_type"),
    ({"loss": "sft", "use_weighting": True, "beta": 0.1}, "would ignore beta and use_weighting; drop them"),
    ({"lean_activations": False, "recompute_mlp": True}, "recompute_mlp applies with lean_activations only"),
    ({"lean_activations": False, "recompute_mlp": False}, "recompute_mlp applies with lean_activations only"),
    ({"loss": "aot", "tokens_per_forward": 5000}, "tokens_per_forward would be ignored: loss 'aot'"),
    ({"lora": {"merge": True}, "save_model": False}, "lora.merge saves the merged model, and save_model false"),
    # read only where another setting asks for them: accepted and silently unused before
    ({"loss": "simpo", "reference_cache": "refs"}, "loss 'simpo' is reference-free; drop reference_cache$"),
    ({"loss": "sft", "reference_model": "r", "reference_cache": "refs"},
     "reference-free; drop reference_model and reference_cache$"),
    ({"project": "mine"}, "project names the run on a tracker's dashboard, and report_to names no tracker"),
    # a warm-up of every step: lr never reached, lr_schedule never read (one step: trained at learning rate 0)
    ({"steps": 1, "warmup_ratio": 0.1}, r"warmup_ratio 0.1 warms up for all 1 steps .*step 1 trains at 0, the only "
                                        "step\\) and lr_schedule linear would never start"),
    ({"steps": 10, "warmup_ratio": 0.95, "lr_schedule": "cosine"}, "warms up for all 10 steps"),
    ({"run_name": "mine", "project": "p"}, "project and run_name name the run .* drop them"),
    # TensorBoard shows no run name (accepted, unused); NumPy's seeds end at 2³² − 1 (a traceback from set_seed)
    ({"run_name": "mine", "report_to": ["tensorboard"]}, "run_name names the run on W&B, Trackio or MLflow"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": 2**32}, "seed: Input should be less than 4294967296"),
])
def test_cross_field_rules_are_refused_when_the_config_is_built(update, message):
    with pytest.raises(PerpairError, match=message):
        load_config(None, {**BASE, **update})


def test_the_rules_accept_their_allowed_neighbours():
    """What each rule refuses differs from an accepted config in one key only (so a rule cannot refuse all)."""
    load_config(None, {**BASE, "loss": "sft"})
    load_config(None, {**BASE, "plan": "p.parquet"})
    load_config(None, {**BASE, "loss": "simpo", "simpo_gamma": 1.0})
    load_config(None, {**BASE, "loss": ["simpo", "sft"], "simpo_gamma": 1.0})  # the combination reads it too
    load_config(None, {**BASE, "loss": "discopop", "discopop_tau": 0.1})
    load_config(None, {**BASE, "loss": ["sigmoid", "discopop"], "discopop_tau": 0.1})
    load_config(None, {**BASE, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3})
    load_config(None, {**BASE, "loss": "sft", "use_weighting": False})
    load_config(None, {**BASE, "loss": ["sigmoid", "sft"], "beta": 0.5, "use_weighting": True,
                       "f_divergence_type": "forward_kl"})  # the sigmoid term reads them
    load_config(None, {**BASE, "lean_activations": True, "recompute_mlp": False})
    load_config(None, {**BASE, "loss": "sigmoid", "tokens_per_forward": 5000})
    load_config(None, {**BASE, "lora": {"merge": True}, "save_model": True})
    load_config(None, {**BASE, "lora": {"merge": False}, "save_model": False})
    load_config(None, {**BASE, "save_every": 10, "final_checkpoint": True})
    load_config(None, {**BASE, "save_every": 9, "final_checkpoint": False})
    load_config(None, {**BASE, "loss": "sigmoid", "reference_cache": "refs"})
    load_config(None, {**BASE, "loss": ["simpo", "sigmoid"], "reference_cache": "refs"})
    load_config(None, {**BASE, "run_name": None})  # unset, as perpair run leaves it without a tracker
    load_config(None, {**BASE, "run_name": "mine", "report_to": ["tensorboard", "wandb"]})
    load_config(None, {**BASE, "seed": 2**32 - 1})
    load_config(None, {**BASE, "steps": 10, "warmup_ratio": 0.9})  # 9 steps warm up, the 10th at lr
    load_config(None, {**BASE, "steps": 1, "warmup_ratio": 0.0})


def test_launch_rules_are_checked_from_the_launch_environment(monkeypatch):
    """torchrun / accelerate launch set WORLD_SIZE and ACCELERATE_USE_FSDP / _DEEPSPEED before perpair starts:
    the config refuses a batch the processes cannot split, and what sharding does not support, at load time."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PerpairError, match=r"batch_size 8 must be a multiple of the number of processes \(3"):
        load_config(None, BASE)
    load_config(None, {**BASE, "batch_size": 9})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    safe = {**BASE, "final_checkpoint": False}
    assert load_config(None, safe).forward_tokens == 0  # the default packing gives way: one pair per forward
    load_config(None, {**safe, "final_checkpoint": True, "save_every": 2, "save_every_minutes": 10, "resume": True})
    for update, message in [({"tokens_per_forward": 2048}, "tokens_per_forward must be 0 under FSDP"),
                            ({"lora": {"merge": True}}, "lora.merge is not supported under FSDP")]:
        with pytest.raises(PerpairError, match=message):
            load_config(None, {**safe, **update})
    load_config(None, {**safe, "lora": {"merge": False}})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(PerpairError, match="DeepSpeed is not supported"):
        load_config(None, safe)


def test_packing_default_is_four_max_lengths_whatever_the_batch(monkeypatch):
    """tokens_per_forward unset packs up to 4 × max_length (twice one pair's most), for any batch size; a value set
    is kept; the longest forward the run can have is what the recompute choice is made for."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for batch in (1, 8, 64):
        config = load_config(None, {**BASE, "batch_size": batch, "max_length": 300})
        assert (config.forward_tokens, config.longest_forward) == (1200, 1200)
    config = load_config(None, {**BASE, "max_length": 300, "tokens_per_forward": 0})
    assert (config.forward_tokens, config.longest_forward) == (0, 600)
    config = load_config(None, {**BASE, "max_length": 300, "tokens_per_forward": 2000})
    assert (config.forward_tokens, config.longest_forward) == (2000, 2000)
    aot = load_config(None, {**BASE, "max_length": 300, "batch_size": 4, "loss": "aot"})
    assert aot.longest_forward == 4 * 600  # a batch-level loss runs the whole step in one forward


def test_reference_cache_keeps_bf16_and_fp32_log_probs_apart(tmp_path):
    """bf16 reference log-probs differ from fp32 ones by up to ~0.5%: a run of one precision never reads the
    other's cache file; fp32 keys are those of earlier versions (existing caches stay valid)."""
    from perpair.train import reference

    common = {"model": "m", "tokenizer": "t", "pairs_sha256": "p", "max_length": 64}
    fp32, bf16 = reference.cache_key(**common), reference.cache_key(**common, precision="bf16")
    assert "precision" not in fp32 and bf16["precision"] == "bf16"
    # bf16 values computed before the output projection ran in bf16 (and CPU attention in fp32) are not served
    assert "autocast_rules" not in fp32 and bf16["autocast_rules"] == reference.AUTOCAST_RULES == 2
    assert reference.cache_path(tmp_path, fp32) != reference.cache_path(tmp_path, bf16)


@pytest.mark.parametrize(("args", "message"), [
    (("--beta", "0.2", "--set", "beta=0.3"), "--beta and --set beta=… both set beta; keep one"),
    (("--loss", "ipo", "--set", "loss=hinge"), "--loss and --set loss=… both set loss; keep one"),
    (("--lora", "--set", "lora=null"), "--lora and --set lora=… both set lora; keep one"),
    (("--set", "seed=1", "--set", "seed=2"), r"override seed: given twice \(--set\); keep one"),
])
def test_an_option_and_a_set_of_the_same_key_are_refused(args, message, tmp_path):
    """The command line's option and its --set of the same key: --set won without a word (the option unread)."""
    from cli_inprocess import run_cli_inprocess

    result = run_cli_inprocess("train", "--model", "m", "--data", "d.parquet", "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message.replace(chr(92), '')}"
    assert not (tmp_path / "o").exists()


def test_lora_and_a_set_of_its_keys_add_up(tmp_path):
    from cli_inprocess import run_cli_inprocess

    # the run goes as far as the model, which does not exist: the options were accepted together
    result = run_cli_inprocess("train", "--model", str(tmp_path / "no-such-model"), "--data", "d.parquet", "--out",
                               str(tmp_path / "o"), "--lora", "--set", "lora.r=8")
    assert result.returncode == 2 and "no such folder" in result.stderr, result.stderr


def test_a_loss_of_sft_terms_alone_is_sft_beside_a_plan_and_in_its_routes(tmp_path):
    """`loss: [sft, sft]` (any weighted sum of sft terms alone) trains every chosen response by SFT, as `loss: sft`
    does. With a plan it was accepted where `sft` is refused, and trained every preference pair's chosen response
    (a flipped pair's rejected one) by SFT, the plan's β and ε never read; a `beta` beside it went unread too; and
    without a plan its pairs ran on the preference route (rejected responses computed, counted as preference)."""
    from perpair.train.batches import load_data
    from perpair.train.losses import ROUTE_SFT
    from plan_helpers import make_pairs

    two = {"loss": ["sft", "sft"], "loss_weights": [1.0, 0.5]}
    with pytest.raises(PerpairError, match=r"loss '1·sft \+ 0.5·sft' trains every pair's chosen response and would "
                                           "ignore the plan's beta"):
        load_config(None, {**BASE, **two, "plan": "p.parquet"})
    with pytest.raises(PerpairError, match=r"loss '1·sft \+ 0.5·sft' .* would ignore beta; drop it"):
        load_config(None, {**BASE, **two, "beta": 0.5})
    load_config(None, {**BASE, "loss": ["sigmoid", "sft"], "plan": "p.parquet"})  # a preference term reads the plan
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0), (7.0, 3.0)])
    data = load_data(load_config(None, {**BASE, **two, "data": str(pairs)}), accelerator=None)
    assert data.route.tolist() == [ROUTE_SFT, ROUTE_SFT]


def test_the_progress_line_shows_float_noise_as_such():
    """`perpair train`'s step line: a reward margin of float noise at the first step (the policy is the reference)
    read "-0.000"; a value too small for three decimals is shown in scientific notation, zero and the rest as before."""
    from perpair.cli.train import _fmt

    assert [_fmt(v) for v in (-5.5e-6, 4e-4, 0.0, 5e-4, 0.6931, -0.25, None)] == \
        ["-5.5e-06", "4.0e-04", "0.000", "0.001", "0.693", "-0.250", "–"]
