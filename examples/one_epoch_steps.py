"""Print the optimizer steps of exactly one epoch for a train config: floor(pairs the run can train / batch_size).

``perpair train`` has no ``epochs`` key: a run longer than the data wraps around to the start of the order, which
would restart a curriculum. The pairs it can train are the plan's trained pairs (or all pairs without a plan)
whose prompt, tokenized with the model's chat template, leaves room under ``max_length`` (the others are skipped,
as TRL does). Usage: ``python one_epoch_steps.py train.yaml`` (run from the folder the config's paths start from).
"""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from perpair.data import read_pairs
from perpair.models import resolve_model
from perpair.train import load_config


def main(path: str) -> int:
    config = load_config(path)
    table, _ = read_pairs(config.data)
    rows = range(table.num_rows)
    if config.plan is not None:
        plan = pq.read_table(config.plan, columns=["pair_id", "route", "order"]).to_pylist()
        trained = {p["pair_id"] for p in plan if p["route"] != "drop" and p["order"] is not None}
        ids = table.column("pair_id").to_pylist()
        rows = [i for i in rows if ids[i] in trained]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    prompts = table.column("prompt")
    fits = sum(1 for i in rows if len(tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in prompts[i].as_py()],
        tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]) < config.max_length)
    print(fits // config.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
