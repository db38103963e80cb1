"""Local-teacher throughput: SmolLM2-135M-Instruct annotating the prepared UltraFeedback sample.

    python benchmarks/annotate_local.py [--limit 20] [--repeats 3] [--batch-size 1] [--threads 1,2] [--max-chars 400]
                                        [--dtype float32,bfloat16]

Prepares ../shared/data/ultrafeedback/train_1k.jsonl.gz (994 pairs), loads `local:smollm2` once, then annotates
the first --limit pairs --repeats times, each time into a fresh output and cache (likelihood ranking of the
seven categories and four magnitudes), checks every annotation is valid, and prints the median pairs/s
(model load excluded; the load time is printed apart). On a shared CPU, compare figures only within one run;
the teacher scores with one thread on a CPU unless told otherwise (--threads; a list such as 1,2 measures each
in turn, loading the model once per setting; --dtype likewise: the teacher's weights in float32 or bfloat16, as
configs/demo.yaml sets them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from perpair.annotate import annotate, load_config, read_annotations
from perpair.annotate.teachers import LocalTeacher
from perpair.data import PrepareOptions, prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="pairs per repeat (default 20; all: 994)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--max-chars", type=int, default=None, help="override the template's text limits")
    parser.add_argument("--threads", default=None, help="default: the teacher's (1 on a CPU); a list: 1,2")
    parser.add_argument("--dtype", default=None, help="default: the teacher's (float32); a list: float32,bfloat16")
    args = parser.parse_args()
    settings = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    dtypes = args.dtype.split(",") if args.dtype else [None]
    if unknown := [d for d in dtypes if d not in (None, "float32", "bfloat16")]:
        parser.error(f"--dtype: {', '.join(unknown)} is not float32 or bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "uf.parquet"
        prepare([str(DATA)], pairs, PrepareOptions())
        for dtype in dtypes:
            for threads in settings:
                measure(args, pairs, Path(tmp), threads, dtype)


def measure(args, pairs: Path, tmp: Path, threads: int | None, dtype: str | None) -> None:
    config = load_config(None, teachers=["local:smollm2"], limit=args.limit)
    update = {"max_chars": args.max_chars, "threads": threads}
    if dtype is not None:
        update["dtype"] = dtype
    if args.batch_size is not None:
        update["batch_size"] = args.batch_size
    teacher = config.teachers[0].model_copy(update=update)
    config = config.model_copy(update={"teachers": [teacher]})
    started = time.perf_counter()
    loader = LocalTeacher(teacher)
    loader._load()
    load_s = time.perf_counter() - started
    overrides = {teacher.id: {"model": loader._model, "tokenizer": loader._tokenizer}}
    rates, valid, n = [], [], 0
    for repeat in range(args.repeats):
        out = tmp / f"ann{threads}_{dtype}_{repeat}.parquet"
        result = annotate(pairs, config, out, teacher_overrides=overrides)
        table, _ = read_annotations(out)
        n = result.pairs
        valid.append(sum(1 for c in table.column("category").to_pylist() if c is not None))
        rates.append(result.pairs / result.elapsed_s)
        print(f"  repeat {repeat}: {result.pairs} pairs in {result.elapsed_s:.1f}s = {rates[-1]:.2f} pairs/s",
              flush=True)
    threads = loader.threads or torch.get_num_threads()
    print(f"local teacher (SmolLM2-135M, CPU, threads={threads}, dtype={teacher.dtype}, "
          f"batch_size={loader.batch_size}): "
          f"{n} pairs, valid annotations {min(valid)}/{n}; median of {args.repeats}: "
          f"{statistics.median(rates):.2f} pairs/s; model load {load_s:.1f}s")


if __name__ == "__main__":
    main()
