"""Hardware and time of the recipes BY CALCULATION (nothing here was measured on a GPU).

Prints the figures quoted in the recipes' READMEs. Every input is an assumption stated below; change one and
re-run (``python examples/estimate.py``). Token means: measured with SmolLM2's tokenizer on the 994 pairs of
shared/data/ultrafeedback/train_1k.jsonl.gz after ``perpair prepare`` (see examples/README.md).
"""

from __future__ import annotations

# --- measured on the UltraFeedback sample (SmolLM2 tokenizer, chat template, as `perpair train` tokenizes) ---
TOKENS_PER_PAIR = 716.8  # prompt once + chosen + rejected, max_length 1024 (prompt 181.3, chosen 282.5, rejected 252.9)
REJECTED_TOKENS = 252.9  # not computed for pairs routed to SFT
KEPT_AT_1024 = 970 / 994  # pairs whose prompt fits max_length 1024 (the rest are skipped, as TRL does)
ANNOTATION_PROMPT_TOKENS = 892.6  # the gap@v1 teacher prompt (template + prompt + both responses)

# --- assumptions (stated, not measured) ---
PAIRS = 61_135  # HuggingFaceH4/ultrafeedback_binarized train_prefs rows (dataset card); SP²DPO reports 59,960
PREPARED = PAIRS * 0.994  # perpair prepare excluded 6 of 1,000 sample rows as degenerate
SFT_SHARE_MIXDPO = 0.12  # ties routed to SFT (MixDPO: 12% of UltraFeedback)
H100_BF16 = 989e12  # H100 SXM dense bf16 peak, FLOP/s
MFU = 0.30  # assumed model FLOPs utilisation of training: one pair (~720 tokens) per forward under FSDP
MFU_REFERENCE = 0.30  # the reference pass (forward only, packed pairs; every GPU computes a share)
NVLINK_BUS = 360e9  # bytes/s per GPU achievable in all-gather / reduce-scatter on 8×H100 SXM (450 GB/s peak)
ANSWER_TOKENS = 120  # assumed mean teacher answer (JSON + a rationale of at most 300 characters; max_tokens 256)
TEACHER_PARAMS = 70.6e9  # a Llama-3.3-70B-Instruct teacher
TEACHER_PREFILL_MFU = 0.40  # vLLM prefill, assumed
TEACHER_DECODE_TPS = 2_500  # vLLM output tokens/s of one TP=4 replica at ~256 requests in flight, assumed
TEACHER_REPLICAS, TEACHER_GPUS = 2, 4  # two TP=4 replicas on the 8-GPU node, sharing the load (base_urls)


