"""Benchmark: `perpair prepare` on a 60,000-pair file (target: under 30 s on 2 cores).

The file is the UltraFeedback sample replicated 60 times with altered text (each copy's prompt and
responses carry a copy number, so every pair is distinct). Each repeat runs the real CLI in a fresh
process, as a user would; the figure printed is the median wall time.

    python benchmarks/prepare_60k.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"


def build(path: Path, copies: int) -> int:
    rows = [json.loads(line) for line in gzip.open(SAMPLE, "rt")]
    with gzip.open(path, "wt", compresslevel=1) as handle:
        for copy in range(copies):
            for row in rows:
                altered = dict(row, prompt=f"{row['prompt']} (variant {copy})",
                               chosen=f"{row['chosen']} [{copy}]" if row["chosen"] else "",
                               rejected=f"{row['rejected']} [{copy}]" if row["rejected"] else "")
                handle.write(json.dumps(altered) + "\n")
    return copies * len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "uf60k.jsonl.gz"
        rows = build(source, args.copies)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "perpair", "prepare", str(source), "-o",
                            str(Path(folder) / "pairs.parquet")], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        out = subprocess.run([sys.executable, "-m", "perpair", "inspect", str(Path(folder) / "pairs.parquet"),
                              "--json"], check=True, capture_output=True, text=True)
        pairs = json.loads(out.stdout)["pairs"]
    median = statistics.median(times)
    print(f"prepare: {rows:,} rows -> {pairs:,} pairs; median {median:.2f} s over {args.repeats} runs "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)}); {rows / median:,.0f} rows/s; target < 30 s")


if __name__ == "__main__":
    main()
