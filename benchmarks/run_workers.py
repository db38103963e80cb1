"""``perpair run`` one stage at a time against stages side by side (``workers``), in one session: wall seconds.

    python benchmarks/run_workers.py [--rounds 2] [--workers 1,2] [--limit 40] [--arms dpo,sp2dpo,mixdpo]

The demo's job (``configs/demo.yaml``: SmolLM2-135M-Instruct as policy, teacher and judge, bf16, LoRA) made
smaller so that a round takes minutes: the first ``--limit`` pairs of ../shared/data/ultrafeedback/train_1k.jsonl.gz,
the ``--arms`` given, AlpacaEval on 4 instructions of 48 new tokens. Each round runs every ``--workers`` count,
in turn, from an empty workdir (nothing skipped), through the ``perpair`` command (its allocator, its processes),
with ``train.threads`` left to the run (one worker: PyTorch's default; several: cores / workers each). Prints
each run's wall seconds, the medians and their ratios to the first count. Run it on idle cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from perpair.pipeline.workers import available_cores

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
AE = SHARED / "alpaca_eval"


def job(workdir: Path, workers: int, limit: int, arms: list[str]) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config.update(workdir=str(workdir), workers=workers)
    config["data"].update(sources=[str(SHARED / "ultrafeedback" / "train_1k.jsonl.gz")], limit=limit)
    config["train"].pop("threads", None)
    config["arms"] = {arm: config["arms"][arm] for arm in arms}
    config["eval"]["alpaca_eval"].update(
        limit=4, max_new_tokens=48, offline=True, data_dir=str(AE))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="worker counts, compared with the first")
    parser.add_argument("--limit", type=int, default=40, help="pairs prepared (0.3 of them held out)")
    parser.add_argument("--arms", default="dpo,sp2dpo,mixdpo", help="arms of configs/demo.yaml")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    arms = args.arms.split(",")
    perpair = Path(sys.executable).with_name("perpair")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    walls: dict[int, list[float]] = {count: [] for count in counts}
    print(f"{len(arms)} arms, {args.limit} pairs, {available_cores()} cores; {args.rounds} rounds of workers "
          f"{counts}")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for count in counts:
                folder = Path(tmp) / f"r{round_}-w{count}"
                folder.mkdir()
                (folder / "run.yaml").write_text(yaml.safe_dump(job(folder / "work", count, args.limit, arms)))
                started = time.perf_counter()
                result = subprocess.run([str(perpair), "run", str(folder / "run.yaml")], capture_output=True,
                                        text=True, env=env)
                wall = time.perf_counter() - started
                if result.returncode != 0:
                    sys.exit(f"workers {count}: exit {result.returncode}\n{result.stderr[-3000:]}")
                walls[count].append(wall)
                print(f"round {round_ + 1} workers {count}: {wall:.1f} s", flush=True)
    first = statistics.median(walls[counts[0]])
    print("\n| workers | wall s (each run) | median s | median / workers " f"{counts[0]} |\n|---|---|---|---|")
    for count in counts:
        median = statistics.median(walls[count])
        print(f"| {count} | {' / '.join(f'{w:.1f}' for w in walls[count])} | {median:.1f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
