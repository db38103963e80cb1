"""perpair vs TRL's DPOTrainer on the same workload, run alternately, each in a fresh process.

Workload (issue 5): SmolLM2-135M-Instruct in float32, the first pairs of the UltraFeedback sample in file order,
batch 2, max length 512, 2 threads, full fine-tuning, AdamW at a constant learning rate.

Variants: ``trl`` (DPOTrainer defaults but fp32: reference model forward at every step), ``trl-bf16`` (TRL's own
default precision, bf16 autocast, which ``DPOConfig`` turns on even on a CPU), ``trl-precompute``
(``precompute_ref_log_probs=True``), ``trl-malloc`` (TRL defaults under the allocator perpair's command picks, to
show how much of the difference is the allocator), ``trl-preload`` (TRL defaults with everything perpair's command
preloads: the allocator and, on an AMD CPU, MKL's kernels chosen by the CPU's features, ``perpair.mkl``),
``trl-perpair`` (TRL with perpair's plug-in, ``perpair.integrations.trl.PerPairDPOTrainer``, given a plan that
changes nothing: every pair β = 0.1, file order; its cost over ``trl``), ``perpair`` (``perpair train`` as a user
runs it, with its defaults, which include a preloaded allocator and MKL's dispatch — see ``perpair.preload``; empty
reference cache: the reference log-probs are computed in the run), and perpair with one thing changed:
``perpair-bf16`` (``precision: bf16``: bf16 autocast, as TRL's default), ``perpair-unpacked`` (one pair per forward
and the MLPs recomputed, the defaults before issue 17), ``perpair-system`` (glibc's malloc,
``PERPAIR_MALLOC=system``), ``perpair-vendor`` (MKL's own choice of kernels, ``PERPAIR_MKL_DISPATCH=vendor``: its
generic ones on an AMD CPU), ``perpair-heap`` (glibc's malloc keeping freed activations in its heap,
``release_cpu_memory=false``), ``perpair-gc`` (``gradient_checkpointing``), ``perpair-saved-mlp``
(``recompute_mlp=false``: the MLPs save their gate and up projections), ``perpair-nolean``
(``lean_activations=false``), ``perpair-packed`` (``tokens_per_forward`` = batch × max length: all pairs of a step
in one row), ``perpair-packed4`` (``tokens_per_forward`` = 4 × max length), and OpenMP's idle threads:
``perpair-spin`` (``OMP_WAIT_POLICY=ACTIVE``), ``perpair-spin10m`` (``GOMP_SPINCOUNT=10000000``), ``perpair-bind``
(``OMP_PROC_BIND=close``, ``OMP_PLACES=cores``; benchmarks/RESULTS.md: no gain shown).

Reported per variant: the whole run (process start to end, parent-measured wall time), the steady-state step (median
s/step over the steps after the first), peak RSS (the child's ``ru_maxrss``), and useful FLOP/s = 6 × parameters ×
unique non-padding tokens per second over the steps after the first (their tokens over their time; tokens counted
the same way for both: prompt once + chosen + rejected, TRL tokenization), as a share of the fp32 matmul peak
measured in the same run with the same threads and perpair's preloads (bf16 variants: of the bf16 peak). Each bf16
variant's losses and mean log-probs are compared with those of its fp32 counterpart, step by step: step 1 (the same
weights) shows what bf16 does to one computation; the largest difference over the steps adds what it does to the
updates. Also printed: the allocator each perpair variant ran under (its peak memory depends on it: tcmalloc's is
lower than the mimalloc fallback's), and how far ``perpair``'s fp32 losses are from ``trl``'s (same pairs, order and
β: they should agree to float noise).

``--bound`` also replays, alone, every matrix multiplication of perpair's steps after the first (captured from a
real run, same shapes and layouts) and reports the share of the peak perpair would reach if everything else
(attention, elementwise work, the optimizer) took no time: the ceiling of the useful FLOP/s on this machine.

    python benchmarks/vs_trl.py --steps 8 --rounds 1 --bound --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UF_TRAIN = ROOT.parent / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"
PERPAIR_VARIANTS = {  # variant → (the train settings it changes, the environment it changes)
    "perpair": ({}, {}),
    "perpair-bf16": ({"precision": "bf16"}, {}),
    "perpair-unpacked": ({"tokens_per_forward": 0, "recompute_mlp": True}, {}),
    "perpair-system": ({}, {"PERPAIR_MALLOC": "system"}),
    "perpair-vendor": ({}, {"PERPAIR_MKL_DISPATCH": "vendor"}),
    "perpair-heap": ({"release_cpu_memory": False}, {"PERPAIR_MALLOC": "system"}),
    "perpair-gc": ({"gradient_checkpointing": True}, {}),
    "perpair-saved-mlp": ({"recompute_mlp": False}, {}),
    "perpair-nolean": ({"lean_activations": False}, {}),
    "perpair-packed": ({"tokens_per_forward": "batch × max length"}, {}),
    "perpair-packed4": ({"tokens_per_forward": "4 × max length"}, {}),
    "perpair-spin": ({}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "perpair-spin10m": ({}, {"GOMP_SPINCOUNT": "10000000"}),
    "perpair-bind": ({}, {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
}
VARIANTS = ("trl", "trl-bf16", "trl-precompute", "trl-malloc", "trl-preload", "trl-perpair", *PERPAIR_VARIANTS)
PARAMETERS = 134_515_008  # SmolLM2-135M (tied embeddings counted once)


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10, dtype: str = "float32",
                budget: float = 10.0) -> float:
    """Best GFLOP/s of a square matmul of ``dtype`` with ``threads`` threads, in at most ~``budget`` seconds: a dtype
    this CPU has no fast kernels for (bfloat16 without AVX-512 BF16 or AMX, where one 2048² product took minutes and
    the measurement, repeated after every variant, stalled the benchmark) is measured on smaller products."""
    import torch

    torch.set_num_threads(threads)
    probe = torch.randn(256, 256, dtype=getattr(torch, dtype))
    probe @ probe  # (the first product starts the thread pool)
    t = time.perf_counter()
    probe @ probe
    while size > 256 and (time.perf_counter() - t) * (size / 256) ** 3 * repeats > budget:
        size //= 2
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    best, deadline = 0.0, time.perf_counter() + budget
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
        if time.perf_counter() > deadline:
            break
    return best / 1e9


def preloaded_peaks(threads: int, bf16: bool = True) -> tuple[float, float | None]:
    """:func:`matmul_peak` in float32 and (``bf16``) bfloat16, measured in a process with what perpair's command
    preloads (on an AMD CPU MKL's float32 kernels are then those of the CPU's features: ``perpair.mkl``), so a share
    of it is of the peak of the kernels perpair runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LD_PRELOAD": ":".join(perpair_preloads())}
    command = [sys.executable, __file__, "--worker", "peak", "--threads", str(threads)]
    result = subprocess.run(command + ([] if bf16 else ["--fp32-peak-only"]), capture_output=True, text=True,
                            env=env, check=True)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    return peaks["float32"], peaks.get("bfloat16")


