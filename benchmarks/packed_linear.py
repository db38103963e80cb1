"""Inference stages with linear layers prepacked for oneDNN (perpair.onednn) against the same model unpacked.

    python benchmarks/packed_linear.py [--threads 1] [--repeats 3] [--pairs 25]

SmolLM2-135M-Instruct on this CPU, the work of one of the demo's stages each, the same model object packed
(``pack_linears``) and unpacked in turn, alternating after a warm-up; medians of --repeats:
* held-out evaluation: the log-probs of the first --pairs UltraFeedback sample pairs at max length 256 in
  float32, packed 1,024 tokens per forward (as the demo's ``eval.ARM.preference`` stage);
* reference pass: the same under bfloat16 autocast over the float32 model (as the demo's ``reference`` stage);
* generation: greedy answers of 96 tokens to 8 AlpacaEval instructions in one batch, bfloat16;
* judge: the AlpacaEval judge's next-token log-probs of ``m`` / ``M`` for those 8 instructions (the reference
  answer against the model's), bfloat16, one prompt per forward.
Each line prints both times, their ratio and how far the results are apart (the largest log-prob difference,
or how many answers are the same text). One thread is what each of the demo's two workers has.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from perpair.onednn import PROMPT_ROWS, pack_linears, unpack_linears

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UF_TRAIN = DATA / "ultrafeedback" / "train_1k.jsonl.gz"
ALPACA = DATA / "alpaca_eval"


def timed(model, rows: int, dtype: torch.dtype | None, work: Callable[[], object],
          repeats: int) -> dict[str, tuple[list[float], object]]:
    """``work()`` with ``model`` unpacked and packed in turn: seconds of each run and the last result of each."""
    runs: dict[str, tuple[list[float], object]] = {"plain": ([], None), "packed": ([], None)}
    for round_ in range(repeats + 1):  # the first round warms up
        for mode in runs:
            if mode == "packed" and not pack_linears(model, rows=rows, dtype=dtype):
                raise SystemExit("oneDNN cannot run packed linear layers here (see perpair.onednn.supported)")
            start = time.perf_counter()
            with torch.inference_mode():
                result = work()
            seconds = time.perf_counter() - start
            unpack_linears(model)
            if round_:
                runs[mode][0].append(seconds)
            runs[mode] = (runs[mode][0], result)
    return runs


def report(name: str, runs: dict[str, tuple[list[float], object]], difference: str) -> None:
    plain, packed = (statistics.median(runs[m][0]) for m in ("plain", "packed"))
    print(f"{name:28s} plain {plain:7.2f} s  packed {packed:7.2f} s  {plain / packed:4.2f}x  {difference}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from transformers import AutoTokenizer

    from perpair.data import PrepareOptions, prepare, read_pairs
    from perpair.eval.judges import chatml_to_messages, fill_template, is_switched
    from perpair.llm.scoring import OptionScorer
    from perpair.models import load_causal_lm, resolve_model
    from perpair.train.logprobs import logps_of_tokenized, tokenize_table

    path = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, {args.threads} thread(s), "
          f"load average {__import__('os').getloadavg()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="packed_linear_") as tmp:
        prepare([str(UF_TRAIN)], f"{tmp}/uf.parquet", PrepareOptions())
        pairs, _ = read_pairs(f"{tmp}/uf.parquet")
    _, tokenized = tokenize_table(tokenizer, pairs.slice(0, args.pairs), 256)
    tokens = sum(p.tokens for p in tokenized)
    model = load_causal_lm(path, dtype=torch.float32).eval()
    for name, autocast in (("held-out evaluation (fp32)", None), ("reference pass (bf16)", torch.bfloat16)):
        runs = timed(model, PROMPT_ROWS, autocast, lambda a=autocast: logps_of_tokenized(
            model, tokenized, tokens_per_forward=1024, autocast_dtype=a)[0], args.repeats)
        delta = (runs["plain"][1] - runs["packed"][1]).abs().max().item()
        report(f"{name}", runs, f"{len(tokenized)} pairs, {tokens} tokens; largest log-prob difference {delta:.2e}")

    model = load_causal_lm(path, dtype=torch.bfloat16).eval()
    references = json.loads(gzip.open(ALPACA / "reference_outputs_gpt4_1106_preview.json.gz").read())[:8]
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                           add_generation_prompt=True) for r in references]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate() -> list[str]:
        out = model.generate(**batch, max_new_tokens=96, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    runs = timed(model, 8, None, generate, args.repeats)
    answers = runs["plain"][1]
    same = sum(a == b for a, b in zip(answers, runs["packed"][1], strict=True))
    report("generation (bf16)", runs, f"8 answers of up to 96 tokens; {same} of 8 the same text")

    template = (ALPACA / "judge_prompt_alpaca_eval_clf.txt").read_text()
    prompts = []
    for ref, answer in zip(references, answers, strict=True):
        first, second = (answer, ref["output"]) if is_switched(ref["instruction"]) else (ref["output"], answer)
        messages = chatml_to_messages(fill_template(template, ref["instruction"], first, second))
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    scorer = OptionScorer(model, tokenizer, batch_size=1, max_length=8192)
    runs = timed(model, PROMPT_ROWS, None, lambda: [s.logprob for s in scorer.score(prompts, ["m", "M"])],
                 args.repeats)
    delta = max(abs(a - b) for x, y in zip(runs["plain"][1], runs["packed"][1], strict=True)
                for a, b in zip(x, y, strict=True))
    judged = sum(len(scorer.encode(p)) for p in prompts)
    report("judge (bf16)", runs, f"8 prompts, {judged} tokens; largest log-prob difference {delta:.2e}")
    print(f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)


if __name__ == "__main__":
    main()
