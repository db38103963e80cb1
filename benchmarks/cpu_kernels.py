"""Which dtype each CPU kernel of a bf16-autocast training step should run in: float32 vs bfloat16 side by side.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 10]

Times (median of --repeats, after one warm-up) on this CPU:
* the tree attention of a packed row (CpuTreeAttention, forward + backward; SmolLM2-135M's 9 query / 3 key-value
  heads of 64): four pairs whose prompt / chosen / rejected lengths are those of the demo's UltraFeedback pairs
  (about 300 tokens a pair), then 2x, 4x and 8x longer;
* the output projection of 256 positions onto SmolLM2's 49,152-token vocabulary (one chunk of ChunkedTokenLogps
  until 4 Dec 2026, when it began projecting blocks of vocabulary columns; the same products, cut otherwise).
Under autocast perpair runs the first in float32 and the second in bfloat16 (train/attention.py, train/logprobs.py):
these figures are why. A CPU without bfloat16 matrix units (no AMX / AVX512-BF16) will show other ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from perpair.train.attention import Block, CpuTreeAttention, TreeLayout

HEADS, KV_HEADS, DIM = 9, 3, 64
PAIRS = [(60, 130, 110), (40, 150, 140), (80, 100, 120), (50, 140, 90)]  # prompt, chosen, rejected tokens


def layout(scale: int) -> TreeLayout:
    blocks, pos = [], 0
    for p, c, r in PAIRS:
        p, c, r = p * scale, c * scale, r * scale
        blocks += [Block((pos, pos + p)), Block((pos + p, pos + p + c), (pos, pos + p)),
                   Block((pos + p + c, pos + p + c + r), (pos, pos + p))]
        pos += p + c + r
    return TreeLayout(tuple(blocks))


def median_ms(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; milliseconds, median of {args.repeats}")
    print("| kernel | tokens | float32 ms | bfloat16 ms | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for scale in (1, 2, 4, 8):
        tree = layout(scale)
        length = tree.blocks[-1].queries[1]
        ms = {}
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(1, HEADS, length, DIM, dtype=dtype, requires_grad=True)
            k = torch.randn(1, KV_HEADS, length, DIM, dtype=dtype, requires_grad=True)
            v = torch.randn(1, KV_HEADS, length, DIM, dtype=dtype, requires_grad=True)
            ms[dtype] = median_ms(lambda q=q, k=k, v=v, t=tree: CpuTreeAttention.apply(q, k, v, t.pieces, None)
                                  .sum().backward(), args.repeats)
        print(f"| tree attention, fwd + bwd | {length} | {ms[torch.float32]:.1f} | {ms[torch.bfloat16]:.1f} | "
              f"{ms[torch.bfloat16] / ms[torch.float32]:.2f} |")
    ms = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight = torch.randn(256, 576, dtype=dtype), torch.randn(49152, 576, dtype=dtype)
        ms[dtype] = median_ms(lambda h=hidden, w=weight: torch.mm(h, w.t()), args.repeats)
    print(f"| output projection 256 x 576 x 49,152 | 256 | {ms[torch.float32]:.1f} | {ms[torch.bfloat16]:.1f} | "
          f"{ms[torch.bfloat16] / ms[torch.float32]:.2f} |")


if __name__ == "__main__":
    main()
