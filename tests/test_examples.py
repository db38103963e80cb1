"""The GPU recipes in examples/ load with the stage loaders, so a recipe cannot rot silently.

Each recipe's run.sh is read for the stage commands it runs; every YAML a command names is loaded by that stage's
own loader, and every YAML in a recipe folder must be named by its run.sh.
"""

from __future__ import annotations

import importlib
import re
import runpy
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from perpair.annotate.config import load_config as load_annotate
from perpair.errors import PerpairError
from perpair.plan.config import resolve_schedule
from perpair.train import load_config as load_train
from perpair.train.setup import check_sharding

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(p.parent for p in EXAMPLES.glob("*/run.sh"))


def _commands(run_sh: Path) -> list[list[str]]:
    """The shell commands of run.sh, continuation lines joined and comments dropped, as argument lists."""
    text = re.sub(r"\\\n\s*", " ", run_sh.read_text())
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _stage_configs(recipe: Path) -> dict[str, list]:
    """{'annotate': [path], 'plan': [(preset, path)], 'train': [(path, accelerate config path)]} from run.sh."""
    found: dict[str, list] = {"annotate": [], "plan": [], "train": []}
    for args in _commands(recipe / "run.sh"):
        words = [a for a in args if "=" not in a or a.startswith("-")]
        if words[:2] == ["perpair", "annotate"] and _option(words, "--config"):
            found["annotate"].append(recipe / _option(words, "--config"))
        elif words[:2] == ["perpair", "plan"]:
            config = _option(words, "--config")
            found["plan"].append((_option(words, "--preset"), recipe / config if config else None))
        elif words[:2] == ["accelerate", "launch"]:
            train = words[words.index("train") + 1]
            found["train"].append((recipe / train, recipe / _option(words, "--config_file")))
    return found


