"""The demo's model work in float32 and in bfloat16, side by side: CPU seconds of one thread.

    python benchmarks/demo_precision.py [--rounds 2]

Prepares the first 100 pairs of ../shared/data/ultrafeedback/train_1k.jsonl.gz, then, alternating float32 and
bfloat16 each round, times with SmolLM2-135M-Instruct: the local teacher on 4 pairs (after one warm-up pair), the
AlpacaEval judge on 4 prompts (two 1,500-character answers each), and greedy generation of 48 tokens for 4
instructions. One thread, and CPU seconds beside wall seconds, so that the ratio means something on a CPU that
other jobs share (wall seconds then stretch by the load; CPU seconds much less). Training's autocast is timed by
`perpair train` itself (`precision: bf16`; benchmarks/RESULTS.md, `make demo`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def timed(work, *args) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work(*args)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import pandas as pd

    from perpair.annotate.config import LocalTeacherConfig
    from perpair.annotate.teachers import Call, LocalTeacher
    from perpair.data import PrepareOptions, prepare, read_pairs
    from perpair.eval.generate import GenerationConfig, TransformersGenerator
    from perpair.eval.judges import LocalLogprobJudge, chatml_to_messages, fill_template
    from perpair.models import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = Path(tmp) / "pairs.parquet"
        prepare([str(SHARED / "ultrafeedback" / "train_1k.jsonl.gz")], pairs_path, PrepareOptions(limit=100))
        rows = read_pairs(str(pairs_path))[0].slice(0, 5).to_pylist()
    reference = pd.read_json(SHARED / "alpaca_eval" / "reference_outputs_gpt4_1106_preview.json.gz").iloc[:4]
    template = (SHARED / "alpaca_eval" / "judge_prompt_alpaca_eval_clf.txt").read_text()
    judge_prompts = [chatml_to_messages(fill_template(template, r.instruction, r.output[:1500], r.output[-1500:]))
                     for r in reference.itertuples()]
    instructions = [[{"role": "user", "content": text}] for text in reference["instruction"]]
    model = resolve_model("smollm2")

    times: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):
            teacher = LocalTeacher(LocalTeacherConfig(model="smollm2", dtype=dtype))
            calls = [Call(key=str(i), pair_id=r["pair_id"], teacher=teacher.id, template="gap-local@v1",
                          swapped=False, pair=r) for i, r in enumerate(rows)]
            teacher.annotate_batch(calls[:1])  # loads the model and scores the content-free pair
            times.setdefault(f"teacher, 4 pairs, {dtype}", []).append(
                timed(teacher.annotate_batch, calls[1:]))
            judge = LocalLogprobJudge(model, batch_size=4, dtype=dtype)
            times.setdefault(f"judge, 4 prompts, {dtype}", []).append(timed(judge.judge, judge_prompts))
            generator = TransformersGenerator(model, GenerationConfig(max_new_tokens=48, batch_size=4, dtype=dtype))
            times.setdefault(f"generation, 4 × 48 tokens, {dtype}", []).append(
                timed(generator.generate, instructions))
    print("| work | CPU s (median) | wall s (median) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.2f} | "
              f"{statistics.median(v[1] for v in values):.2f} |")
    print(json.dumps(times))


if __name__ == "__main__":
    main()
