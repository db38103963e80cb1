"""``perpair train``: from a YAML config with ``key=value`` overrides, or directly from options."""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from perpair.cli import app, console, out
from perpair.errors import PerpairError


def _losses_help() -> str:
    """``--loss``'s help, naming the registry's losses. The registry imports torch (about a second), which every
    other command would then pay at start-up, so only a help request loads it."""
    if not {"--help", "-h"} & set(sys.argv):
        return "Loss (see perpair train --help)."
    from perpair.train.losses import LOSSES

    return (f"Preference loss, or several comma-separated, summed with --set loss_weights=[…]: "
            f"{', '.join(sorted(LOSSES))}.")


def _defaults() -> dict[str, Any]:
    """TrainConfig's defaults, for --help; read only when the command is ``perpair train`` (the config module
    imports torch, which the other commands do without)."""
    if sys.argv[1:2] != ["train"]:
        return {}
    from perpair.train.config import TrainConfig

    return {name: field.default for name, field in TrainConfig.model_fields.items() if not field.is_required()}


_DEFAULTS = _defaults()


def _help(text: str, key: str) -> str:
    """``text`` with the config's default for ``key`` (the one place defaults live is TrainConfig)."""
    return f"{text} (default: {_DEFAULTS[key]})" if key in _DEFAULTS else text


