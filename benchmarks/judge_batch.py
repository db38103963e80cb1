"""The local AlpacaEval judge, one prompt per pass against padded batches, side by side: seconds of one thread.

    python benchmarks/judge_batch.py [--prompts 8] [--batch-sizes 1,4,8] [--dtypes float32,bfloat16] [--rounds 2]

SmolLM2-135M-Instruct judges the first N AlpacaEval instructions in the official prompt (GPT-4 Turbo's reference
answer against alpaca-7b's, in the official order), as the demo's judge does on its 8 instructions; each round
runs every batch size and dtype in turn, and the table gives the medians and each batch size's time over one
prompt per pass's. One thread, as a worker of `perpair run` with `workers: 2` on 2 cores has.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AE = ROOT.parent / "shared" / "data" / "alpaca_eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from perpair.eval.judges import LocalLogprobJudge, chatml_to_messages, fill_template, is_switched
    from perpair.models import resolve_model

    template = (AE / "judge_prompt_alpaca_eval_clf.txt").read_text()
    with gzip.open(AE / "annotations" / "alpaca-7b.json.gz", "rt") as handle:
        records = json.load(handle)[:args.prompts]
    prompts = []
    for r in records:
        first, second = (r["output_2"], r["output_1"]) if is_switched(r["instruction"]) else (r["output_1"],
                                                                                              r["output_2"])
        prompts.append(chatml_to_messages(fill_template(template, r["instruction"], first, second)))
    model = resolve_model("smollm2")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    judges = {(d, b): LocalLogprobJudge(model, batch_size=b, dtype=d) for d in dtypes for b in sizes}
    first = judges[dtypes[0], sizes[0]]
    tokens = [len(first.scorer.encode(first.tokenizer.apply_chat_template(p, add_generation_prompt=True,
                                                                          tokenize=False))) for p in prompts]
    print(f"{len(prompts)} judge prompts, {min(tokens)}-{max(tokens)} tokens ({sum(tokens)} in all), "
          f"torch {torch.__version__}, 1 thread")
    for judge in judges.values():  # warm-up: first-call allocations
        judge.judge(prompts[:1])
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in judges}
    for _ in range(args.rounds):
        for key, judge in judges.items():
            started = time.perf_counter()
            judge.judge(prompts)
            seconds[key].append(time.perf_counter() - started)
    print("| dtype | batch size | s (median) | rounds | × one per pass |\n|---|---|---|---|---|")
    for (dtype, size), values in seconds.items():
        ratio = statistics.median(values) / statistics.median(seconds[dtype, sizes[0]])
        print(f"| {dtype} | {size} | {statistics.median(values):.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in values)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
