"""`perpair train` through Accelerate's FSDP2 code path on CPU, compared with one process (a check, not a timing).

Accelerate never selects FSDP without a GPU, so the worker forces it: it builds the Accelerator on gloo, then sets
the distributed type to FSDP with an FSDP2 plugin before ``prepare`` and again before each step, clipping and saving
(Accelerate's ``prepare`` resets the forced type). What runs is then FSDP2's real sharding (``fully_shard``),
``no_sync`` (``set_requires_gradient_sync``), DTensor-aware clipping, the sharded checkpoints and the
full-state-dict gathering of ``save_model`` (``tests/test_train_cli.py`` runs the worker to check resuming). A tiny
random Llama, 2 ranks, 3 steps of 4 pairs; printed: per-step loss and gradient norm of both runs, and the largest
difference of the saved weights.

    python benchmarks/fsdp_forced_cpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UF_TRAIN = ROOT.parent / "shared" / "data" / "ultrafeedback" / "train_1k.jsonl.gz"


def worker(argv: list[str]) -> None:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType, set_seed

    from perpair.cli import main
    from perpair.train import loop
    from perpair.train.setup import check_sharding

    def force(accelerator):
        accelerator.state.distributed_type = DistributedType.FSDP

    def setup(config):
        accelerator = Accelerator(cpu=True)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False)
        force(accelerator)
        check_sharding(config, accelerator.distributed_type)
        set_seed(config.seed)
        return accelerator

    def wrap(function):
        def forced(*args, **kwargs):
            force(next(a for a in args if isinstance(a, Accelerator)))
            return function(*args, **kwargs)
        return forced

    def save_model(config, accelerator, module, tokenizer):
        from torch.distributed.tensor import DTensor

        if not (accelerator.is_fsdp2 and all(isinstance(p, DTensor) for p in module.parameters())):
            raise SystemExit("the forced FSDP2 path did not take: the weights are not sharded")
        return saver(config, accelerator, module, tokenizer)

    saver = wrap(loop.save_model)
    loop.setup_accelerator, loop.train_step, loop.save_model = setup, wrap(loop.train_step), save_model
    loop.save_checkpoint = wrap(loop.save_checkpoint)
    Accelerator.clip_grad_norm_ = (lambda clip: lambda self, *a, **k: (force(self), clip(self, *a, **k))[1])(
        Accelerator.clip_grad_norm_)
    sys.argv = ["perpair", *argv]
    main()


def run(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(args[:4])} ... failed:\n{result.stderr[-3000:]}")


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from safetensors.torch import load_file

    from conftest import save_tiny_llama

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_llama(tmp / "model", hidden=64)
        run([sys.executable, "-m", "perpair", "prepare", str(UF_TRAIN), "-o", str(tmp / "uf.parquet")], env)
        common = ["train", "--model", str(model), "--data", str(tmp / "uf.parquet"), "--steps", "3", "--batch-size",
                  "4", "--max-length", "96", "--lr", "1e-4", "--threads", "1", "--set", "tokens_per_forward=0",
                  "--set", f"reference_cache={tmp / 'refcache'}"]
        run([sys.executable, "-m", "perpair", *common, "--out", str(tmp / "one")], env)
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
             __file__, "--worker", *common, "--out", str(tmp / "fsdp")], env)
        runs = {name: [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("one", "fsdp")}
        print("step  loss (1 process)  loss (FSDP2, 2 ranks)  grad norm (1)  grad norm (FSDP2)")
        for a, b in zip(runs["one"], runs["fsdp"], strict=True):
            print(f"{a['step']:>4}  {a['loss']:.8f}        {b['loss']:.8f}             {a['grad_norm']:.6f}"
                  f"       {b['grad_norm']:.6f}")
        one, fsdp = (load_file(tmp / name / "model" / "model.safetensors") for name in ("one", "fsdp"))
        print(f"saved weights: {len(one)} tensors (1 process), {len(fsdp)} (FSDP2); largest difference "
              f"{max((one[k] - fsdp[k]).abs().max().item() for k in one):.2e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
