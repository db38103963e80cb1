"""``perpair train``: from a YAML config with ``key=value`` overrides, or directly from options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from perpair.cli import app, console, out
from perpair.errors import PerpairError


@app.command("train")
def train_command(
    config: Annotated[Path | None, typer.Argument(
        metavar="[CONFIG.yaml]", help="Train config (YAML); options below and --set override it.")] = None,
    model: Annotated[str | None, typer.Option(help="Policy: a model folder, a Hub id, or 'smollm2'.")] = None,
    data: Annotated[str | None, typer.Option(
        help="A pairs file, or any file `perpair prepare` reads (converted on the fly).")] = None,
    plan: Annotated[str | None, typer.Option(help="Plan file (perpair plan): per-pair beta, route, order.")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per optimizer step (global).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Max tokens of prompt + response.")] = None,
    beta: Annotated[float | None, typer.Option(help="Global beta (a plan's per-pair beta replaces it).")] = None,
    loss: Annotated[str | None, typer.Option(help="sigmoid, ipo, hinge, robust, simpo or sft.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="constant, linear or cosine.")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Share of steps warming up.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    shuffle: Annotated[bool | None, typer.Option("--shuffle/--no-shuffle", help="Seeded shuffle.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (defaults of lora.*).")] = False,
    resume: Annotated[bool | None, typer.Option("--resume", help="Continue from OUT's last checkpoint.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    report_to: Annotated[list[str] | None, typer.Option(
        "--report-to", help="Tracker to log to: tensorboard, wandb, trackio or mlflow (repeatable).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Any config key, dotted for nested ones (repeatable).")] = None,
) -> None:
    """Train with per-pair beta / route / order (a run without a plan is plain DPO with a global beta)."""
    from perpair.train import load_config, parse_overrides, train

    given: dict[str, Any] = {
        "model": model, "data": data, "plan": plan, "out": out_dir, "steps": steps, "batch_size": batch_size,
        "max_length": max_length, "beta": beta, "loss": loss, "lr": lr, "lr_schedule": lr_schedule,
        "warmup_ratio": warmup_ratio, "seed": seed, "shuffle": shuffle, "resume": resume,
        "save_every": save_every, "threads": threads, "report_to": report_to,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if lora:
        options["lora"] = {}
    options.update(parse_overrides(overrides or []))
    if config is None and not {"model", "data", "out", "steps"} <= options.keys():
        raise PerpairError("give a CONFIG.yaml, or at least --model, --data, --steps and --out")
    cfg = load_config(config, options)

    def progress(m: dict[str, Any]) -> None:
        console.print(f"step {m['step']}/{cfg.steps}  loss {m['loss']:.4f}  {m['seconds']:.2f}s  "
                      f"acc {_fmt(m['reward_accuracy'])}  margin {_fmt(m['reward_margin'])}", highlight=False)

    result = train(cfg, on_step=progress)
    s = result.summary
    out.print(f"trained {s['steps']} steps, {s['pairs']:,} pairs in {s['train_seconds']:.1f} s: "
              f"{_fmt(s['pairs_per_second'])} pairs/s, {_fmt(s['tokens_per_second'], 0)} tokens/s; "
              f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB (allocator: {s['allocator']})")
    out.print(f"reference log-probs: {s['reference_pairs_computed']} pairs computed in "
              f"{s['reference_seconds']:.1f} s (the rest from the cache); order: {s['order']}; "
              f"skipped (prompt ≥ max_length): {s['skipped_long_prompts']}")
    saved = "".join(f"; {k}: {s[k]}" for k in ("model", "adapter") if k in s)
    out.print(f"metrics: {result.metrics_path}, summary: {result.out / 'summary.json'}{saved}")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
