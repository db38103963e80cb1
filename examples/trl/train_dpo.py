"""A plain TRL DPO script that trains on a perpair plan. Three lines differ from stock TRL, marked ``perpair``.

    perpair prepare data.jsonl -o pairs.parquet
    perpair plan pairs.parquet --preset mixdpo -o plan.parquet
    python examples/trl/train_dpo.py --pairs pairs.parquet --plan plan.parquet --output-dir out

MixDPO's plan smooths labels (ε 0.1): with TRL's default ``sigmoid`` the trainer makes it cDPO, MixDPO's loss (TRL's
own sigmoid ignores ε; its ``robust`` is rDPO, another loss). One epoch reads the curriculum once, easy to hard.

Any TRL preference dataset saved as Parquet works in place of the pairs file (prompt/chosen/rejected or an implicit
prompt, standard or conversational) as long as it holds the pairs the plan was made from: pairs
are matched by perpair's ``pair_id``.
``--model smollm2`` (the default) is the offline SmolLM2-135M-Instruct checkpoint perpair ships.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

from perpair.integrations.trl import PerPairDPOTrainer  # perpair 1/3 (was: from trl import DPOTrainer)
from perpair.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="the pairs file (perpair prepare) or any TRL parquet")
    parser.add_argument("--plan", required=True, help="the plan file (perpair plan)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--loss-type", default="sigmoid",
                        help="TRL's loss_type (sigmoid with the plan's ε is cDPO; robust is rDPO)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU in float32 (the default without a CUDA GPU; with one: bf16 on the GPU)")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()  # Transformers refuses bf16 without a GPU

    model_path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # every column but the pairs file's ratings maps, which datasets cannot read (TRL reads none of them): a TRL
    # parquet with an implicit prompt (chosen/rejected only) is read as TRL would read it
    table = pq.read_table(args.pairs)
    table = table.select([f.name for f in table.schema if not pa.types.is_map(f.type)])
    dataset = Dataset.from_list(table.to_pylist())
    config = DPOConfig(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
                       loss_type=[args.loss_type], num_train_epochs=args.epochs, max_steps=args.max_steps,
                       max_length=args.max_length, learning_rate=5e-7, logging_steps=1,
                       report_to=[], save_strategy="no", use_cpu=cpu, bf16=not cpu)
    trainer = PerPairDPOTrainer(  # perpair 2/3 (was: DPOTrainer)
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        plan=args.plan,  # perpair 3/3
    )
    trainer.train()
    trainer.save_model()
    with (Path(args.output_dir) / "log_history.jsonl").open("w") as out:
        out.writelines(json.dumps(h) + "\n" for h in trainer.state.log_history)


if __name__ == "__main__":
    main()
