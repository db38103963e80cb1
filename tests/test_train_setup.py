"""What a run sets up before and around its first step: weights of its own to train, and reference log-probs
from the cache, the reference pass and, for the first step's pairs, that step's own forward."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from perpair.onednn import PackedLinear, supported
from perpair.train import reference as refcache
from perpair.train.batches import build_step_batches, load_data
from perpair.train.config import load_config
from perpair.train.setup import (
    compute_reference,
    first_step_rows,
    load_model,
    load_tokenizer,
    prepare_policy,
    setup_accelerator,
)

CPU = SimpleNamespace(device=torch.device("cpu"))


def _config(model: Path, pairs: Path, tmp_path: Path, **update):
    return load_config(None, {"model": str(model), "data": str(pairs), "out": str(tmp_path / "out"), "steps": 3,
                              "batch_size": 2, "max_length": 64, "threads": 1, "lr": 1e-3,
                              "reference_cache": str(tmp_path / "refcache"), "save_model": False,
                              "final_checkpoint": False, **update})


def _file_mapped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors whose data lies in a file's mapping (``/proc/self/maps``: a nonzero inode)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return [t for t in tensors if any(a <= t.data_ptr() < b for a, b in ranges)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_full_fine_tuning_trains_weights_of_its_own_not_the_checkpoints_mapping(tiny_model_dir, tmp_path):
    """Transformers hands out a safetensors checkpoint's tensors as views of the file's mapping; trained in
    place, every page's first write would be a copy-on-write fault (SmolLM2-135M's first AdamW step: 1.9 s
    instead of 0.09 s). After prepare_policy no trained weight is in a file mapping, the values are the same and
    the tied embedding is still one parameter."""
    model = load_model(str(tiny_model_dir), CPU)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert _file_mapped(list(model.parameters()))  # the premise: loaded as views of the file
    config = load_config(None, {"model": str(tiny_model_dir), "data": "x", "out": str(tmp_path), "steps": 1})
    model = prepare_policy(config, model)
    assert not _file_mapped(list(model.parameters()))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dropout_is_off_by_default_as_in_trl_and_an_adapters_own_stays(tmp_path):
    """TRL's DPOConfig.disable_dropout (default true) sets the model's dropout modules to 0; perpair trained with
    them on (a GPT-2's 0.1): another loss and gradient than TRL's for the same settings, and margins not 0 at step
    1. Now off unless disable_dropout: false; a LoRA adapter's dropout, which the user sets, still applies."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def rates(config_update):
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # the premise
        config = load_config(None, {"model": "m", "data": "x", "out": str(tmp_path), "steps": 1, **config_update})
        model = prepare_policy(config, model)
        return {round(m.p, 6) for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    assert rates({}) == {0.0}
    assert rates({"disable_dropout": False}) == {0.1}
    assert rates({"lora": {"r": 2, "dropout": 0.3, "target_modules": ["c_attn"]}}) == {0.0, 0.3}


def _train(config):
    from perpair.train import train

    result = train(config)
    metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    return result.summary, metrics


def _cache(folder: Path) -> dict[str, tuple]:
    (path,) = folder.glob("*.parquet")
    return refcache.load_cached(path)


def test_first_step_pairs_take_their_reference_from_that_steps_forward(tiny_model_dir, uf_pairs, tmp_path):
    """On an empty cache the reference pass computes only the pairs of steps 2 and 3: at step 1 the policy is the
    reference, so its forward gives those of step 1 (every DPO margin exactly 0: the loss is log 2), and they
    go into the cache, equal to a separate pass's within float rounding. A run on a cache a separate pass
    filled (no pair left to step 1) trains the same numbers."""
    one = _config(tiny_model_dir, uf_pairs, tmp_path / "one")
    summary, metrics = _train(one)
    assert (summary["reference_pairs_computed"], summary["reference_pairs_from_first_step"]) == (4, 2)
    assert metrics[0]["rewards_chosen"] == metrics[0]["rewards_rejected"] == 0  # exactly: the same sums
    assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-7)
    taken = _cache(tmp_path / "one" / "refcache")
    assert len(taken) == 6

    two = _config(tiny_model_dir, uf_pairs, tmp_path / "two")
    accelerator = setup_accelerator(two)
    data = load_data(two, accelerator)
    tokenizer = load_tokenizer(two)
    batches = build_step_batches(two, data, tokenizer)
    separate = compute_reference(two, data, batches, tokenizer, load_model(str(tiny_model_dir), accelerator),
                                 accelerator, from_first_step=False)
    assert (separate.computed, separate.from_first_step) == (6, set())
    passed = _cache(tmp_path / "two" / "refcache")
    assert passed.keys() == taken.keys()
    for pair_id, values in passed.items():
        assert taken[pair_id][1::2] == values[1::2]  # token counts
        assert taken[pair_id][0::2] == pytest.approx(values[0::2], rel=1e-5)

    summary_two, metrics_two = _train(two)
    assert (summary_two["reference_pairs_computed"], summary_two["reference_pairs_from_first_step"]) == (0, 0)
    for a, b in zip(metrics, metrics_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["logps_chosen"] == pytest.approx(b["logps_chosen"], rel=1e-6)


def test_taken_values_of_a_flipped_pair_are_cached_in_its_own_orientation(tiny_model_dir, uf_pairs, tmp_path):
    """A plan may flip a pair (trained with chosen and rejected swapped); the cache keeps every pair as the pairs
    file has it, values and token counts alike."""
    config = _config(tiny_model_dir, uf_pairs, tmp_path, steps=1, max_length=1024)  # responses of their own lengths
    accelerator = setup_accelerator(config)
    data = load_data(config, accelerator)
    data.flipped[data.order[0]] = True
    tokenizer = load_tokenizer(config)
    batches = build_step_batches(config, data, tokenizer)
    model = load_model(str(tiny_model_dir), accelerator)
    run = compute_reference(config, data, batches, tokenizer, model, accelerator)
    rows = batches.steps[0]
    assert run.computed == 0 and run.from_first_step == set(rows)
    values = run.values_for(rows, torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -4.0]))
    assert values.tolist() == [[-1.0, -2.0], [-3.0, -4.0]] and run.save_taken() == 2 and run.save_taken() == 0
    cached = _cache(tmp_path / "refcache")
    flipped, plain = (batches.tokenized[r] for r in rows)
    assert len(flipped.chosen) != len(flipped.rejected)
    assert cached[data.pair_ids[rows[0]]] == (-2.0, len(flipped.rejected), -1.0, len(flipped.chosen))
    assert cached[data.pair_ids[rows[1]]] == (-3.0, len(plain.chosen), -4.0, len(plain.rejected))