def test_there_are_recipes():
    assert {r.name for r in RECIPES} >= {"sp2dpo-llama3-8b", "mixdpo-llama3-8b"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_stage_config_loads(recipe):
    found = _stage_configs(recipe)
    assert found["plan"] and found["train"], "run.sh must plan and train"
    named = set()
    for path in found["annotate"]:
        config = load_annotate(path)
        assert all(t.kind == "api" for t in config.teachers)
        named.add(path)
    for preset, path in found["plan"]:
        resolve_schedule(preset, path)
        named.add(path)
    for train, accelerate in found["train"]:
        config = load_train(train)
        launcher = load_config_from_file(str(accelerate))
        assert config.batch_size % launcher.num_processes == 0
        assert config.precision == "bf16" and launcher.mixed_precision == "bf16"
        check_sharding(config, launcher.distributed_type)  # the loop would refuse it at start otherwise
        named.add(train)
    unnamed = {p.name for p in recipe.glob("*.yaml")} - {p.name for p in named}
    assert not unnamed, f"{recipe.name}: YAML files that run.sh never uses: {sorted(unnamed)}"


def test_mixdpo_recipe_is_the_published_setting():
    recipe = EXAMPLES / "mixdpo-llama3-8b"
    assert resolve_schedule("mixdpo", recipe / "plan.yaml") == resolve_schedule("mixdpo")
    schedule = resolve_schedule("mixdpo", recipe / "plan.yaml")
    assert (schedule.beta.beta, schedule.routing.tau, schedule.label_smoothing) == (0.01, 0.5, 0.1)
    # DESIGN.md: difficulty = the rating margin, margin below τ routed to SFT, one global sort large to small margin
    assert (schedule.beta.kind, schedule.margin.source, schedule.routing.action, schedule.curriculum.kind) == (
        "global", "ratings", "sft", "easy_to_hard")
    for name, lr in (("train.yaml", 1e-6), ("train-mistral.yaml", 2e-7)):
        config = load_train(recipe / name)
        assert (config.lr, config.batch_size, config.max_length) == (lr, 160, 1024)
        assert (config.lr_schedule, config.warmup_ratio, config.loss) == ("cosine", 0.1, "sigmoid")
        assert not config.shuffle  # the plan's easy-to-hard order


def _readme_plan_commands(recipe: Path) -> list[list[str]]:
    text = (recipe / "README.md").read_text()
    return [shlex.split(line) for line in text.splitlines() if line.startswith("perpair plan ")]


def test_sp2dpo_recipe_plans_the_papers_controls_around_its_own_beta():
    """DESIGN.md, SP²DPO: "Controls in the paper: a tuned global-β DPO (swept per model) and random β_i". The
    README's control commands, with the recipe's plan.yaml, must give those controls: random β_i drawn from the
    same β_i as the SP²DPO run (same schedule but the kind), and one global β (0.01, or the swept --beta)."""
    recipe = EXAMPLES / "sp2dpo-llama3-8b"
    sp2dpo = resolve_schedule("sp2dpo", recipe / "plan.yaml")
    assert (sp2dpo.beta.kind, sp2dpo.beta.beta, sp2dpo.beta.normalise) == ("semantic", 0.01, True)
    kinds = {"sp2dpo-random": "random", "dpo": "global"}
    seen = set()
    for args in _readme_plan_commands(recipe):
        preset, config, beta = _option(args, "--preset"), _option(args, "--config"), _option(args, "--beta")
        if preset not in kinds:
            continue
        schedule = resolve_schedule(preset, recipe / config if config else None,
                                    beta=float(beta) if beta else None)
        assert schedule.beta.kind == kinds[preset], args
        if preset == "sp2dpo-random":
            assert schedule.as_dict() == {**sp2dpo.as_dict(), "beta": {**sp2dpo.as_dict()["beta"], "kind": "random"}}
            assert "--annotations" in args
        else:
            assert schedule.beta.beta == (float(beta) if beta else sp2dpo.beta.beta), args
        seen.add(preset)
    assert seen == set(kinds), "README.md must say how to plan both of the paper's controls"


def test_mixdpo_recipe_says_how_to_run_its_dpo_baseline_beside_it():
    """The DPO baseline (AlpacaEval 2 LC 9.37 in DESIGN.md) at MixDPO's β, planned and trained into files of its
    own: "train the same" read train.yaml's plan and out, i.e. the MixDPO plan, overwriting the MixDPO model."""
    recipe = EXAMPLES / "mixdpo-llama3-8b"
    plans = [a for a in _readme_plan_commands(recipe) if _option(a, "--preset") == "dpo"]
    assert plans, "README.md must say how to plan the DPO baseline"
    for args in plans:
        schedule = resolve_schedule("dpo", beta=float(_option(args, "--beta")))
        assert (schedule.beta.kind, schedule.beta.beta, schedule.label_smoothing) == ("global", 0.01, 0.0)
        assert schedule.routing.tau is None and schedule.curriculum.kind == "none"
    text = re.sub(r"\\\n\s*", " ", (recipe / "README.md").read_text())
    trains = [shlex.split(line) for line in text.splitlines() if line.startswith("accelerate launch")]
    mixdpo = load_train(recipe / "train.yaml")
    assert trains and all(_option(a, "--plan") == _option(plans[0], "-o") and
                          _option(a, "--out") not in (None, str(mixdpo.out)) for a in trains)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_run_sh_evaluates_every_model_it_trains_against_its_starting_point(recipe):
    """Each trained model (train YAML's out/model) and the checkpoint it started from must be evaluated: the Mistral
    run of MixDPO was trained (MIXDPO_MISTRAL=1) and never evaluated."""
    text = (recipe / "run.sh").read_text()
    evals = "\n".join(line for line in text.splitlines() if "perpair eval" in line or "=" in line)
    for train, _ in _stage_configs(recipe)["train"]:
        config = load_train(train)
        assert f"{config.out}/model" in evals, f"{recipe.name}: {train.name}'s model is never evaluated"
        assert re.search(rf"^\w+={re.escape(config.model)}\s", text, re.M), \
            f"{recipe.name}: {train.name}'s starting model {config.model} is not the one run.sh evaluates"


def test_combined_recipe_plan_equals_its_preset():
    recipe = EXAMPLES / "sp2dpo-mixdpo-qwen3-4b"
    assert resolve_schedule("sp2dpo+mixdpo", recipe / "plan.yaml") == resolve_schedule("sp2dpo+mixdpo")


def test_steps_are_one_epoch_by_the_readme_calculation():
    figures = runpy.run_path(str(EXAMPLES / "estimate.py"))
    one_epoch = int(figures["PREPARED"] * figures["KEPT_AT_1024"] // 160)
    for recipe in RECIPES:
        for train, _ in _stage_configs(recipe)["train"]:
            assert load_train(train).steps == one_epoch, train


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("accelerate/*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path):
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_processes == 8 and not config.use_cpu
    if path.name.startswith("zero3"):
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"] is True
        assert config.deepspeed_config["zero3_init_flag"] is False
    else:
        assert config.distributed_type == DistributedType.FSDP
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # rank 0 needs real weights for the reference pass
        family = path.stem.removeprefix("fsdp-")  # fsdp-llama.yaml wraps transformers' LlamaDecoderLayer
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        assert hasattr(module, fsdp["fsdp_transformer_layer_cls_to_wrap"])


def test_recipes_use_existing_accelerate_configs():
    for recipe in RECIPES:
        for _, accelerate in _stage_configs(recipe)["train"]:
            assert accelerate.resolve().parent == (EXAMPLES / "accelerate").resolve() and accelerate.exists()


_SAFE = {"save_every": 0, "final_checkpoint": False, "tokens_per_forward": 0}


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens_per_forward": 4096}, "tokens_per_forward"), ({"lora": {"merge": True}}, "lora.merge"),
])
def test_loop_refuses_what_fsdp_does_not_support(change, message):
    config = load_train(None, {"model": "m", "data": "d", "out": "o", "steps": 20, **_SAFE, **change})
    check_sharding(config, DistributedType.MULTI_GPU)  # DDP: all of it is fine
    with pytest.raises(PerpairError, match=message):
        check_sharding(config, DistributedType.FSDP)


@pytest.mark.parametrize("change", [{"final_checkpoint": True}, {"save_every": 10}, {"resume": True},
                                    {"save_every_minutes": 10}])
def test_fsdp_runs_write_and_resume_checkpoints(change, monkeypatch):
    """Checkpoints under FSDP (each process its shards, tests/test_train_cli.py); they were refused ("resumable
    checkpoints are not supported under FSDP yet"). A torch without the sharded safetensors storage they are
    written with is refused at the start, not at the first checkpoint, hours in."""
    import perpair.train.config as train_config

    config = load_train(None, {"model": "m", "data": "d", "out": "o", "steps": 20, **_SAFE, **change})
    check_sharding(config, DistributedType.FSDP)
    monkeypatch.setattr(train_config, "sharded_checkpoints", lambda: False)
    with pytest.raises(PerpairError, match="resumable checkpoints under FSDP need torch.distributed.checkpoint's"):
        check_sharding(config, DistributedType.FSDP)
    check_sharding(config.model_copy(update={**_SAFE, "save_every_minutes": 0, "resume": False}),
                   DistributedType.FSDP)


def test_loop_refuses_deepspeed():
    config = load_train(None, {"model": "m", "data": "d", "out": "o", "steps": 1, **_SAFE})
    check_sharding(config, DistributedType.FSDP)
    with pytest.raises(PerpairError, match="DeepSpeed"):
        check_sharding(config, DistributedType.DEEPSPEED)


def test_loop_refuses_an_fsdp_launch_that_accelerate_downgraded(monkeypatch):
    config = load_train(None, {"model": "m", "data": "d", "out": "o", "steps": 1, **_SAFE})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    with pytest.raises(PerpairError, match="FSDP needs GPUs"):
        check_sharding(config, DistributedType.MULTI_CPU)  # what it becomes without a GPU
    check_sharding(config, DistributedType.FSDP)
