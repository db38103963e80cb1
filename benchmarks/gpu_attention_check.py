"""GPU check of tree attention's mask-free path: which SDPA kernel runs, and how far it is from the masked one.

    PYTHONPATH=src python benchmarks/gpu_attention_check.py [--device cuda] [--pairs 8] [--prompt 256]
                                                            [--response 384]

For bfloat16 and float32, with grouped-query heads (32 query / 8 key-value, dim 64) and without (32 / 32), one
packed row of ``--pairs`` pairs runs forward and backward through ``tree_attention_sdpa`` (the path training
takes on a GPU: one SDPA call per block with a lower-right causal bias) and through ``tree_attention_masked``
(the reference: a boolean mask per block). Printed per case: the attention kernels the profiler saw for each
path (``+mask``: handed a mask), the largest difference of outputs and of query/key/value gradients from a
float64 run of the reference (relative to the tensor's largest value) for both paths, and the median forward +
backward time. Then the dispatch: a tiny Llama's packed forward + backward on the device under bf16 autocast
must reach ``tree_attention_sdpa`` in every layer, without a mask or the math kernel. Exit 1 when the new path
runs the math kernel or hands SDPA a mask, is farther from float64 than twice the masked path's error plus its
dtype's rounding, or the dispatch misses it. Under a minute on one GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from perpair.train import attention
from perpair.train.attention import tree_attention_masked, tree_attention_sdpa
from perpair.train.logprobs import CompletionLogps, pack, run_packed
from perpair.train.tokenize import TokenizedPair

# SDPA's GPU kernel ops whose fourth argument is an optional mask (flash takes none)
MASKABLE = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_attention_math")


def kernels_used(fn) -> list[str]:
    """The SDPA kernel ops that ``fn()`` ran, each marked ``+mask`` where it was handed a mask."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    used = set()
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if "attention" not in name or name in ("scaled_dot_product_attention", "_fused_sdp_choice"):
            continue
        masked = name in MASKABLE and len(event.input_shapes) > 3 and bool(event.input_shapes[3])
        used.add(name + ("+mask" if masked else ""))
    return sorted(used)


def run(attention, q, k, v, layout, weights):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, layout, scaling=q.shape[-1] ** -0.5)
    (out.float() * weights).sum().backward()
    return [out.detach()] + [t.grad for t in inputs]


def timed(fn, device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_case(device, dtype, kv_heads, layout, length, tolerance) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 64, dtype=torch.float64, device=device, generator=generator)
               for heads in (32, kv_heads, kv_heads))
    # the [1, T, heads, dim] layout Transformers' attention functions receive, transposed
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    weights = torch.randn(1, length, 32, 64, device=device, generator=generator)
    exact = run(tree_attention_masked, q, k, v, layout, weights.double())
    low = [t.to(dtype) for t in (q, k, v)]
    ok = True
    errors = {}
    for name, implementation in (("bias", tree_attention_sdpa), ("masked", tree_attention_masked)):
        got = run(implementation, *low, layout, weights)
        # relative to each tensor's largest value: gradients are far larger than outputs
        errors[name] = max(((a.double() - b).abs().max() / b.abs().max()).item()
                           for a, b in zip(got, exact, strict=True))
        used = kernels_used(lambda implementation=implementation: run(implementation, *low, layout, weights))
        ms = timed(lambda implementation=implementation: run(implementation, *low, layout, weights), device)
        print(f"  {name:6s} max |Δ|/max vs float64 {errors[name]:.2e}  fwd+bwd {ms:7.2f} ms  "
              f"kernels: {', '.join(used)}")
        if name == "bias" and device.type == "cuda" and any("math" in u or "+mask" in u for u in used):
            print("  FAIL: the mask-free path ran the math kernel or handed SDPA a mask")
            ok = False
    if errors["bias"] > 2 * errors["masked"] + tolerance:
        print(f"  FAIL: the mask-free path is farther from float64 than the masked one by more than {tolerance}")
        ok = False
    return ok


def check_dispatch(device) -> bool:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    calls = []
    original = attention.tree_attention_sdpa

    def record(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    attention.tree_attention_sdpa = record
    try:
        pairs = [TokenizedPair(list(range(1, 20)), list(range(20, 30)), list(range(30, 45)))]
        module = CompletionLogps(model)

        def step():
            calls.clear()
            # as training runs on a GPU: bf16 autocast, where the rotary embedding hands over float32 queries
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                sums, _ = run_packed(module, pack(pairs), device)
            sums.sum().backward()

        used = kernels_used(step)
    finally:
        attention.tree_attention_sdpa = original
    print(f"dispatch on {device.type}: tree_attention_sdpa ran in {len(calls)} of {config.num_hidden_layers} "
          f"layers of a Llama under bf16 autocast; kernels: {', '.join(used)}")
    if device.type == "cpu":
        return True  # the CPU runs the flash pieces
    return len(calls) == config.num_hidden_layers and not any("math" in u or "+mask" in u for u in used)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=384)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    pairs = [TokenizedPair(list(range(args.prompt + i)), list(range(args.response - 3 * i)),
                           list(range(args.response + 5 * i))) for i in range(args.pairs)]
    layout = pack(pairs).layout
    length = layout.blocks[-1].queries[1]
    print(f"one row of {args.pairs} pairs, {length} tokens, {len(layout.blocks)} blocks")
    ok = True
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        for kv_heads in (8, 32):
            print(f"{str(dtype).removeprefix('torch.')}, 32 query heads / {kv_heads} key-value heads")
            ok &= check_case(device, dtype, kv_heads, layout, length, tolerance)
    ok &= check_dispatch(device)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
