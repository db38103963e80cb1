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
from vs_trl import UF_TRAIN, train_settings  # (this folder: the comparison's workload, the same settings)


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
        args.tmp, args.pairs, args.model, args.batch_size, args.max_length = tmp, str(Path(tmp) / "uf.parquet"), \
            "smollm2", 2, 512
        prepare([str(UF_TRAIN)], args.pairs, PrepareOptions())
        loop.train_step = step
        train(load_config(None, train_settings(args)))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
