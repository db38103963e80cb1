"""The reference pass at scale: seconds per 1,000 pairs for perpair's cached reference log-probs pass and for
TRL 1.16's ``precompute_ref_log_probs=True``, on the same pairs (issue 17).

The first ``--pairs`` pairs of the UltraFeedback sample in file order, SmolLM2-135M-Instruct in fp32, max length
512, 2 threads, each pass alone in a fresh process (``vs_trl.py``'s harness and workers), in alternating rounds:
perpair through ``perpair train``'s own steps up to its reference pass (an empty cache, the allocator its command
picks), TRL building a ``DPOTrainer`` (``bf16=False``), whose constructor computes the reference log-probs of its
training set in batches of the training batch size (2). Seconds are the pass alone (model load excluded),
scaled to 1,000 pairs: ``seconds × 1000 / pairs``.

    python benchmarks/reference_pass.py [--pairs 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (the shared harness)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64, help="pairs per pass (default 64), scaled to 1,000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()

    from perpair.data import PrepareOptions, prepare

    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {vs_trl.os.getloadavg()}", flush=True)
    seconds: dict[str, list[float]] = {"ref-perpair": [], "ref-trl": []}
    counted: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="reference_pass_") as tmp:
        pairs = str(Path(tmp) / "uf.parquet")
        prepare([str(vs_trl.UF_TRAIN)], pairs, PrepareOptions())
        run_args = SimpleNamespace(pairs=pairs, pool=args.pairs, batch_size=args.batch_size, steps=1,
                                   max_length=args.max_length, threads=args.threads, model=args.model)
        for round_ in range(args.rounds):
            for name in seconds:
                run = vs_trl.run_variant(name, run_args)
                seconds[name].append(run["reference_seconds"])
                counted[name] = run["pairs"]
                print(f"round {round_ + 1}: {name}: {run['pairs']} pairs in {run['reference_seconds']:.1f} s "
                      f"(process {run['wall_seconds']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB)",
                      flush=True)
    if len(set(counted.values())) != 1:
        raise SystemExit(f"the passes computed different numbers of pairs: {counted}")
    n = counted["ref-perpair"]
    per_1000 = {name: statistics.median(s) * 1000 / n for name, s in seconds.items()}
    print(f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {vs_trl.os.getloadavg()}")
    print(f"reference pass, {n} pairs (median of {args.rounds}), scaled to 1,000 pairs: "
          f"perpair {per_1000['ref-perpair']:.0f} s, TRL precompute_ref_log_probs {per_1000['ref-trl']:.0f} s, "
          f"TRL / perpair {per_1000['ref-trl'] / per_1000['ref-perpair']:.2f}×")


if __name__ == "__main__":
    main()
