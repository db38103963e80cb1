"""The output layer's log-probs, forward + backward: perpair's blocks of vocabulary columns against row chunks.

    python benchmarks/output_layer.py [--threads 1] [--positions 1000] [--repeats 5]

perpair's ChunkedTokenLogps (train/logprobs.py) projects every completion position of a forward onto a block of
at most 4,096 vocabulary columns at a time and merges the blocks' log-sum-exps. Two baselines are written out
below, both projecting 256 positions onto the whole vocabulary at a time:

* ``rows of 256`` — perpair's way before (up to 2026-12-04): the same work per chunk of rows (a frozen output
  layer's gradient direction, (softmax − onehot(target)) @ weight, taken in the forward from the logits at hand;
  a trained one's chunks projected again in the backward);
* ``recomputed`` (a frozen layer only) — the way before that: the log-sum-exps kept and, in the backward, each
  chunk projected again, its softmax redone and multiplied by the weight.

A LoRA run's output layer (SmolLM2's tied 49,152 × 576 embedding) is frozen; full fine-tuning trains it. All run
on the same random hidden states and targets, the weight already in the hidden states' dtype (under autocast
perpair casts a frozen head once for the run), and give the same gradients up to rounding (the largest
difference from perpair's, relative to the gradient's largest value, is printed). --positions 1000 is about one
step of the demo's arms (4 pairs of ~260 completion tokens), 1,400 one forward of benchmarks/vs_trl.py's; one
thread is what each of the demo's two workers has. Medians of --repeats, alternating after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from perpair.train.logprobs import ChunkedTokenLogps

VOCAB, HIDDEN, CHUNK = 49152, 576, 256


def _chunks(rows: int):
    return [slice(start, start + CHUNK) for start in range(0, rows, CHUNK)]


class RowChunkTokenLogps(torch.autograd.Function):
    """Baseline ``rows of 256``: 256 positions onto the whole vocabulary at a time, into one reused buffer."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        out = torch.empty(hidden.shape[0])
        buffer = hidden.new_empty(min(CHUNK, hidden.shape[0]), VOCAB)
        ctx.frozen = not ctx.needs_input_grad[1]
        if ctx.frozen:  # the gradient direction per row, from the logits at hand
            direction = torch.empty_like(hidden)
            for part in _chunks(hidden.shape[0]):
                h, t = hidden[part], target[part, None]
                logp = torch.log_softmax(torch.mm(h, weight.t(), out=buffer[:h.shape[0]]).float(), dim=-1)
                out[part] = logp.gather(1, t).squeeze(1)
                step = logp.exp_().scatter_add_(1, t, logp.new_full(t.shape, -1.0))
                torch.mm(step.to(hidden.dtype), weight, out=direction[part])
            ctx.save_for_backward(direction)
            return out
        lse = torch.empty(hidden.shape[0])
        for part in _chunks(hidden.shape[0]):
            h = hidden[part]
            logits = torch.mm(h, weight.t(), out=buffer[:h.shape[0]]).float()
            lse[part] = torch.logsumexp(logits, dim=-1)
            out[part] = logits.gather(1, target[part, None]).squeeze(1) - lse[part]
        ctx.save_for_backward(hidden, weight, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.frozen:
            (direction,) = ctx.saved_tensors
            return (direction.float() * -grad_out[:, None]).to(direction.dtype), None, None
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros(weight.shape)
        buffer = hidden.new_empty(min(CHUNK, hidden.shape[0]), VOCAB)
        for part in _chunks(hidden.shape[0]):
            h = hidden[part]
            grad = torch.mm(h, weight.t(), out=buffer[:h.shape[0]]).float()
            grad = grad.sub_(lse[part, None]).exp_().mul_(-grad_out[part, None])
            grad.scatter_add_(1, target[part, None], grad_out[part, None])
            torch.mm(grad.to(hidden.dtype), weight, out=grad_hidden[part])
            grad_weight.addmm_(grad.t(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype), None


class RecomputedTokenLogps(torch.autograd.Function):
    """Baseline ``recomputed`` (a frozen layer): log-sum-exps kept, each chunk's logits projected again in the
    backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        out, lse = torch.empty(hidden.shape[0]), torch.empty(hidden.shape[0])
        for part in _chunks(hidden.shape[0]):
            logits = (hidden[part] @ weight.t()).float()
            lse[part] = torch.logsumexp(logits, -1)
            out[part] = logits.gather(1, target[part, None]).squeeze(1) - lse[part]
        ctx.save_for_backward(hidden, weight, target, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for part in _chunks(hidden.shape[0]):
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
    print("| dtype | output layer | perpair: blocks of columns | rows of 256 | recomputed | rows / perpair | "
          "max difference |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for frozen in (True, False):
            h = hidden.detach().to(dtype, copy=True).requires_grad_()
            w = weight.detach().to(dtype, copy=True).requires_grad_(not frozen)
            forwards = {"perpair": lambda h=h, w=w: ChunkedTokenLogps.apply(h, w, None, target, CHUNK),
                        "rows": lambda h=h, w=w: RowChunkTokenLogps.apply(h, w, target)}
            if frozen:
                forwards["recomputed"] = lambda h=h, w=w: RecomputedTokenLogps.apply(h, w, target)
            works = {name: lambda forward=forward, inputs=(h,) if frozen else (h, w):
                     torch.autograd.grad(forward(), inputs, grad_out) for name, forward in forwards.items()}
            grads = {name: work() for name, work in works.items()}  # also the warm-up
            difference = max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
                             for name in works if name != "perpair"
                             for a, b in zip(grads["perpair"], grads[name], strict=True))
            times = {name: [] for name in works}
            for _ in range(args.repeats):
                for name, work in works.items():
                    start = time.perf_counter()
                    work()
                    times[name].append(1000 * (time.perf_counter() - start))
            ms = {name: statistics.median(t) for name, t in times.items()}
            recomputed = f"{ms['recomputed']:.0f}" if frozen else "–"
            print(f"| {str(dtype).removeprefix('torch.')} | {'frozen' if frozen else 'trained'} | "
                  f"{ms['perpair']:.0f} | {ms['rows']:.0f} | {recomputed} | {ms['rows'] / ms['perpair']:.2f}x | "
                  f"{difference:.2g} |")


if __name__ == "__main__":
    main()
