"""float32 matrix products of the training step on this CPU: MKL (what PyTorch uses) against oneDNN.

    python benchmarks/cpu_matmul.py [--tokens 1050] [--repeats 15]

PyTorch hands a float32 ``F.linear`` / ``mm`` on a CPU to MKL, whose AVX-512 kernels run on Intel CPUs only;
oneDNN (``torch.ops.mkldnn``, what ``perpair.onednn`` uses for forwards without gradients) has its own for any
AVX-512 CPU. This measures both on the products of one SmolLM2-135M layer in the step of ``benchmarks/vs_trl.py``
(``--tokens`` rows: that workload's ~7,355 tokens over 7 steps): for each linear layer the forward (``x Wᵀ``), the
input gradient (``dy W``) and the weight gradient (``dyᵀ x``), as

* MKL: ``F.linear`` and ``mm``, as the step computes them;
* oneDNN, weight prepacked: the weight laid out once beforehand (not timed), as a frozen weight can be;
* oneDNN, packed per call: the layout made in each call and timed with it, as a weight that changes every step
  (or an activation, the weight gradient's second operand) would need.

Times are the calling thread's CPU time (``time.thread_time``) with one thread, the least of ``--repeats``: what the
product costs that core, however busy the machine's other cores are. Also the 2048³ product, the "matmul peak" of
``vs_trl.py``. Each line prints GFLOP/s and the largest difference from MKL's result.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: hidden, MLP, key/value width (3 of 9 heads × 64)
LAYERS = {"q_proj, o_proj": (HIDDEN, HIDDEN, 2), "k_proj, v_proj": (HIDDEN, KV, 2),
          "gate_proj, up_proj": (HIDDEN, INTERMEDIATE, 2), "down_proj": (INTERMEDIATE, HIDDEN, 1)}


def least_cpu_time(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def packed(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(x: torch.Tensor, weight_packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight_packed, None, "none", [], "")


def products(m: int, k: int, n: int) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """The forward, input gradient and weight gradient of a linear layer ``k → n`` over ``m`` rows, each way."""
    x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    w_packed, wt_packed, xt_packed = packed(w, m), packed(w.t().contiguous(), m), packed(x.t().contiguous(), n)
    dyt = dy.t().contiguous()
    return {
        "forward": {"MKL": lambda: F.linear(x, w),
                    "oneDNN prepacked": lambda: onednn_linear(x, w_packed),
                    "oneDNN per call": lambda: onednn_linear(x, packed(w, m))},
        "input grad": {"MKL": lambda: dy.mm(w),
                       "oneDNN prepacked": lambda: onednn_linear(dy, wt_packed),
                       "oneDNN per call": lambda: onednn_linear(dy, packed(w.t().contiguous(), m))},
        "weight grad": {"MKL": lambda: dy.t().mm(x),
                        "oneDNN prepacked": lambda: onednn_linear(dyt, xt_packed),
                        "oneDNN per call": lambda: onednn_linear(dy.t().contiguous(), packed(x.t().contiguous(), n))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1050, help="rows of each product (tokens of one forward)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ways = ("MKL", "oneDNN prepacked", "oneDNN per call")
    totals = dict.fromkeys(ways, 0.0)
    print(f"float32, 1 thread, {args.tokens} rows; GFLOP/s (least CPU time of {args.repeats}); max |difference| "
          "from MKL")
    print(f"{'layer':20}{'product':13}" + "".join(f"{w:>18}" for w in ways) + f"{'difference':>12}")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = {"MKL": lambda: F.linear(a, b), "oneDNN prepacked": lambda: onednn_linear(a, big_packed),
           "oneDNN per call": lambda: onednn_linear(a, packed(b, 2048))}
    big_packed = packed(b, 2048)
    cases = [("2048³", "", 2048 ** 3 * 2, big, 0)]
    for name, (k, n, count) in LAYERS.items():
        for product, fns in products(args.tokens, k, n).items():
            cases.append((name, product, 2 * args.tokens * k * n, fns, count))
    for name, product, flop, fns, count in cases:
        seconds = {w: least_cpu_time(fns[w], args.repeats) for w in ways}
        reference = fns["MKL"]()
        difference = max((fns[w]() - reference).abs().max().item() for w in ways[1:])
        for w in ways:
            totals[w] += count * seconds[w]
        print(f"{name:20}{product:13}" + "".join(f"{flop / seconds[w] / 1e9:18.1f}" for w in ways)
              + f"{difference:12.1e}")
    print("one layer's products (forward + both gradients), CPU seconds: "
          + ", ".join(f"{w} {totals[w] * 1e3:.1f} ms" for w in ways)
          + "; MKL / oneDNN: " + ", ".join(f"{w} {totals['MKL'] / totals[w]:.3f}" for w in ways[1:]))


if __name__ == "__main__":
    main()
