"""Benchmark: plan 60,000 pairs (SP²DPO's UltraFeedback corpus size) with the heaviest preset.

Builds a synthetic pairs file (UltraFeedback-like lengths and 1–10 scores in half steps) and synthetic
annotations once, then times ``build_plan`` + ``write_plan`` under ``sp2dpo+mixdpo`` (annotations,
normalisation, routing, curriculum) and, separately, the report. Prints the median of repeated runs;
the target is under 10 s for the plan.

    python benchmarks/plan_60k.py [--pairs 60000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from perpair.annotate import schema as ann_schema
from perpair.artifacts import file_sha256, write_artifact
from perpair.data.schema import SCHEMA_VERSION, PairRecord, records_to_table
from perpair.plan import build_plan, report_dir, resolve_schedule, write_plan, write_report

PRESET = "sp2dpo+mixdpo"


def make_inputs(directory: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    # Random words, ~1 kB per response (about UltraFeedback's median), so the file compresses like text
    # rather than like one repeated string.
    vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=k))
                           for k in rng.integers(2, 10, size=5000)])
    words = vocabulary[rng.integers(0, len(vocabulary), size=(2 * count, 170))]

    def text(row: int) -> str:
        return " ".join(words[row])

    rejected = rng.integers(2, 19, size=count) / 2
    margin = rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5], size=count,
                        p=[0.12, 0.1, 0.2, 0.2, 0.18, 0.12, 0.08])
    records = [
        PairRecord(prompt=[{"role": "user", "content": f"question {i}: {text(2 * i)[:200]}"}],
                   chosen=[{"role": "assistant", "content": text(2 * i)}],
                   rejected=[{"role": "assistant", "content": text(2 * i + 1)}],
                   source="synthetic", source_row=i, meta=json.dumps({"row": i}),
                   score_chosen=float(min(rejected[i] + margin[i], 10.0)), score_rejected=float(rejected[i]))
        for i in range(count)
    ]
    pairs = directory / "pairs.parquet"
    write_artifact(pairs, records_to_table(records), kind="pairs", schema_version=SCHEMA_VERSION,
                   provenance={"source": "benchmarks/plan_60k.py", "seed": seed})
    annotated = count - count // 50  # 2% left unannotated
    annotations = pa.table({
        "pair_id": [r.pair_id for r in records[:annotated]],
        "category": [str(c) for c in rng.choice(ann_schema.CATEGORIES, size=annotated)],
        "magnitude": rng.choice([0.0, 1.0, 1.5, 2.0, 3.0], size=annotated),
        "confidence": np.round(rng.uniform(0.3, 1.0, size=annotated), 3),
    }, schema=ann_schema.ARROW_SCHEMA)
    annotations_path = directory / "annotations.parquet"
    write_artifact(annotations_path, annotations, kind=ann_schema.KIND,
                   schema_version=ann_schema.SCHEMA_VERSION,
                   provenance={"pairs_sha256": file_sha256(pairs), "teacher": "synthetic"})
    return pairs, annotations_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        pairs, annotations = make_inputs(directory, args.pairs)
        print(f"inputs: {args.pairs:,} pairs ({pairs.stat().st_size / 1e6:.1f} MB) + annotations, "
              f"built in {time.perf_counter() - start:.1f} s (not timed)")
        schedule = resolve_schedule(PRESET)
        plan_times, report_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = build_plan(pairs, annotations, schedule, preset=PRESET)
            write_plan(result, directory / "plan.parquet")
            plan_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_report(result.table, result.provenance, report_dir(directory / "plan.parquet"))
            report_times.append(time.perf_counter() - start)
        counts = result.provenance["counts"]
        print(f"routes {counts['routes']}, unannotated {counts['unannotated']}")
        print(f"plan ({PRESET}, build + write), {args.pairs:,} pairs: "
              f"median {statistics.median(plan_times):.3f} s over {args.repeats} runs "
              f"(min {min(plan_times):.3f}, max {max(plan_times):.3f}); target < 10 s")
        print(f"report: median {statistics.median(report_times):.3f} s")


if __name__ == "__main__":
    main()