def training(name: str, params: float, gpus: int, sft_share: float = 0.0, batch: int = 160) -> None:
    pairs = PREPARED * KEPT_AT_1024
    tokens = pairs * (TOKENS_PER_PAIR - sft_share * REJECTED_TOKENS)
    ref_tokens = pairs * (1 - sft_share) * TOKENS_PER_PAIR  # SFT-routed pairs need no reference
    policy_flops = 6 * params * tokens
    ref_flops = 2 * params * ref_tokens
    compute_s = policy_flops / (gpus * MFU * H100_BF16)
    ref_s = ref_flops / (gpus * MFU_REFERENCE * H100_BF16)
    # FSDP full shard: per forward (one pair) each GPU receives (g-1)/g of the bf16 weights twice (all-gather in the
    # forward and again in the backward); gradients are reduce-scattered once per step (no_sync in between), fp32.
    comm_bytes = 2 * 2 * params * (gpus - 1) / gpus
    step_bytes = 4 * params * (gpus - 1) / gpus
    comm_s = ((pairs / gpus) * comm_bytes + (pairs // batch) * step_bytes) / NVLINK_BUS
    sharded = 16 * params / gpus  # bf16 weight + bf16 grad + fp32 master + Adam m, v (ZeRO-3) = 16 B/param
    print(f"## {name}: N = {params / 1e9:.2f} B, {gpus} × H100, effective batch {batch}")
    print(f"pairs trained (one epoch) = {PAIRS:,} × 0.994 × {KEPT_AT_1024:.3f} = {pairs:,.0f} → "
          f"steps = floor({pairs:,.0f} / {batch}) = {int(pairs // batch)}")
    print(f"tokens per epoch = {pairs:,.0f} × ({TOKENS_PER_PAIR} − {sft_share} × {REJECTED_TOKENS}) "
          f"= {tokens / 1e6:.1f} M")
    print(f"policy 6·N·D = 6 × {params:.3g} × {tokens:.3g} = {policy_flops:.3g} FLOP → "
          f"{compute_s / 60:.0f} min at {MFU:.0%} MFU on {gpus} GPUs")
    print(f"reference 2·N·D = 2 × {params:.3g} × {ref_tokens:.3g} = {ref_flops:.3g} FLOP → "
          f"{ref_s / 60:.0f} min at {MFU_REFERENCE:.0%} MFU on {gpus} GPUs (a share each; once per model+data)")
    print(f"sharding traffic = ({pairs / gpus:,.0f} forwards/GPU × {comm_bytes / 1e9:.1f} GB + {pairs // batch:.0f} "
          f"steps × {step_bytes / 1e9:.1f} GB) / {NVLINK_BUS / 1e9:.0f} GB/s = {comm_s / 60:.0f} min if not overlapped")
    print(f"training time ≈ {max(compute_s, comm_s) / 60:.0f}–{(compute_s + comm_s) / 60:.0f} min "
          f"(+ {ref_s / 60:.0f} min reference) ≈ {(max(compute_s, comm_s) + ref_s) / 3600:.1f}–"
          f"{(compute_s + comm_s + ref_s) / 3600:.1f} h")
    print(f"memory/GPU: sharded states 16 B × N / {gpus} = {sharded / 1e9:.1f} GB; the full fp32 model at load "
          f"(every rank, before sharding) 4 B × N = {4 * params / 1e9:.1f} GB; "
          f"GPU-hours ≈ {gpus * (compute_s + comm_s + ref_s) / 3600:.1f}\n")


def annotation(pairs: float = PREPARED) -> None:
    prefill = pairs * ANNOTATION_PROMPT_TOKENS
    decode = pairs * ANSWER_TOKENS
    prefill_s = 2 * TEACHER_PARAMS * prefill / (TEACHER_REPLICAS * TEACHER_GPUS * TEACHER_PREFILL_MFU * H100_BF16)
    decode_s = decode / (TEACHER_REPLICAS * TEACHER_DECODE_TPS)
    print(f"## annotation: {pairs:,.0f} pairs, one template, teacher N = {TEACHER_PARAMS / 1e9:.1f} B, "
          f"{TEACHER_REPLICAS} vLLM replicas × TP={TEACHER_GPUS}")
    print(f"prompt tokens = {pairs:,.0f} × {ANNOTATION_PROMPT_TOKENS} = {prefill / 1e6:.1f} M; "
          f"answer tokens = {pairs:,.0f} × {ANSWER_TOKENS} = {decode / 1e6:.1f} M")
    print(f"prefill 2·N·tokens = {2 * TEACHER_PARAMS * prefill:.3g} FLOP → {prefill_s / 60:.0f} min at "
          f"{TEACHER_PREFILL_MFU:.0%} MFU on {TEACHER_REPLICAS * TEACHER_GPUS} GPUs")
    print(f"decode {decode / 1e6:.1f} M / ({TEACHER_REPLICAS} × {TEACHER_DECODE_TPS:,} tokens/s) "
          f"= {decode_s / 60:.0f} min")
    print(f"annotation ≈ {(prefill_s + decode_s) / 3600:.1f} h if prefill and decode do not overlap; "
          f"weights 2 B × N = {2 * TEACHER_PARAMS / 1e9:.0f} GB per replica "
          f"({2 * TEACHER_PARAMS / 1e9 / TEACHER_GPUS:.0f} GB/GPU at TP={TEACHER_GPUS}; the rest is KV cache)\n")


if __name__ == "__main__":
    annotation()
    training("Llama-3-8B, SP²DPO", 8.03e9, 8)
    training("Llama-3-8B, MixDPO", 8.03e9, 8, SFT_SHARE_MIXDPO)
    training("Mistral-7B, MixDPO", 7.24e9, 8, SFT_SHARE_MIXDPO)
    training("Qwen3-4B, SP²DPO+MixDPO", 4.02e9, 8, SFT_SHARE_MIXDPO)