def worker_trl(args, precompute: bool, plugin: bool = False, bf16: bool | None = False) -> dict:
    """TRL's DPOTrainer on the workload; ``bf16`` None: DPOConfig's own default (bf16 autocast)."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from perpair.data import read_pairs
    from perpair.models import resolve_model

    torch.set_num_threads(args.threads)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append(time.perf_counter())
            print(f"step {len(stamps) // 2 + 1}", file=sys.stderr, flush=True)  # progress, for a watchdog

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    class SequentialDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    table, _ = read_pairs(args.pairs)
    rows = table.select(["prompt", "chosen", "rejected"]).slice(0, args.pool).to_pylist()
    trainer_class = SequentialDPOTrainer
    if plugin:  # the plug-in with a plan that changes nothing: every pair β = 0.1, preference, in file order
        from perpair.integrations.trl import PerPairDPOTrainer

        trainer_class = PerPairDPOTrainer
        for order, row in enumerate(rows):
            row.update(beta=0.1, route="preference", order=order, label_smoothing=0.0)
    model_dir = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = DPOConfig(output_dir=args.tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                       report_to=[], save_strategy="no", max_length=args.max_length, beta=0.1, use_cpu=True,
                       dataloader_num_workers=0, disable_tqdm=True, precompute_ref_log_probs=precompute,
                       # TRL defaults to bf16 autocast, even on a CPU; the workload is fp32 unless bf16 is None
                       **({} if bf16 is None else {"bf16": bf16}))
    trainer = trainer_class(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Stamp()])
    trainer.train()
    steps = [stamps[i + 1] - stamps[i] for i in range(0, len(stamps) - 1, 2)]
    logged = [h for h in trainer.state.log_history if "logps/chosen" in h]
    return {"step_seconds": steps, "parameters": sum(p.numel() for p in model.parameters()), "bf16": config.bf16,
            "losses": [h["loss"] for h in logged], "logps_chosen": [h["logps/chosen"] for h in logged],
            "logps_rejected": [h["logps/rejected"] for h in logged]}


def worker_trl_reference(args) -> dict:
    """TRL's ``precompute_ref_log_probs=True`` pass alone, timed: the trainer computes the reference log-probs of
    the whole pool when it is built (batch: its default, the training batch size)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from perpair.data import read_pairs
    from perpair.models import resolve_model

    torch.set_num_threads(args.threads)
    seconds: list[float] = []
    plain = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        start = time.perf_counter()
        out = plain(self, *a, **k)
        seconds.append(time.perf_counter() - start)
        return out

    DPOTrainer._precompute_ref_logps = timed
    table, _ = read_pairs(args.pairs)
    rows = table.select(["prompt", "chosen", "rejected"]).slice(0, args.pool).to_pylist()
    model_dir = resolve_model(args.model)
    config = DPOConfig(output_dir=args.tmp, per_device_train_batch_size=args.batch_size, max_steps=1,
                       report_to=[], save_strategy="no", max_length=args.max_length, beta=0.1, use_cpu=True,
                       dataloader_num_workers=0, disable_tqdm=True, precompute_ref_log_probs=True, bf16=False)
    DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=config,
               train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir))
    return {"reference_seconds": sum(seconds), "pairs": len(rows)}


