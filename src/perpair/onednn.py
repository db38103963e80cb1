"""Frozen linear layers prepacked for oneDNN: inference on a CPU without re-laying out a weight at every call.

On a CPU ``F.linear`` hands a float32 product to MKL and a bfloat16 one to oneDNN, which first reorders the
weight into its blocked layout, at every call. A model that only runs forwards (the reference pass, the
held-out evaluation, the local teacher and judge, generation) can keep each weight in that layout once: oneDNN's
prepacked linear (``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``, the pair PyTorch's own
compiler emits for frozen CPU models). On the demo's stages, SmolLM2-135M on one core of an AMD EPYC
(``python benchmarks/packed_linear.py``, medians of 2): generating 8 answers of 96 tokens 1.35x faster (a token
step's products have 8 rows, where the per-call reorder costs as much as the product), the float32 held-out
forward 1.21x (oneDNN's kernels against MKL's generic ones, which MKL runs on a non-Intel CPU unless
:mod:`perpair.mkl`'s library is preloaded: with it, float32 layers are left unpacked, :func:`supported`), the
bfloat16 reference pass and judge 1.05x. bfloat16 results were identical to ``F.linear``'s there (the same oneDNN
kernels without the reorder); float32 ones differ from MKL's in the last bits (another summation order: 1.7e-4 at
most on log-prob sums of ~300 nats).

A packed layer computes packed only where that is the same computation: no gradient wanted, input on the CPU in
the weight's dtype or, under CPU autocast, in autocast's (the weight is packed once per dtype, as autocast would
cast it). Anything else (training, another device, another dtype) goes through the layer's own forward. A packed
copy follows its weight: changed in place, it is packed again. Packing needs memory beside the weights; a model
whose copies would take more than half of the memory available is left as it is.
"""

from __future__ import annotations

import functools
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perpair import mkl

PROMPT_ROWS = 512  # pack_linears' rows for a model that reads whole prompts or pairs per forward


@functools.cache
def bf16_units() -> bool:
    """Whether this x86 CPU has bfloat16 units (AVX512-BF16 or AMX) for oneDNN's bfloat16 products. Without them the
    products are emulated: on an AMD EPYC with AVX2 only (Zen 3), bfloat16 against float32, one thread
    (``python benchmarks/demo_precision.py``, 7 Dec 2026): the demo's local teacher 6.2x slower, the judge 5.1x,
    generation 2.0x. Another architecture (an ARM CPU, whose bfloat16 instructions these probes do not see), or a
    PyTorch without the probes, counts as having them: nothing is said."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return all(probe is None for probe in probes) or any(probe() for probe in probes if probe is not None)


_NOTED: set[str] = set()


def emulated_bf16_note(what: str, instead: str) -> str | None:
    """The note for ``what`` computing in bfloat16 on this CPU, where it has no bfloat16 units (else None):
    ``instead``, the setting that computes in float32. Once per process and setting (``perpair run`` loads its
    judge and generator for every arm)."""
    if bf16_units() or instead in _NOTED:
        return None
    _NOTED.add(instead)
    return (f"note: {what} computes in bfloat16 on a CPU without bfloat16 units (AVX512-BF16 or AMX), where its "
            f"products are emulated, several times slower than in float32 (6x for the demo's local teacher on an "
            f"AVX2 CPU); {instead} is faster here")


def note_emulated_bf16(dtype: torch.dtype, device: torch.device | str, what: str, instead: str) -> None:
    """On stderr, :func:`emulated_bf16_note` where ``what`` computes in ``dtype`` bfloat16 on a CPU ``device``."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and (note := emulated_bf16_note(what, instead)):
        sys.stderr.write(note + "\n")


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """Whether this PyTorch can run a prepacked oneDNN linear layer in ``dtype`` on this CPU."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        # float32 gains by oneDNN's AVX-512 kernels where MKL runs its generic ones (an AMD CPU); with perpair.mkl's
        # library preloaded MKL runs the CPU's own, and the reference pass of benchmarks/vs_trl.py took as long
        # unpacked (runs of 62.9 / 62.9 s against 63.0 / 65.5 s packed, 6 Dec 2026) without the packed copies.
        return not mkl.active()
    return dtype == torch.bfloat16 and bool(ops._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module, rows: int = 8, dtype: torch.dtype | None = None) -> int:
    """Let every ``nn.Linear`` of ``model`` (on the CPU) compute with its weight prepacked for oneDNN when it runs
    without gradients; ``rows``: the rows a product typically has (oneDNN picks the layout for it); ``dtype``: the
    one the forwards will run in (default: the weights'; bfloat16 for a float32 model run under autocast). Returns
    how many layers are packed: 0 when oneDNN cannot (another device, dtype or PyTorch build) or the copies would
    not fit."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    if not layers or not supported(dtype := dtype or layers[0].weight.dtype):
        return 0
    if 2 * sum(m.weight.numel() * dtype.itemsize for m in layers) > available_memory():
        return 0
    for layer in layers:
        layer.__class__ = PackedLinear  # the same module (parameters, state dict, hooks) with another forward
        layer._packs, layer._rows = {}, rows
        layer.packed(dtype)  # now, not in the first forward
    return len(layers)


def unpack_linears(model: nn.Module) -> None:
    """Undo :func:`pack_linears` (and free the packed copies)."""
    for layer in model.modules():
        if type(layer) is PackedLinear:
            layer.__class__ = nn.Linear
            del layer._packs, layer._rows


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that :func:`pack_linears` gave a packed copy of its weight (per dtype it ran in)."""

    _packs: dict[torch.dtype, tuple[int, Tensor]]
    _rows: int

    def packed(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``, packed (again if the weight changed since)."""
        kept = self._packs.get(dtype)
        if kept is None or kept[0] != self.weight._version:
            kept = self._packs[dtype] = (self.weight._version, pack(self.weight.detach().to(dtype), self._rows))
        return kept[1]

    def forward(self, x: Tensor) -> Tensor:
        dtype = _packed_dtype(self, x)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x.to(dtype), self.packed(dtype), None if self.bias is None else self.bias.to(dtype))


def packed_weight(layer: nn.Module, dtype: torch.dtype) -> Tensor | None:
    """For code that reads a layer's weight and multiplies by it itself (an output layer projected in chunks): the
    packed weight of a :func:`pack_linears` layer in ``dtype``, or None where ``F.linear`` on the weight is due (not
    packed, gradients enabled, ``dtype`` not one oneDNN runs)."""
    if type(layer) is not PackedLinear or torch.is_grad_enabled() or not supported(dtype):
        return None
    return layer.packed(dtype)


def pack(weight: Tensor, rows: int) -> Tensor:
    """``weight`` ``[out, in]`` laid out for :func:`linear`, for products of about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weightᵀ + bias`` with ``weight`` as packed by :func:`pack_linears` (same dtype as ``x``)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_dtype(layer: nn.Linear, x: Tensor) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute ``layer(x)`` in, if the packed weight can compute it the same way:
    no gradient wanted, on the CPU, in the weight's dtype or autocast's."""
    params = (layer.weight, layer.bias) if layer.bias is not None else (layer.weight,)
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                                     for p in params))):
        return None
    cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if cast is not None:  # autocast casts input, weight and bias to its dtype (floating inputs only)
        dtype = cast if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    else:
        dtype = x.dtype if all(p.dtype == x.dtype for p in params) else None
    return dtype if dtype is not None and supported(dtype) else None


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