@pytest.mark.parametrize(("update", "processes", "model_update", "left"), [
    ({}, 1, {}, True),
    ({"reference_model": "TINY"}, 1, {}, False),  # a reference model given (here a copy of the policy's folder)
    ({}, 2, {}, False),  # each process holds its share of the step only
    ({"lora": {"dropout": 0.1}}, 1, {}, False),  # a random adapter input
    ({"lora": {}}, 1, {}, True),  # an adapter starts as a zero update
    ({}, 1, {"attention_dropout": 0.1}, False),  # a dropout setting, not a module
])
def test_first_step_rows_only_where_the_policy_is_the_reference(tiny_model_dir, uf_pairs, tmp_path, update,
                                                                processes, model_update, left):
    if update.get("reference_model") == "TINY":  # (a local folder: a Hub id would be looked up for its tokenizer)
        update = {"reference_model": str(shutil.copytree(tiny_model_dir, tmp_path / "reference"))}
    config = _config(tiny_model_dir, uf_pairs, tmp_path, **update)
    data = load_data(config, CPU)
    batches = build_step_batches(config, data, load_tokenizer(config))
    model = load_model(str(tiny_model_dir), CPU)
    for name, value in model_update.items():
        setattr(model.config, name, value)
    rows = first_step_rows(config, data, batches, model, processes)
    assert rows == (set(batches.steps[0]) if left else set())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets Linux's resident high-water mark")
