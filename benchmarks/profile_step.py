"""Where perpair's training step spends its time: a ``torch.profiler`` table of the steps after the first.

The workload of ``benchmarks/vs_trl.py`` (SmolLM2-135M-Instruct, fp32, the first UltraFeedback sample pairs in file
order, batch 2, max length 512, 2 threads, the defaults), in this process. Run it under the allocator a user's run
gets (``perpair train`` re-executes itself under it; here it is up to the caller):

    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/profile_step.py [--steps 8] [--rows 30]

Prints the operators by self CPU time over steps 2..N (the first warms up, as in the comparison).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from perpair.data import PrepareOptions, prepare
from perpair.train import load_config, loop, train

UF_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()

    profiler = profile(activities=[ProfilerActivity.CPU])
    plain_step = loop.train_step

    def step(*step_args):
        index = step_args[-1]
        if index == 1:
            profiler.__enter__()
        metrics = plain_step(*step_args)
        if index == args.steps - 1:
            profiler.__exit__(None, None, None)
        return metrics

    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        pairs = str(Path(tmp) / "uf.parquet")
        prepare([str(UF_TRAIN)], pairs, PrepareOptions())
        loop.train_step = step
        train(load_config(None, {
            "model": "smollm2", "data": pairs, "out": str(Path(tmp) / "out"), "steps": args.steps, "batch_size": 2,
            "max_length": 512, "beta": 0.1, "lr": 1e-6, "lr_schedule": "constant", "threads": args.threads,
            "reference_cache": str(Path(tmp) / "refcache"), "save_model": False, "final_checkpoint": False,
            "save_every_minutes": 0}))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