@app.command("train")
def train_command(
    config: Annotated[Path | None, typer.Argument(
        metavar="[CONFIG.yaml]", help="Train config (YAML); options below and --set override it.")] = None,
    model: Annotated[str | None, typer.Option(help="Policy: a model folder, a Hub id, or 'smollm2'.")] = None,
    data: Annotated[str | None, typer.Option(
        help="A pairs file, or any file `perpair prepare` reads (converted on the fly).")] = None,
    plan: Annotated[str | None, typer.Option(help="Plan file (perpair plan): per-pair beta, route, order.")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output folder.")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Optimizer steps (default: one epoch over the pairs whose prompt fits max_length).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=_help("Pairs per optimizer step (global).", "batch_size"))] = None,
    max_length: Annotated[int | None, typer.Option(
        help=_help("Max tokens of prompt + response.", "max_length"))] = None,
    beta: Annotated[float | None, typer.Option(
        help=_help("Global beta (a plan's per-pair beta replaces it).", "beta"))] = None,
    loss: Annotated[str | None, typer.Option(help=_help(_losses_help(), "loss"))] = None,
    lr: Annotated[float | None, typer.Option(help=_help("Peak learning rate.", "lr"))] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        help=_help("constant, linear or cosine, after the warm-up.", "lr_schedule"))] = None,
    warmup_ratio: Annotated[float | None, typer.Option(
        help=_help("Share of steps warming up: ceil(ratio × steps) steps, as Transformers counts them.",
                   "warmup_ratio"))] = None,
    seed: Annotated[int | None, typer.Option(help=_help("Seed.", "seed"))] = None,
    shuffle: Annotated[bool | None, typer.Option(
        "--shuffle/--no-shuffle", help=_help("Seeded shuffle.", "shuffle"))] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (defaults of lora.*).")] = False,
    overwrite: Annotated[bool | None, typer.Option(
        "--overwrite", help="Replace the outputs of another run in OUT (without it, such an OUT is refused).")] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume", help="Continue from OUT's last checkpoint (of the run OUT/run.key names).")] = None,
    save_every: Annotated[int | None, typer.Option(
        help=_help("Checkpoint every N steps (0: by the clock alone, save_every_minutes, and at the end).",
                   "save_every"))] = None,
    save_every_minutes: Annotated[float | None, typer.Option(
        help=_help("Checkpoint after the first step ending this many minutes after the last checkpoint (0: off).",
                   "save_every_minutes"))] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    report_to: Annotated[list[str] | None, typer.Option(
        "--report-to", help="Tracker to log to: tensorboard, wandb, trackio or mlflow (repeatable).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Any config key, dotted for nested ones (repeatable).")] = None,
) -> None:
    """Train with per-pair beta / route / order (a run without a plan is plain DPO with a global beta)."""
    from perpair import mkl
    from perpair.allocator import tcmalloc_hint
    from perpair.cli.data import print_prepare
    from perpair.plan.config import deep_merge
    from perpair.train import load_config, parse_overrides, train

    given: dict[str, Any] = {
        "model": model, "data": data, "plan": plan, "out": out_dir, "steps": steps, "batch_size": batch_size,
        "max_length": max_length, "beta": beta, "loss": loss, "lr": lr, "lr_schedule": lr_schedule,
        "warmup_ratio": warmup_ratio, "seed": seed, "shuffle": shuffle, "resume": resume, "overwrite": overwrite,
        "save_every": save_every, "save_every_minutes": save_every_minutes, "threads": threads,
        "report_to": report_to,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if loss is not None and "," in loss:
        options["loss"] = [name.strip() for name in loss.split(",")]
    if lora:
        options["lora"] = {}
    set_keys = parse_overrides(overrides or [])
    # an option and a --set of the same key: one of them would go unread (--lora and --set lora.r=8 add up)
    twice = [k for k, v in set_keys.items() if k in options and not (isinstance(v, dict) and options[k] == {})]
    if twice:
        raise PerpairError(f"--{twice[0].replace('_', '-')} and --set {twice[0]}=… both set {twice[0]}; keep one")
    options = deep_merge(options, set_keys)
    if config is None and not {"model", "data", "out"} <= options.keys():
        raise PerpairError("give a CONFIG.yaml, or at least --model, --data and --out")
    cfg = load_config(config, options)
    total = [cfg.steps or 0]  # one epoch's steps: known once the pairs are tokenized (on_steps)

    seconds: list[float] = []

    def progress(m: dict[str, Any]) -> None:
        seconds.append(m["seconds"])
        eta = sum(seconds) / len(seconds) * (total[0] - m["step"])
        console.print(f"step {m['step']}/{total[0]}  loss {m['loss']:.4f}  {m['seconds']:.2f}s  "
                      f"acc {_fmt(m['reward_accuracy'])}  margin {_fmt(m['reward_margin'])}  "
                      f"ETA {_duration(eta)}", highlight=False, markup=False)

    shown = [0.0]

    def reference(done: int, total: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 5 or done == total:  # a line every 5 s at most
            shown[0] = now
            console.print(f"reference log-probs: {done:,}/{total:,} pairs", highlight=False)

    def resumed(step: int) -> None:
        if not step:  # a job re-launched with --resume every time starts this way: said, not refused
            console.print(f"--resume: no checkpoint in {escape(str(cfg.out))} yet; training from step 1",
                          soft_wrap=True)
            return
        console.print(f"resumed from the checkpoint of step {step} ({total[0] - step} steps to go)",
                      highlight=False)

    def steps_known(steps: int) -> None:
        total[0] = steps

    # Under torchrun / accelerate launch every process runs this command: the first one reports for all
    lead = os.environ.get("RANK", "0") == "0"
    result = train(cfg, on_step=progress if lead else None, on_reference=reference if lead else None,
                   on_resume=resumed if lead else None, on_steps=steps_known,
                   on_prepare=partial(print_prepare, converted_by="perpair train") if lead else None)
    if not lead:
        return
    s = result.summary
    steps, pairs = f"{s['steps']} step{'s' * (s['steps'] != 1)}", f"{s['pairs']:,} pair{'s' * (s['pairs'] != 1)}"
    out.print(f"trained {steps}, {pairs} in {s['train_seconds']:.1f} s: "
              f"{_fmt(s['pairs_per_second'])} pairs/s, {_fmt(s['tokens_per_second'], 0)} tokens/s; "
              f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB"
              f"{' (of the whole process: not resettable here)' if s['peak_memory_scope'] == 'process' else ''} "
              f"(allocator: {s['allocator']}{tcmalloc_hint(s['allocator'], s['device'])}{mkl.hint(s['device'])})")
    first, computed = s["reference_pairs_from_first_step"], s["reference_pairs_computed"]
    if not s["reference_pairs"]:  # "0 computed (the rest from the cache)" read as a reference there was
        why = (f"loss {cfg.objective.name} uses no reference" if cfg.objective.reference_free
               else "no pair this run trains is on the preference route")
        reference_text = f"none ({why})"
    else:
        reference_text = (f"{computed} pairs computed in {s['reference_seconds']:.1f} s"
                          f"{f', {first} from the first step (the initial weights are the reference)' if first else ''}"
                          f", {s['reference_pairs'] - computed - first} from the cache")
    out.print(f"reference log-probs: {reference_text}; order: {s['order']}; "
              f"skipped (prompt ≥ max_length): {s['skipped_long_prompts']}; "
              f"trained with a response cut to max_length: {s['truncated_pairs']}")
    if s["prompt_cut_pairs"]:
        out.print(f"note: for {s['prompt_cut_pairs']} pairs the chat template renders the prompt otherwise before a "
                  "response than alone (e.g. a generation prompt it drops once the answer follows); they trained on "
                  "the prompt up to where the two differ, as TRL does, a context unlike the one generation sees")
    lean = ", ".join(f"{n} {kind}" for kind, n in s["lean_activations"].items() if n)
    packing = s["tokens_per_forward"]
    kept = s["mlp_gate_up_kept"]
    budget = (f" (gate/up kept in the last {kept['mlps']} of {kept['of']} recomputing MLPs at the longest forward, "
              f"{kept['longest_forward']:,} tokens)" if kept["of"] else "")
    out.print(f"lean activations: {lean or 'off (no module patched)'}{budget}; pairs per forward: "
              f"{f'packed up to {packing} tokens' if packing else 'one'}")
    saved = "".join(f"; {k}: {s[k]}" for k in ("model", "adapter") if k in s)
    out.print(f"metrics: {result.metrics_path}, summary: {result.out / 'summary.json'}{saved}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    # (a margin of float noise, -5.5e-6 at the first step, read "-0.000")
    return f"{value:.1e}" if 0 < abs(value) < 0.5 * 10 ** -digits else f"{value:.{digits}f}"