def worker_perpair_reference(args) -> dict:
    """perpair's reference pass alone, timed, through ``perpair train``'s own steps up to it: the first
    ``pool`` pairs (file order) as ``pool / batch`` steps of the run, an empty cache."""
    import torch

    from perpair.train import load_config
    from perpair.train.batches import build_step_batches, load_data
    from perpair.train.setup import compute_reference, load_model, load_tokenizer, setup_accelerator

    torch.set_num_threads(args.threads)
    config = load_config(None, {
        "model": args.model, "data": args.pairs, "out": str(Path(args.tmp) / "out"),
        "steps": args.pool // args.batch_size, "batch_size": args.batch_size, "max_length": args.max_length,
        "beta": 0.1, "threads": args.threads, "reference_cache": str(Path(args.tmp) / "refcache"),
        "save_model": False, "final_checkpoint": False})
    accelerator = setup_accelerator(config)
    data = load_data(config, accelerator)
    tokenizer = load_tokenizer(config)
    batches = build_step_batches(config, data, tokenizer)
    model = load_model(config.model, accelerator)
    start = time.perf_counter()
    # every pair in the pass, none left to the first step's forward: the pass alone is timed
    run = compute_reference(config, data, batches, tokenizer, model, accelerator, from_first_step=False)
    return {"reference_seconds": time.perf_counter() - start, "pairs": run.computed}


