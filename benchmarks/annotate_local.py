"""Local-teacher throughput: SmolLM2-135M-Instruct annotating the prepared UltraFeedback sample (994 pairs).

    python benchmarks/annotate_local.py [--limit N] [--batch-size 8] [--max-chars 400]

Prepares ../shared/data/ultrafeedback/train_1k.jsonl.gz, annotates it with `local:smollm2` (likelihood
ranking of the seven categories and four magnitudes), checks every annotation is valid, prints pairs/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from perpair.annotate import annotate, load_config, read_annotations
from perpair.data import PrepareOptions, prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=None, help="override the template's text limits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "uf.parquet"
        prepare([str(DATA)], pairs, PrepareOptions())
        config = load_config(None, teachers=["local:smollm2"], limit=args.limit)
        teacher = config.teachers[0].model_copy(update={"batch_size": args.batch_size, "max_chars": args.max_chars})
        config = config.model_copy(update={"teachers": [teacher]})
        started = time.perf_counter()
        result = annotate(pairs, config, Path(tmp) / "ann.parquet")
        elapsed = time.perf_counter() - started
        table, _ = read_annotations(Path(tmp) / "ann.parquet")
    valid = sum(1 for c in table.column("category").to_pylist() if c is not None)
    print(f"local teacher (SmolLM2-135M, CPU): {result.pairs} pairs, {valid} valid annotations, "
          f"{elapsed:.0f}s incl. model load, {result.pairs / elapsed:.2f} pairs/s; status {result.status}")


if __name__ == "__main__":
    main()