def test_peak_memory_is_the_runs_own_not_the_process(tiny_model_dir, uf_pairs, tmp_path):
    """``perpair run`` trains its arms one after another in one process: each summary's peak memory is that run's
    (it used to be the process's ``ru_maxrss``, so an arm after a bigger one reported the bigger one's peak).
    Here 1 GiB written and freed before the run is not in its peak."""
    import mmap

    from perpair.train.loop import peak_memory_bytes

    def rss() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024

    # 1 GiB, every page written, in a mapping of its own: given back when closed under any allocator (tcmalloc,
    # which make test preloads, keeps what malloc freed)
    big = mmap.mmap(-1, 2**30)
    for offset in range(0, 2**30, mmap.PAGESIZE):
        big[offset] = 1
    before_free = rss()
    big.close()
    assert rss() < before_free - 2**29  # given back, so the process's peak is above now
    assert peak_memory_bytes(torch.device("cpu")) >= before_free - 2**26  # (the kernel syncs its counters lazily)
    summary, _ = _train(_config(tiny_model_dir, uf_pairs, tmp_path))
    assert summary["peak_memory_scope"] == "run"
    assert 0 < summary["peak_memory_bytes"] < before_free - 2**29


@pytest.mark.skipif(not supported(torch.float32), reason="oneDNN's prepacked linear is not in this PyTorch build")
@pytest.mark.parametrize("fails", [False, True])
def test_the_reference_pass_over_the_policy_runs_packed_and_gives_the_policy_back_plain(
        tiny_model_dir, uf_pairs, tmp_path, monkeypatch, fails):
    """The reference pass over the policy itself (full fine-tuning) only runs forwards: on a CPU its products go
    through oneDNN's prepacked weights. Training then gets plain ``nn.Linear`` layers without packed copies, also
    when the pass fails; the values are those of the unpacked model within float rounding."""
    from perpair import onednn
    from perpair.train.logprobs import logps_of_tokenized

    config = _config(tiny_model_dir, uf_pairs, tmp_path)
    data = load_data(config, CPU)
    tokenizer = load_tokenizer(config)
    batches = build_step_batches(config, data, tokenizer)
    model = load_model(str(tiny_model_dir), CPU)
    rows = sorted(r for step in batches.steps for r in step)
    plain, _ = logps_of_tokenized(model, [batches.tokenized[r] for r in rows])

    calls = []

    def linear(*args):
        calls.append(args[1].shape)
        if fails:
            raise RuntimeError("the pass fails")
        return real(*args)

    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", linear)
    accelerator = setup_accelerator(config)
    if fails:
        with pytest.raises(RuntimeError, match="the pass fails"):
            compute_reference(config, data, batches, tokenizer, model, accelerator, from_first_step=False)
    else:
        run = compute_reference(config, data, batches, tokenizer, model, accelerator, from_first_step=False)
        assert run.computed == len(rows)
        for i, row in enumerate(rows):
            assert run.values[row] == pytest.approx(plain[i].tolist(), rel=1e-5)
    assert calls  # the pass ran packed products
    assert not [m for m in model.modules() if isinstance(m, PackedLinear) or hasattr(m, "_packs")]
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == 7 * model.config.num_hidden_layers + 1