def train_settings(args) -> dict:
    """``perpair train``'s settings for the workload (``args``: model, pairs, tmp, steps, batch_size, max_length,
    threads), trained into ``TMP/out``; no checkpoint inside the timing."""
    return {"model": args.model, "data": args.pairs, "out": str(Path(args.tmp) / "out"), "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "beta": 0.1, "lr": 1e-6,
            "lr_schedule": "constant", "threads": args.threads, "reference_cache": str(Path(args.tmp) / "refcache"),
            "save_model": False, "final_checkpoint": False, "save_every_minutes": 0}


def perpair_command(args, changes: dict) -> list[str]:
    """``perpair train`` as a user runs it (``python -m perpair``: the command re-executes itself under its
    allocator), from a YAML config."""
    import yaml

    sizes = {"batch × max length": args.batch_size * args.max_length, "4 × max length": 4 * args.max_length}
    changes = {k: sizes.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    config = {**train_settings(args), **changes}
    path = Path(args.tmp) / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "perpair", "train", str(path)]


def perpair_result(tmp: str) -> dict:
    out = Path(tmp) / "out"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"step_seconds": [m["seconds"] for m in metrics], "tokens": [m["tokens"] for m in metrics],
            "losses": [m["loss"] for m in metrics], "logps_chosen": [m["logps_chosen"] for m in metrics],
            "logps_rejected": [m["logps_rejected"] for m in metrics], "reference_seconds": summary["reference_seconds"],
            # the preloads it ran with (perpair.preload): the allocator, and MKL's dispatch on an AMD CPU
            "allocator": summary["allocator"] + (" + MKL by CPU features" if summary["mkl_dispatch"] == "cpu features"
                                                 else ""),
            "tokens_per_forward": summary["tokens_per_forward"],
            "lean_activations": summary["lean_activations"]}


