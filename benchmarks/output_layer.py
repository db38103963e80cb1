"""A frozen output layer's log-probs, forward + backward: the gradient taken in the forward vs recomputed.

    python benchmarks/output_layer.py [--threads 1] [--positions 1000] [--repeats 5]

A LoRA run's output layer (SmolLM2's tied 49,152 × 576 embedding) is frozen. perpair's ChunkedTokenLogps then
computes each row's gradient direction, (softmax − onehot(target)) @ weight, in the forward from the chunk's
logits at hand, and its backward is one multiplication (train/logprobs.py). The way before, written out below as
the baseline, kept only the log-sum-exps and in the backward projected each chunk again, redid its softmax and
took the product. Both run on the same random hidden states and targets, in chunks of 256 positions, the
weight already in the hidden states' dtype (under autocast perpair casts a frozen head once for the run), and
give the same gradient up to rounding (printed). --positions 1000 is about one step of the demo's arms (4 pairs
of ~260 completion tokens); one thread is what each of the demo's two workers has. Medians of --repeats,
alternating the two after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from perpair.train.logprobs import ChunkedTokenLogps

VOCAB, HIDDEN, CHUNK = 49152, 576, 256


class RecomputedTokenLogps(torch.autograd.Function):
    """The baseline: log-sum-exps kept, each chunk's logits projected again in the backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        out, lse = torch.empty(hidden.shape[0]), torch.empty(hidden.shape[0])
        for start in range(0, hidden.shape[0], CHUNK):
            part = slice(start, start + CHUNK)
            logits = (hidden[part] @ weight.t()).float()
            lse[part] = torch.logsumexp(logits, -1)
            out[part] = logits.gather(1, target[part, None]).squeeze(1) - lse[part]
        ctx.save_for_backward(hidden, weight, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], CHUNK):
            part = slice(start, start + CHUNK)
            grad = (hidden[part] @ weight.t()).float().sub_(lse[part, None]).exp_().mul_(-grad_out[part, None])
            grad.scatter_add_(1, target[part, None], grad_out[part, None])
            grad_hidden[part] = grad.to(hidden.dtype) @ weight
        return grad_hidden, None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.05
    hidden = torch.randn(args.positions, HIDDEN, generator=generator)
    target = torch.randint(0, VOCAB, (args.positions,), generator=generator)
    grad_out = torch.randn(args.positions, generator=generator)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.positions} positions; milliseconds of a "
          f"forward + backward, median of {args.repeats}")
    print("| dtype | gradient in the forward (perpair) | recomputed in the backward | ratio | max difference |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        w, h = weight.to(dtype), hidden.to(dtype).requires_grad_()

        def ours(w=w, h=h):
            return torch.autograd.grad(ChunkedTokenLogps.apply(h, w, None, target, CHUNK), h, grad_out)[0]

        def recomputed(w=w, h=h):
            return torch.autograd.grad(RecomputedTokenLogps.apply(h, w, target), h, grad_out)[0]

        difference = (ours().float() - recomputed().float()).abs().max().item()  # also the warm-up
        times = {ours: [], recomputed: []}
        for _ in range(args.repeats):
            for work in times:
                start = time.perf_counter()
                work()
                times[work].append(1000 * (time.perf_counter() - start))
        a, b = statistics.median(times[ours]), statistics.median(times[recomputed])
        print(f"| {str(dtype).removeprefix('torch.')} | {a:.0f} | {b:.0f} | {b / a:.2f}x | {difference:.2g} |")


if __name__ == "__main__":
    main()