def test_a_reference_pass_stopped_by_ctrl_c_keeps_its_pairs_and_a_rerun_computes_only_the_rest(
        tiny_model_dir, uf_pairs, tmp_path):
    """Ctrl-C during the reference pass (here in its third forward's progress) keeps the pairs computed so far, in a
    part file beside the cache that every reader takes with it: they were all lost, and a rerun computed them again.
    The rerun computes only the others and folds the part into the cache file; every value is the uninterrupted
    pass's within float rounding (packed with other pairs; float-identical on the machines we ran it on)."""
    config = _config(tiny_model_dir, uf_pairs, tmp_path, steps=6)  # 12 pairs, 2 to 4 per forward
    accelerator = setup_accelerator(config)
    data = load_data(config, accelerator)
    tokenizer = load_tokenizer(config)
    batches = build_step_batches(config, data, tokenizer)
    seen = []

    def stop(done, total):
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_reference(config, data, batches, tokenizer, None, accelerator, stop, from_first_step=False)
    (cache,) = {p.name.partition(".part-")[0] for p in (tmp_path / "refcache").iterdir()}
    path = tmp_path / "refcache" / cache
    assert not path.exists() and len(refcache.part_files(path)) == 1
    kept = refcache.load_cached(path)
    assert 0 < len(kept) == seen[-1] < 12

    rerun = compute_reference(config, data, batches, tokenizer, None, accelerator, from_first_step=False)
    assert rerun.computed == 12 - len(kept)
    assert path.is_file() and not refcache.part_files(path)
    straight = compute_reference(config.model_copy(update={"reference_cache": str(tmp_path / "straight")}), data,
                                 batches, tokenizer, None, accelerator, from_first_step=False)
    assert straight.computed == 12 and rerun.values.keys() == straight.values.keys()
    for row, values in straight.values.items():
        assert rerun.values[row] == pytest.approx(values, rel=1e-6)
    cached = refcache.load_cached(next((tmp_path / "straight").glob("*.parquet")))
    assert refcache.load_cached(path).keys() == cached.keys()


def test_folding_parts_keeps_a_part_another_pass_rewrote_since_it_was_read(tmp_path, monkeypatch):
    """Two runs sharing a reference cache: the one that folds the parts into the file removed a part the other had
    rewritten after it was read, so the values saved by that rewrite were in no file until the other's next save
    (lost if it was killed before). The part rewritten since it was read is kept now; the one read is removed."""
    key = refcache.cache_key(model="tiny", tokenizer="t", pairs_sha256="0" * 64, max_length=64)
    path = refcache.cache_path(tmp_path, key)
    values = {f"p{i}": (-1.0 - i, 2, -3.0 - i, 4) for i in range(4)}
    theirs, stopped = (path.with_name(f"{path.name}.part-{n}") for n in ("0-aaaaaaaa", "0-bbbbbbbb"))
    refcache.save_cached(theirs, key, {"p0": values["p0"]})  # the other run's, as it goes
    refcache.save_cached(stopped, key, {"p1": values["p1"]})  # a killed pass's
    save_cached = refcache.save_cached

    def meanwhile(file, *args, **kwargs):  # the other run saves again while the cache file is written
        if file == path:
            save_cached(theirs, key, {"p0": values["p0"], "p2": values["p2"]})
        save_cached(file, *args, **kwargs)

    monkeypatch.setattr(refcache, "save_cached", meanwhile)
    refcache.add_cached(path, key, {"p3": values["p3"]})
    assert refcache.part_files(path) == [theirs]
    assert refcache.load_cached(path) == values
    monkeypatch.setattr(refcache, "save_cached", save_cached)
    refcache.add_cached(path, key, {})  # (the other run's own fold, at the end of its pass)
    assert not refcache.part_files(path) and refcache.load_cached(path) == values


def test_a_plan_takes_the_reference_pass_of_one_epoch_and_refuses_that_of_fewer_steps(tiny_model_dir, uf_pairs,
                                                                                         tmp_path):
    """The reference pass records the pairs whose prompt fills max_length (no value; trained by none): a plan on the
    cache of a one-epoch pass gives every other pair its margin. The cache of a 3-step run lacks most pairs: the
    plan is refused, naming how many (it gave them no margin, never routed and last in the curriculum, exit 0)."""
    from conftest import run_cli

    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    plan = ("plan", uf_pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", tmp_path / "refcache",
            "-o", tmp_path / "plan.parquet")
    for steps in (3, None):
        config = _config(tiny_model_dir, uf_pairs, tmp_path, steps=steps)
        accelerator = setup_accelerator(config)
        data = load_data(config, accelerator)
        tokenizer = load_tokenizer(config)
        batches = build_step_batches(config, data, tokenizer)
        run = compute_reference(config, data, batches, tokenizer, None, accelerator, from_first_step=False)
        result = run_cli(*plan, check=False)
        if steps == 3:
            lacking = data.table.num_rows - len(run.values) - batches.skipped
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert result.returncode == 2 and len(errors) == 1, result.stderr
            assert f"lacks {lacking:,} of the {data.table.num_rows:,} pairs of {uf_pairs}" in errors[0]
    assert result.returncode == 0, result.stderr
    assert batches.skipped_rows and len(run.values) + len(batches.skipped_rows) == data.table.num_rows
    difficulty = [r["difficulty"] for r in pq.read_table(tmp_path / "plan.parquet").to_pylist()]
    assert [d is None for d in difficulty] == [row in batches.skipped_rows for row in range(len(difficulty))]