def worker_bound(args) -> dict:
    """Run perpair's loop, capture the matrix multiplications of the steps after the first, replay them alone."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from perpair.train import load_config, loop, train

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm_.default, aten.bmm.default,
               aten.baddbmm.default}
    captured: list[tuple] = []

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            if func in matmuls:
                def spec(a):
                    return (tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                captured.append((func, [spec(a) for a in args_], {k: spec(v) for k, v in (kwargs or {}).items()}))
            return func(*args_, **(kwargs or {}))

    plain_step = loop.train_step

    def step(config, module, optimizer, scheduler, accelerator, data, schedule, reference, index):
        if index == 0:  # the first step (warm-up) is not counted, as in the comparison
            return plain_step(config, module, optimizer, scheduler, accelerator, data, schedule, reference, index)
        with Capture():
            return plain_step(config, module, optimizer, scheduler, accelerator, data, schedule, reference, index)

    loop.train_step = step
    train(load_config(None, train_settings(args)))

    operands: dict[tuple, torch.Tensor] = {}  # one tensor per shape and layout, drawn once: an optimistic bound

    def operand(value):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple):
            if value not in operands:
                operands[value] = torch.empty_strided(*value).normal_()
            return operands[value]
        return value

    calls = [(func, [operand(a) for a in specs], {k: operand(v) for k, v in kwargs.items()})
             for func, specs, kwargs in captured]

    def replay() -> float:
        start = time.perf_counter()
        for func, inputs, kwargs in calls:
            func(*inputs, **kwargs)
        return time.perf_counter() - start

    def flops(func, inputs) -> int:  # 2·M·N·K of the product, whatever the overload
        a, b = (inputs[1], inputs[2]) if func in (aten.addmm.default, aten.addmm_.default,
                                                  aten.baddbmm.default) else (inputs[0], inputs[1])
        return 2 * a.numel() * b.shape[-1]

    times = [replay() for _ in range(3)]
    return {"matmul_seconds": statistics.median(times), "matmul_calls": len(captured),
            "matmul_flops": sum(flops(func, inputs) for func, inputs, _ in calls)}


def unique_tokens(pairs_path: str, steps: int, batch_size: int, max_length: int) -> list[int]:
    """Per step, prompt + chosen + rejected tokens of the pairs TRL and perpair both train (file order, prompts
    that fill max_length skipped)."""
    from transformers import AutoTokenizer

    from perpair.data import read_pairs
    from perpair.models import resolve_model
    from perpair.train.tokenize import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    table, _ = read_pairs(pairs_path)
    counts = []
    for row in table.select(["prompt", "chosen", "rejected"]).to_pylist():
        pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], max_length)
        if pair is not None:
            counts.append(pair.tokens)
        if len(counts) == steps * batch_size:
            break
    return [sum(counts[s * batch_size:(s + 1) * batch_size]) for s in range(steps)]


def compared(results: dict[str, list[dict]]) -> dict[str, str]:
    """Variant → the one its numbers are compared with: ``X-bf16`` → ``X`` (what bf16 changes), ``perpair`` →
    ``perpair-unpacked`` (what packing changes: float noise only), where both ran."""
    pairs = {name: name.removesuffix("-bf16") for name in results if name.endswith("-bf16")}
    pairs["perpair"] = "perpair-unpacked"
    return {a: b for a, b in pairs.items() if a in results and b in results}


def differences(a: dict, b: dict) -> dict:
    """Run ``a`` against run ``b``: the absolute differences of the per-step loss and mean chosen / rejected
    log-probs at step 1 (the same weights) and at most over the steps, the log-probs also relative."""
    loss = [abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)]
    logps = [(abs(x - y), abs(x - y) / abs(y)) for key in ("logps_chosen", "logps_rejected")
             for x, y in zip(a[key], b[key], strict=True)]
    first = [logps[0], logps[len(loss)]]  # step 1 of chosen and of rejected
    return {"loss_step1": loss[0], "loss_max": max(loss),
            "logps_step1": max(d for d, _ in first), "logps_step1_relative": max(r for _, r in first),
            "logps_max": max(d for d, _ in logps), "logps_max_relative": max(r for _, r in logps)}


def perpair_preloads() -> list[str]:
    """The libraries the ``perpair`` command preloads into itself here (``perpair.preload``)."""
    from perpair.preload import wanted_preloads

    return wanted_preloads()[0]


def run_variant(name: str, args, watch=None) -> dict:
    """Run one variant in a fresh process; ``watch(pid, tmp)``, if given, starts a watchdog whose ``stop()`` says
    why it killed the process (a variant it killed gives ``{"killed": why}`` rather than an error)."""
    with tempfile.TemporaryDirectory(prefix=f"vs_trl_{name}_") as tmp:
        args.tmp = tmp
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if name in PERPAIR_VARIANTS:
            changes, changed_env = PERPAIR_VARIANTS[name]
            cmd = perpair_command(args, changes)
            env.update(changed_env)
        else:
            cmd = [sys.executable, __file__, "--worker", name, "--pairs", args.pairs, "--tmp", tmp,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--threads", str(args.threads), "--pool", str(args.pool),
                   "--model", args.model]
            if name == "trl-malloc":
                from perpair.allocator import find_allocator

                env["LD_PRELOAD"] = find_allocator("auto") or ""
            elif name in ("trl-preload", "ref-perpair", "bound"):  # what perpair's command runs with
                env["LD_PRELOAD"] = ":".join(perpair_preloads())
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with stdout.open("w") as out, stderr.open("w") as err:  # files, not pipes: nothing blocks the child
            start = time.perf_counter()
            process = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
            watchdog = watch(process.pid, Path(tmp)) if watch else None
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (the same process after exec)
            wall = time.perf_counter() - start
        killed = watchdog.stop() if watchdog else None
        if killed:
            return {"variant": name, "killed": killed, "wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}
        if status != 0:
            raise SystemExit(f"{name} failed:\n{stderr.read_text()[-4000:]}")
        if name in PERPAIR_VARIANTS:
            result = perpair_result(tmp)
        else:
            result = json.loads(stdout.read_text().strip().splitlines()[-1])
        result.update(variant=name, wall_seconds=wall, peak_rss_bytes=usage.ru_maxrss * 1024)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool", type=int, default=0,
                        help="pairs handed to TRL, the first of the file (default: steps × batch + 8, enough for "
                             "the run; TRL's precompute_ref_log_probs computes all of them)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds over the variants")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bound", action="store_true",
                        help="also replay perpair's matrix multiplications alone: the ceiling of its useful FLOP/s")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--fp32-peak-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.pool = args.pool or args.steps * args.batch_size + 8
    if args.worker:
        runners = {"trl": partial(worker_trl, args, False), "trl-precompute": partial(worker_trl, args, True),
                   "trl-bf16": partial(worker_trl, args, False, bf16=None),
                   "trl-malloc": partial(worker_trl, args, False), "trl-preload": partial(worker_trl, args, False),
                   "trl-perpair": partial(worker_trl, args, False, plugin=True), "bound": partial(worker_bound, args),
                   "ref-trl": partial(worker_trl_reference, args),
                   "ref-perpair": partial(worker_perpair_reference, args),
                   "peak": lambda: {dtype: matmul_peak(args.threads, dtype=dtype)
                                    for dtype in ("float32",) + (() if args.fp32_peak_only else ("bfloat16",))}}
        print(json.dumps(runners[args.worker]()))
        return

    from perpair.data import PrepareOptions, prepare

    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        args.pairs = str(Path(tmp) / "uf.parquet")
        prepare([str(UF_TRAIN)], args.pairs, PrepareOptions())
        tokens = unique_tokens(args.pairs, args.steps, args.batch_size, args.max_length)
        bf16 = any(name.endswith("-bf16") for name in args.variants.split(","))  # (its peak: only where it is read)
        peak, peak16 = preloaded_peaks(args.threads, bf16)
        results: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for name in args.variants.split(","):
                print(f"round {round_ + 1}: {name} …", file=sys.stderr, flush=True)
                run = run_variant(name, args)
                results.setdefault(name, []).append(run)
                under = f" (allocator: {run['allocator']})" if "allocator" in run else ""
                print(f"  {name}: run {run['wall_seconds']:.1f} s, s/step {run['step_seconds']}, "
                      f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB{under}", file=sys.stderr, flush=True)
                again, again16 = preloaded_peaks(args.threads, bf16)
                peak, peak16 = max(peak, again), (max(peak16, again16) if bf16 else None)
        bound = None
        if args.bound:
            print("matmul-only bound …", file=sys.stderr, flush=True)
            bound = run_variant("bound", args)
            peak = max(peak, preloaded_peaks(args.threads, bf16=False)[0])

    steady_tokens = sum(tokens[1:])
    summary = {}
    for name, runs in results.items():
        bf16 = name.endswith("-bf16")
        step = statistics.median([s for r in runs for s in r["step_seconds"][1:]])
        steady_seconds = statistics.median(sum(r["step_seconds"][1:]) for r in runs)
        summary[name] = {
            "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "step_seconds": step,
            "peak_rss_gib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**30,
            "useful_gflops": 6 * PARAMETERS * steady_tokens / steady_seconds / 1e9,
            "losses": runs[0]["losses"], "bf16": bf16, "peak_gflops": peak16 if bf16 else peak,
            "allocators": sorted({r["allocator"] for r in runs if "allocator" in r}),  # perpair's; TRL: glibc's
        }
    base, pre = summary.get("trl"), summary.get("trl-precompute")
    sixteen = (f", bf16 {peak16:.1f} GFLOP/s ({peak16 / peak:.2f}×; '% peak' of a bf16 variant is of the bf16 peak)"
               if peak16 is not None else " GFLOP/s")
    print(f"matmul peak ({args.threads} threads, with perpair's preloads): fp32 {peak:.1f}{sixteen}; tokens of the "
          f"steps after the first "
          f"{steady_tokens} (per step {tokens[1:]}); rounds {args.rounds}")
    print(f"{'variant':16}{'run s':>9}{'s/step':>9}{'peak GiB':>10}{'GFLOP/s':>9}{'% peak':>8}"
          f"{'run ×':>7}{'step ×':>8}{'step × pre':>11}{'RSS ×':>7}")
    for name, s in summary.items():
        ratios = ""
        if base:
            ratios = (f"{base['wall_seconds'] / s['wall_seconds']:7.2f}{base['step_seconds'] / s['step_seconds']:8.2f}"
                      f"{(pre['step_seconds'] / s['step_seconds']) if pre else float('nan'):11.2f}"
                      f"{s['peak_rss_gib'] / base['peak_rss_gib']:7.2f}")
        print(f"{name:16}{s['wall_seconds']:9.1f}{s['step_seconds']:9.2f}{s['peak_rss_gib']:10.2f}"
              f"{s['useful_gflops']:9.1f}{100 * s['useful_gflops'] / s['peak_gflops']:7.0f}%{ratios}")
    # perpair's peak depends on the allocator its command chose (README: tcmalloc's is 6–19% lower than mimalloc's)
    allocators = {name: ", ".join(s["allocators"]) for name, s in summary.items() if s["allocators"]}
    if allocators:
        trl = [name for name in summary if name.startswith("trl")]
        print("allocators: " + "; ".join(f"{name} {a}" for name, a in allocators.items())
              + ("; TRL's variants glibc's malloc" if trl else "")
              + (" (trl-malloc: the one perpair's command picks)" if "trl-malloc" in trl else "")
              + ("; trl-preload everything perpair's command preloads" if "trl-preload" in trl else ""))
    if "trl" in results and "perpair" in results:  # the same pairs, order and β: the fp32 losses should agree
        gap = differences(results["perpair"][0], results["trl"][0])["loss_max"]
        print(f"perpair vs trl, fp32, first rounds: each step's loss within {gap:.2e}")
    diffs = {name: {"against": other, **differences(results[name][0], results[other][0])}
             for name, other in compared(results).items()}
    if diffs:
        print("|difference| of each step's loss and mean log-probs (chosen, rejected), first rounds: at step 1, "
              "then the largest over the steps")
        for name, d in diffs.items():
            print(f"  {name} vs {d['against']}: loss {d['loss_step1']:.2e}, max {d['loss_max']:.2e}; "
                  f"log-probs {d['logps_step1']:.2e} ({100 * d['logps_step1_relative']:.3f}%), "
                  f"max {d['logps_max']:.2e} ({100 * d['logps_max_relative']:.3f}%)")
    if bound:
        gflops = 6 * PARAMETERS * steady_tokens / bound["matmul_seconds"] / 1e9
        rate = bound["matmul_flops"] / bound["matmul_seconds"] / 1e9
        print(f"matmul-only bound: the {bound['matmul_calls']} matrix multiplications of perpair's steps after the "
              f"first ({bound['matmul_flops'] / 1e12:.2f} TFLOP) take {bound['matmul_seconds']:.1f} s alone, at "
              f"{rate:.1f} GFLOP/s ({100 * rate / peak:.0f}% of peak): {gflops:.1f} useful GFLOP/s, "
              f"{100 * gflops / peak:.0f}% of peak if nothing else took any time")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "matmul_peak_gflops": peak,
                                               "bf16_matmul_peak_gflops": peak16, "differences": diffs,
                                               "tokens_per_step": tokens, "bound": bound}, indent=1))


if __name__ == "__main__":
    main()
