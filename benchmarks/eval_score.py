"""Time to score the six shipped AlpacaEval annotation files (raw win rate + length-controlled win rate).

    python benchmarks/eval_score.py [--repeats 5] [--no-fit]

Offline, in one process, with the reconstructed instruction difficulties, the published GLM weights and the
leaderboard in ../shared/data/alpaca_eval; the first (untimed) pass warms imports and file caches. Prints the median of
``--repeats`` timings per file and for all six, then one ``perpair eval score`` CLI run of all six (process start
included).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from perpair.eval import ScoreOptions, score_annotations

AE = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fit", action="store_true", help="published GLM weights only, no offline refit")
    args = parser.parse_args()
    files = sorted((AE / "annotations").glob("*.json.gz"))
    options = ScoreOptions(offline=True, data_dir=AE, fit=not args.no_fit)
    for file in files:  # warm-up
        score_annotations(file, options)
    per_file: dict[str, list[float]] = {f.name: [] for f in files}
    totals = []
    for _ in range(args.repeats):
        start_all = time.perf_counter()
        for file in files:
            start = time.perf_counter()
            row = score_annotations(file, options)
            per_file[file.name].append(time.perf_counter() - start)
        totals.append(time.perf_counter() - start_all)
    print(f"scoring {len(files)} annotation files (805 rows each), fit={'off' if args.no_fit else 'on'}, "
          f"median of {args.repeats}:")
    for name, times in per_file.items():
        print(f"  {name:42s} {1000 * statistics.median(times):8.1f} ms")
    print(f"  {'all six':42s} {1000 * statistics.median(totals):8.1f} ms  (last: {row['name']})")
    cli = [sys.executable, "-m", "perpair", "eval", "score", "--json", "--offline", "--data-dir", str(AE),
           *(["--no-fit"] if args.no_fit else []),
           *map(str, files)]
    start = time.perf_counter()
    subprocess.run(cli, check=True, capture_output=True)
    print(f"  {'perpair eval score (CLI, one process)':42s} {1000 * (time.perf_counter() - start):8.1f} ms")


if __name__ == "__main__":
    main()