def test_release_cpu_memory_set_where_nothing_reads_it_is_refused(tmp_path, monkeypatch):
    """release_cpu_memory acts under glibc's malloc on a CPU only; set under tcmalloc (the perpair command's
    allocator where installed) it was accepted and changed nothing. Unset, the default is no one's setting."""
    from accelerate.state import AcceleratorState

    import perpair.train.setup as setup
    from perpair.errors import PerpairError

    base = {"model": "m", "data": "d.parquet", "out": str(tmp_path / "out"), "steps": 1}
    monkeypatch.setattr(setup, "active_allocator", lambda: "tcmalloc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU run, on any machine
    try:
        for value in (True, False):
            with pytest.raises(PerpairError, match=r"^release_cpu_memory applies to a training on a CPU under "
                                                   r"glibc's malloc \(PERPAIR_MALLOC=system\), and this one runs "
                                                   "under tcmalloc: it would change nothing; drop it$"):
                setup.setup_accelerator(load_config(None, {**base, "release_cpu_memory": value}))
            AcceleratorState._reset_state(reset_partial_state=True)
        setup.setup_accelerator(load_config(None, base))
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setattr(setup, "active_allocator", lambda: None)  # glibc's: read
        setup.setup_accelerator(load_config(None, {**base, "release_cpu_memory": False}))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "out").exists()


def test_weight_decay_spares_the_parameters_trls_trainer_spares(tmp_path):
    """One AdamW group decayed every parameter, norms and biases too (a norm's weights, about 1, pulled towards 0),
    where TRL's DPOTrainer (Transformers' Trainer) decays the others only: the decayed parameters are now the ones
    Trainer.get_decay_parameter_names gives, and weight_decay 0 keeps one group."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from perpair.train.setup import make_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                         tie_word_embeddings=True))
    config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1, "weight_decay": 0.1})
    optimizer = make_optimizer(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    expected = set(Trainer.get_decay_parameter_names(None, model)) & set(names.values())
    assert decayed == expected and spared == set(names.values()) - expected
    assert any(n.endswith("_proj.bias") for n in spared) and any(n.endswith("layernorm.weight") for n in spared)
    assert "model.norm.weight" in spared and "model.embed_tokens.weight" in decayed  # (tied to lm_head)
    plain = make_optimizer(config.model_copy(update={"weight_decay": 0.0}), model)
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == len(names)


def test_a_launchers_other_mixed_precision_is_named_not_silently_overridden(tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision fp16`` (or its config file's setting) beside a run whose precision gives
    another: Accelerate lets the Accelerator's own setting win without a word. A note says which precision trains."""
    from perpair.train.setup import launcher_precision_note

    config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1})
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launcher_precision_note(config, bf16=False) is None  # no launcher
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert launcher_precision_note(config, bf16=False) is None  # the same precision
    assert launcher_precision_note(config, bf16=True) == (
        "note: the launcher's mixed precision (no) is not read: this run trains in bf16 autocast, by its precision "
        "auto (bf16 autocast where the device has it); set precision in the train config to choose (fp32 or bf16)")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    fp32 = config.model_copy(update={"precision": "fp32"})
    assert launcher_precision_note(fp32, bf16=False) == (
        "note: the launcher's mixed precision (fp16) is not read: this run trains in float32, by its precision fp32; "
        "set precision in the train config to choose (fp32 or bf16; fp16 is not one of them)")
