"""Who owns OUT (``OUT/run.key``), resumable checkpoints (safetensors and JSON only, nothing pickled), the
metrics file a resumed run rewrites, and the final model in Hugging Face format.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from perpair.artifacts import write_text_atomic
from perpair.errors import PerpairError
from perpair.train.config import TrainConfig
from perpair.train.processes import on_main_process
from perpair.train.tracking import TRACKER_RUNS

RUN_KEY = "run.key"
STAGE_KEY = "stage.key"  # `perpair run`'s mark on the train folder it made (read there, not here)
# Settings that change only where a run logs and when it writes checkpoints, never its weights, data order, loss or
# metrics: `perpair run`'s train stage leaves them out of its key too, so changing one trains no arm again.
RECORDING_ONLY = frozenset({"save_every", "save_every_minutes", "keep_checkpoints", "final_checkpoint", "report_to",
                            "project", "run_name"})
# Settings that trade memory for time: the same computation (the same gradients bit for bit, or to float noise where
# pairs are packed or the vocabulary cut otherwise), so that a run that ran out of memory resumes with less. Keyed
# until 7 Dec 2026 (:func:`earlier_run_keys`).
MEMORY_ONLY = frozenset({"gradient_checkpointing", "lean_activations", "recompute_mlp", "tokens_per_forward",
                         "logits_chunk"})
# Settings that do not change what a run computes: a run resumed with other values is the same run.
_NOT_IDENTITY = {"out", "resume", "overwrite", "threads", "reference_cache", "save_model", "release_cpu_memory",
                 *RECORDING_ONLY, *MEMORY_ONLY}
RUN_SETTINGS = "run.settings.json"  # beside run.key: what it hashes, so that a refusal names the settings that differ
# What a run writes into OUT (and --overwrite removes; nothing else in the folder is touched).
_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "model", "adapter", "pairs.parquet", "runs", "wandb",
            TRACKER_RUNS, RUN_KEY, RUN_SETTINGS)  # (runs/: TensorBoard's event files; wandb/: W&B's offline runs)
_RESULTS = ("checkpoints", "summary.json", "model", "adapter")  # besides metrics.jsonl: what a run that trained leaves
SHARDS = "shards"  # under FSDP, a checkpoint's folder of every process's shards
SHARD_FILE_BYTES = 2 << 30


def run_key(config: TrainConfig, *, tokenizer: bool = True, resolved: bool = True, memory: bool = False) -> str:
    """The hash of :func:`run_identity`."""
    return _hashed(run_identity(config, tokenizer=tokenizer, resolved=resolved, memory=memory))


def _hashed(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_identity(config: TrainConfig, *, tokenizer: bool = True, resolved: bool = True,
                 memory: bool = False) -> dict[str, Any]:
    """The identity of a run: a hash of every setting that changes what it computes, and of the contents of the
    files it reads (data, plan, models, and a local model folder's tokenizer: a chat template edited in place between
    a stop and ``--resume`` would tokenize the rest of the run otherwise), so a file rewritten at the same path makes
    another run. ``precision: auto`` is keyed as it resolves where it runs (bf16 autocast on a GPU with it), so a run
    stopped on a GPU and resumed on a CPU, or back, is another run, not one trained half in each precision; a data
    folder (converted on the fly) by the names and contents of its files. ``tokenizer`` False and ``resolved``
    False, and ``memory`` True (the settings of :data:`MEMORY_ONLY` keyed): the key as earlier perpairs wrote it
    (:func:`earlier_run_keys`)."""
    from perpair.artifacts import path_identity
    from perpair.models import config_dropout, model_fingerprint, resolve_model, tokenizer_identity
    from perpair.train.setup import uses_bf16

    def contents(path: str | None) -> object:
        if path is None or not Path(path).exists() or (Path(path).is_dir() and not resolved):
            return path
        return path_identity(path)

    options = config.model_dump(mode="json", exclude=_NOT_IDENTITY - MEMORY_ONLY if memory else _NOT_IDENTITY)
    # disable_dropout (since 7 Dec 2026; before, a model's dropout trained on): keyed only for a model with dropout,
    # so that the keys of the others stay; an earlier perpair's key of a model with dropout is that of false
    if not config_dropout(config.model) or (memory and not config.disable_dropout):
        del options["disable_dropout"]
    if resolved and config.precision == "auto" and uses_bf16(config):  # (auto → float32 keeps "auto", as before)
        options["precision"] = "bf16"
    options["contents"] = {"data": contents(config.data), "plan": contents(config.plan),
                           **{name: model_fingerprint(resolve_model(spec)) for name, spec in
                              (("model", config.model), ("reference_model", config.reference_model)) if spec}}
    # (a Hub id's commit covers its tokenizer files already)
    if tokenizer and (identity := tokenizer_identity(resolve_model(config.model))) is not None:
        options["contents"]["tokenizer"] = identity
    return options


def earlier_run_keys(config: TrainConfig) -> tuple[str, ...]:
    """The keys earlier perpairs wrote for this run, still resumed as this run, so that an upgrade loses no run:
    before 7 Dec 2026 16:00 UTC (the settings of :data:`MEMORY_ONLY` keyed), before 10:00 (``precision: auto`` and a
    data folder keyed as given too), and before 04:00 (nor the tokenizer)."""
    return (run_key(config, memory=True), run_key(config, resolved=False, memory=True),
            run_key(config, tokenizer=False, resolved=False, memory=True))


def check_out(config: TrainConfig, identity: dict[str, Any] | None = None) -> str:
    """Refuse an OUT that holds files no run claimed (even with ``overwrite``: they are the user's), another run's
    outputs (unless ``overwrite``), or this run's checkpoints without ``resume`` (a fresh start would mix its
    checkpoints with theirs); returns this run's key. ``identity``: :func:`run_identity` of ``config``, where the
    caller has it (it hashes the data and plan files). Reads only."""
    out, key = Path(config.out), _hashed(identity if identity is not None else run_identity(config))
    if out.exists() and not out.is_dir():
        raise PerpairError(f"--out {out}: a file, not a folder")
    held = held_key(out)
    if config.lora is not None and held not in (None, key) and held == run_key(config.model_copy(update={
            "lora": config.lora.model_copy(update={"merge": not config.lora.merge})})):
        # lora.merge only adds OUT/model when the run saves its adapter: the same run (its key as it was written), so
        # that `--resume --set lora.merge=true` merges a finished run's adapter instead of refusing it
        key = held
    elif held not in (None, key) and held in earlier_run_keys(config):
        key = held  # a run claimed by an earlier perpair: still resumable, as it was written
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir() and not config.overwrite:
        # (read as no checkpoints: --resume started again, emptying the metrics, and failed at its first checkpoint)
        raise PerpairError(f"--out {out}: its 'checkpoints' is a file, not the folder of a run's checkpoints; remove "
                           "it, or --overwrite to replace the run's outputs")
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != STAGE_KEY) \
        if held is None and out.is_dir() else []
    if others:  # nothing claimed it: what is there is the user's, even under our names (a `model` folder)
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise PerpairError(f"--out {out} holds files that no perpair run wrote ({shown}; no run.key): choose a new "
                           "or empty folder (--overwrite replaces only a perpair run's outputs)")
    occupied = [name for name in _OUTPUTS if (out / name).exists()]
    if config.overwrite or not occupied or (held is not None and not trained(out)):
        return key  # (the last: a run that stopped before its first step, e.g. on a wrong path, left only its claim)
    if held == key:
        saved = checkpoints(out)
        if not saved and (out / "summary.json").is_file():
            # finished, and nothing to resume from (final_checkpoint false, or its checkpoints removed): it trained
            # again from step 1 without a word, its summary and model those of the run before until it ended
            raise PerpairError(f"--out {out} holds this run, finished (summary.json) and with no checkpoint to "
                               "resume from; --overwrite trains it again, or choose another --out")
        if config.resume or not saved:
            return key
        raise PerpairError(f"--out {out} holds this run's checkpoints ({saved[-1].name}); --resume "
                           "continues it, --overwrite starts it again")
    hint = "--resume continues only the run that wrote them; " if config.resume else ""
    raise PerpairError(f"--out {out} holds another run ({_differences(out, config)}); {hint}choose another --out, or "
                       "--overwrite to replace them")


def _differences(out: Path, config: TrainConfig) -> str:
    """What differs between the run that claimed ``out`` (its run.settings.json, where it wrote one) and ``config``."""
    try:
        held = json.loads((out / RUN_SETTINGS).read_text())
    except (OSError, ValueError):
        held = None
    if not isinstance(held, dict):  # (a run of before 7 Dec 2026 16:00 UTC wrote none)
        from perpair.models import config_dropout

        dropout = ("; the model has dropout, which perpair turns off since 7 Dec 2026, as TRL: a run begun before "
                   "resumes with disable_dropout: false" if config.disable_dropout and config_dropout(config.model)
                   else "")
        return f"its run.key differs: other settings, or data, plan, model or tokenizer files changed since{dropout}"
    now = run_identity(config)
    changed = []
    for name in sorted(set(held) | set(now)):
        if name == "contents":
            files = held.get(name) or {}
            changed += [f"{kind}'s contents" for kind in sorted(set(files) | set(now[name]))
                        if files.get(kind) != now[name].get(kind)]
        elif held.get(name) != now.get(name):
            changed.append(f"{name} {json.dumps(held.get(name))} → {json.dumps(now.get(name))}")
    return "it differs in " + "; ".join(changed) if changed else "its run.key differs"


def held_key(out: Path) -> str | None:
    """The key of the run that claimed ``out`` (its run.key), or None."""
    marker = out / RUN_KEY
    # (bytes that are no text, a file overwritten by another program's: no run's key, never UTF-8's traceback)
    return marker.read_bytes().decode(errors="replace").strip() if marker.is_file() else None


def trained(out: Path) -> bool:
    """Whether a run in ``out`` got as far as a step: a line of metrics, a checkpoint, a summary or a model."""
    metrics = out / "metrics.jsonl"
    return (metrics.is_file() and metrics.stat().st_size > 0) or any((out / name).exists() for name in _RESULTS)


def claim_out(config: TrainConfig, key: str, identity: dict[str, Any]) -> None:
    """Main process, after :func:`check_out`: remove the old run's outputs when overwriting or when the run that
    claimed OUT never trained, and mark OUT: ``key`` in run.key, ``identity`` (:func:`run_identity`) in
    run.settings.json where ``key`` is its hash (not an earlier perpair's key, resumed as it was written)."""
    out = Path(config.out)
    if config.overwrite or held_key(out) not in (None, key):
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_KEY).write_text(key + "\n")
    if _hashed(identity) == key:
        (out / RUN_SETTINGS).write_text(json.dumps(identity, sort_keys=True, indent=1) + "\n")


def checkpoints(out: Path) -> list[Path]:
    """The resumable checkpoints in ``out``, oldest first."""
    root = out / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


# Why a checkpoint was written (its state.json's "reason"): save_every's and the final one are the user's and count
# towards keep_checkpoints; the clock's and a stop's only keep the run resumable (with save_every 0, the clock's are
# the only checkpoints a run writes on its way, and count too).
ASKED = ("save_every", "final")
RESUME_POINTS = ("clock", "stop")


def _reason(folder: Path, save_every: int) -> str:
    """Why the checkpoint ``folder`` was written; for one written before checkpoints recorded it, "save_every" where
    its step is a multiple of ``save_every``, else "clock"."""
    try:
        reason = json.loads((folder / "state.json").read_text()).get("reason")
    except (OSError, ValueError, AttributeError):
        reason = None
    if reason in ASKED + RESUME_POINTS:
        return reason
    number = folder.name.removeprefix("step-")
    return "save_every" if save_every and number.isdigit() and int(number) % save_every == 0 else "clock"


def prune_checkpoints(out: Path, keep: int, save_every: int) -> None:
    """Keep the newest ``keep`` of the checkpoints that count (save_every's and the final one; every one when
    save_every is 0) and, of the others (the clock's, a stop's), the newest only while no checkpoint is newer:
    a resume point never pushes out a checkpoint the user asked for (it did: with keep 2, the clock's checkpoint
    after step 300 deleted step 200's, and a run without a final checkpoint ended with one of save_every's)."""
    folders = checkpoints(out)
    reasons = [_reason(f, save_every) for f in folders]
    counted = [f for f, r in zip(folders, reasons, strict=True) if r in ASKED or not save_every]
    kept = set(counted[-keep:])
    if folders and folders[-1] not in counted:
        kept.add(folders[-1])
    for folder in folders:
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def drop_resume_points(out: Path, save_every: int) -> None:
    """At the end of a run that finished without a final checkpoint: remove the checkpoints that only kept it
    resumable (written by the clock, or at a stop signal of an earlier attempt), keeping those save_every wrote
    (an earlier attempt's too, with another save_every), which the user asked for. Each holds the optimizer state
    (~12 bytes a parameter, ~96 GB for an 8B model): they were left in OUT after a run that was asked for no final
    checkpoint."""
    for folder in checkpoints(out):
        if _reason(folder, save_every) not in ASKED:
            shutil.rmtree(folder, ignore_errors=True)
    _drop_cut_short(out)


def _drop_cut_short(out: Path) -> None:
    """Remove the temporary folders of checkpoints whose writing a kill cut short (a SIGKILL after a preemption's
    grace period, in the middle of an FSDP run's shards): never read, each held up to a whole checkpoint's files,
    left in OUT for good. (One training at a time writes OUT: none is another's being written.)"""
    for folder in (out / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(out: Path, step: int, accelerator, module, optimizer, scheduler, config: TrainConfig,
                    reason: str) -> None:
    """Model (trainable weights), optimizer, scheduler, sampler position (the step) and RNG states (every
    process's torch RNG: each draws its own dropout masks), written to a temporary folder and renamed, so a kill
    never leaves half a checkpoint; then the checkpoints beyond ``keep_checkpoints`` go (:func:`prune_checkpoints`).
    ``reason`` (one of ASKED or RESUME_POINTS) is recorded. The main process writes all but the other processes'
    RNG states; a failure there (a full disk) stops every process. Under FSDP each process holds a shard of the
    weights and optimizer state: each writes its own into ``shards/`` (torch.distributed.checkpoint, safetensors),
    nothing gathered."""
    from accelerate.utils import DistributedType

    target = checkpoint_folder(out, step)
    tmp = target.with_name(f".{target.name}.tmp")

    def fresh() -> None:
        _drop_cut_short(out)  # this step's and any other's
        tmp.mkdir(parents=True)

    on_main_process(accelerator, fresh)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / rng_file(accelerator.process_index))
    groups = None
    if accelerator.distributed_type == DistributedType.FSDP:
        groups = _save_shards(tmp / SHARDS, accelerator, module, optimizer, target)
    accelerator.wait_for_everyone()

    def write() -> None:
        _write_checkpoint(out, step, reason, tmp, target, accelerator, module, optimizer, scheduler, groups)
        prune_checkpoints(out, config.keep_checkpoints, config.save_every)

    on_main_process(accelerator, write)


def _write_checkpoint(out: Path, step: int, reason: str, tmp: Path, target: Path, accelerator, module, optimizer,
                      scheduler, sharded_groups: list[dict] | None) -> None:
    if sharded_groups is None:
        groups, shards = _write_weights(tmp, accelerator.unwrap_model(module).model, optimizer), {}
    else:  # the shards are written: their files and sizes, which a resume checks before it reads any
        groups = sharded_groups
        shards = {"shards": {p.name: p.stat().st_size for p in sorted((tmp / SHARDS).iterdir())}}
    np_state = np.random.get_state()
    state = {
        "step": step, "reason": reason, "param_groups": groups, "scheduler": _jsonable(scheduler.state_dict()),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]], **shards,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _write_weights(tmp: Path, model, optimizer) -> list[dict]:
    """One process's whole weights and optimizer state (``model`` / ``optimizer.safetensors``); returns the
    optimizer's parameter groups, their parameters by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, tmp / "model.safetensors")
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors, groups = {}, []
    for group in inner.param_groups:
        groups.append({"names": [names[id(p)] for p in group["params"]],
                       **{k: v for k, v in group.items() if k != "params"}})
        for p in group["params"]:
            for key, value in inner.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, tmp / "optimizer.safetensors")
    return groups


def _sharded_state(module, optimizer) -> tuple[dict, dict, dict]:
    """Under FSDP: this process's shards of the trainable weights and of the optimizer state (initialised, zero,
    if it has none yet), every tensor by a name of its own (the files' keys), and the optimizer's state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(module, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(ignore_frozen_params=True))
    seen, tied = set(), set()  # a weight under two names (tied embeddings) is stored under its first
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    tensors = {f"model::{name}": value for name, value in weights.items() if name not in tied}
    tensors.update({f"optimizer::{name}::{key}": value for name, entries in optim["state"].items()
                    for key, value in entries.items()})
    return weights, optim, tensors


def _save_shards(folder: Path, accelerator, module, optimizer, target: Path) -> list[dict]:
    """Every process its shards into ``folder``, in files of about SHARD_FILE_BYTES of the whole tensors (a
    process holds its part of each): files of a bounded size, as Hugging Face's sharded safetensors."""
    import torch.distributed.checkpoint as dcp

    _, optim, tensors = _sharded_state(module, optimizer)
    files, size, index = {}, 0, 1
    for name, value in tensors.items():  # the same on every process: the whole tensors' sizes, in the same order
        if size and size + value.numel() * value.element_size() > SHARD_FILE_BYTES:
            index, size = index + 1, 0
        files[name] = index
        size += value.numel() * value.element_size()
    writer = dcp.HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=files, save_distributed=True)
    _together(accelerator, lambda: dcp.save(tensors, storage_writer=writer),
              lambda reason: f"checkpoint {target}: its shards could not be written ({reason})")
    return [{"names": group["params"], **{k: v for k, v in group.items() if k != "params"}}
            for group in optim["param_groups"]]


def _together(accelerator, work, message) -> None:
    """``work()``, a collective of torch.distributed.checkpoint's, whose failure it raises on every process
    (whichever failed: a full disk), as one error of the first process's: ``message(the first failure)``."""
    import torch.distributed.checkpoint as dcp

    failure = None
    try:
        work()
    except dcp.CheckpointException as exc:  # (a BaseException)
        rank, (error, _) = next(iter(exc.failures.items()))
        failure = message(f"process {rank}: {type(error).__name__}: {' '.join(str(error).split())[:200]}")

    def report() -> None:
        if failure is not None:
            raise PerpairError(failure)

    on_main_process(accelerator, report)


def rng_file(process: int) -> str:
    """The file of a checkpoint holding process ``process``'s RNG states (the first process's: ``rng.safetensors``)."""
    return "rng.safetensors" if process == 0 else f"rng-{process}.safetensors"


def load_checkpoint(out: Path, accelerator, model, optimizer, scheduler, sharded: bool = False) -> int:
    """Restore the latest checkpoint in ``out`` into this process; returns its step (0 when there is none).
    Every file is read and checked against the model before anything is restored: a damaged or incomplete
    checkpoint (a disk that filled, files copied in part) is refused, naming it, never half applied and never
    silently skipped for an older one. A process the checkpoint has no RNG states of (it was written by fewer
    processes) takes the first process's. ``sharded``: under FSDP, ``model`` the module FSDP prepared and
    ``optimizer`` its optimizer, every process reading its own shards (any number of processes: each reads its part
    of the tensors), once the first process found the files whole and fitting the model (one error, not one per
    process); a checkpoint written under FSDP resumes only under FSDP, and one written without only without."""
    found = checkpoints(out)
    if not found:
        return 0
    folder, previous = found[-1], found[-2] if len(found) > 1 else None
    if accelerator.num_processes > 1:  # every process's files checked by the first one: a process that failed
        # alone (on its own RNG file, or its shards) left the others in a collective, which failed with a traceback
        def check() -> None:
            if sharded:  # the shards' sizes and headers (without FSDP every process reads the same weights' files)
                _read_checkpoint(folder, previous, 0, sharded)
            for process in range(accelerator.num_processes):
                _read_rng(folder, process, _damaged(folder, previous))

        on_main_process(accelerator, check)
    state, stored, rng = _read_checkpoint(folder, previous, accelerator.process_index, sharded)
    damaged = _damaged(folder, previous)
    if not _shaped_as(state["scheduler"], _jsonable(scheduler.state_dict())):
        raise damaged("state.json's scheduler is not a learning-rate schedule of this run's")
    if sharded:
        _load_shards(folder, state, stored, accelerator, model, optimizer)
    else:
        _load_weights(folder, state, *stored, model, optimizer, damaged)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_tuples(state["python_rng"]))
    np.random.set_state(_numpy_state(state["numpy_rng"]))
    return int(state["step"])


def _numpy_state(saved: list) -> tuple:
    kind, keys, *rest = saved
    return kind, np.array(keys, dtype=np.uint32), *rest


def _load_weights(folder: Path, state: dict, weights: dict, tensors: dict, model, optimizer,
                  damaged: Callable[[str], PerpairError]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise PerpairError(f"checkpoint {folder} does not match this model (e.g. {(missing or list(weights))[0]}); "
                           "resume with the configuration that wrote it")
    _check_fits(state, weights, tensors, params, optimizer, damaged)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "names"})
        for name, p in zip(saved["names"], group["params"], strict=True):
            entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
            if entries:
                optimizer.state[p] = {k: v.to(p.device) for k, v in entries.items()}


def _check_fits(state: dict, weights: dict, tensors: dict, params: dict, optimizer,
                damaged: Callable[[str], PerpairError]) -> None:
    """Refuse, before anything is restored, weights and optimizer state that would be restored wrong: ``copy_``
    broadcasts a weight of another shape (and casts an integer one) without a word, optimizer state under names of
    no parameter was skipped (the run went on with fresh moments), and state of another shape crashed the process.
    (The run's key matched: the configuration is the one that wrote it, so these are damage.)"""
    for name, value in weights.items():
        if value.shape != params[name].shape or not value.is_floating_point():
            raise damaged(f"model.safetensors holds {name} as {value.dtype} {list(value.shape)}, the model "
                          f"{params[name].dtype} {list(params[name].shape)}")
    by_id = {id(p): n for n, p in params.items()}
    current = [{"names": [by_id[id(p)] for p in group["params"]],
                **_jsonable({k: v for k, v in group.items() if k != "params"})} for group in optimizer.param_groups]
    if len(state["param_groups"]) == 1 < len(current):
        raise PerpairError(f"the checkpoint of step {state.get('step', '?')} holds one group of optimizer state, and "
                           "this run's optimizer has two (weight_decay spares biases and norms, as TRL's does, since "
                           "7 Dec 2026): it was written by an earlier perpair, whose weight_decay decayed them too; "
                           "--overwrite trains the run again")
    if not _shaped_as(state["param_groups"], current) or any(
            saved["names"] != group["names"] for saved, group in zip(state["param_groups"], current, strict=True)):
        raise damaged("state.json's param_groups are not this model's optimizer's")
    if not tensors and int(state["step"]) > 0:  # AdamW holds moments of every parameter it stepped
        raise damaged("optimizer.safetensors holds no optimizer state")
    for key, value in tensors.items():
        name = key.split("::", 1)[0]
        if "::" not in key or name not in params or not params[name].requires_grad:
            raise damaged(f"optimizer.safetensors holds {key!r}, of no parameter this run trains")
        if (value.dim() and value.shape != params[name].shape) or not value.is_floating_point():
            raise damaged(f"optimizer.safetensors holds {key!r} as {value.dtype} {list(value.shape)}, the "
                          f"parameter is {list(params[name].shape)}")


def _shaped_as(saved: Any, current: Any) -> bool:
    """Whether ``saved`` (read from a checkpoint's JSON) has the shape of ``current`` (as :func:`_jsonable` gives
    it): a mapping holding the keys both have in that shape (other torch versions add or drop some) and those that
    restoring reads (a schedule's last_epoch, base_lrs and lr_lambdas, a group's names), a list of as many items, a
    number where it has a number, a whole one where it has an integer (a schedule's last_epoch of 1.5 was restored
    and stepped on: every later learning rate taken half a step off, exit 0)."""
    if isinstance(current, dict):
        return isinstance(saved, dict) and all(_shaped_as(saved[k], v) for k, v in current.items() if k in saved) \
            and all(k in saved for k in ("last_epoch", "base_lrs", "lr_lambdas", "names") if k in current)
    if isinstance(current, list | tuple):
        return isinstance(saved, list) and len(saved) == len(current) and all(map(_shaped_as, saved, current))
    if isinstance(current, int | float) and not isinstance(current, bool):
        number = int if isinstance(current, int) else int | float
        return isinstance(saved, number) and not isinstance(saved, bool)
    return True


def _load_shards(folder: Path, state: dict, metadata, accelerator, module, optimizer) -> None:
    """Under FSDP: this process's shards of the checkpoint's weights and optimizer state, read into ``module`` and
    ``optimizer`` (torch.distributed.checkpoint); the files' keys and shapes are checked against the model's first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights, optim, tensors = _sharded_state(module, optimizer)
    saved = metadata.state_dict_metadata
    wrong = next((name for name, value in tensors.items()
                  if name not in saved or tuple(saved[name].size) != tuple(value.shape)), None)
    wrong = wrong or next((name for name in saved if name not in tensors), None)

    def fits() -> None:  # (every process finds the same: the first one says so)
        if wrong is not None:
            raise PerpairError(f"checkpoint {folder} does not match this model (e.g. {wrong.split('::')[1]}); "
                               "resume with the configuration that wrote it")

    on_main_process(accelerator, fits)
    reader = dcp.HuggingFaceStorageReader(str(folder / SHARDS))
    _together(accelerator, lambda: dcp.load(tensors, storage_reader=reader),  # (the files were checked before)
              lambda reason: f"checkpoint {folder} is damaged or incomplete ({reason})")
    optim["param_groups"] = [{"params": group["names"], **{k: (tuple(v) if isinstance(v, list) else v)
                                                           for k, v in group.items() if k != "names"}}
                             for group in state["param_groups"]]
    # not strict: the frozen weights (a LoRA run's base) are the model's own, not the checkpoint's; the trained
    # ones were checked above
    set_state_dict(module, getattr(optimizer, "optimizer", optimizer), model_state_dict=weights,
                   optim_state_dict=optim, options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _read_checkpoint(folder: Path, previous: Path | None, process: int, sharded: bool) -> tuple[dict, Any, dict]:
    """The state, weights and optimizer tensors (``sharded``: the shards' metadata, from the files' headers, instead)
    and RNG states of the checkpoint ``folder``, or one error naming it."""
    damaged = _damaged(folder, previous)
    with _refused_as(damaged):
        state = json.loads((folder / "state.json").read_text())
        number = folder.name.removeprefix("step-")
        expected = int(number) if number.isdigit() else None
        keys = ("step", "param_groups", "scheduler", "python_rng", "numpy_rng")
        if not isinstance(state, dict) or any(k not in state for k in keys) or state["step"] != expected:
            raise damaged(f"state.json is not the state of step {expected}")
        groups = state["param_groups"]  # (checked against the model's once it is at hand; the shards' read names)
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("names"), list)
                                                   for g in groups):
            raise damaged("state.json's param_groups are not an optimizer's")
        if ("shards" in state) != sharded:  # (its files differ: no part of it would be read right)
            how = "under" if "shards" in state else "without"
            raise PerpairError(f"checkpoint {folder} was written by a run {how} FSDP; resume it {how} FSDP, as the "
                               "run that wrote it")
        try:  # restored last, into the process's generators: tried on generators of their own first
            random.Random().setstate(_tuples(state["python_rng"]))
            np.random.RandomState().set_state(_numpy_state(state["numpy_rng"]))
        except (TypeError, ValueError, IndexError) as exc:
            raise damaged(f"state.json's random states are not Python's and NumPy's ({exc})") from None
        if sharded:
            stored = _read_shards(folder / SHARDS, state["shards"], damaged)
        else:
            stored = load_file(folder / "model.safetensors"), load_file(folder / "optimizer.safetensors")
    return state, stored, _read_rng(folder, process, damaged)


def _damaged(folder: Path, previous: Path | None) -> Callable[[str], PerpairError]:
    """The error that refuses the checkpoint ``folder`` for a reason, saying what resumes instead."""
    def damaged(reason: str) -> PerpairError:
        then = (f"remove it to resume from the one before ({previous.name})" if previous is not None
                else "remove it, or start again with --overwrite")
        return PerpairError(f"checkpoint {folder} is damaged or incomplete ({reason}); {then}")
    return damaged


@contextmanager
def _refused_as(damaged: Callable[[str], PerpairError]) -> Iterator[None]:
    """A file of a checkpoint missing, unreadable or not what it should be: ``damaged``'s error, naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError as exc:
        raise damaged(f"no {Path(exc.filename).name}") from None
    except (OSError, ValueError, SafetensorError) as exc:  # (json's JSONDecodeError is a ValueError)
        raise damaged(" ".join(str(exc).split())[:200]) from None


def _read_rng(folder: Path, process: int, damaged: Callable[[str], PerpairError]) -> dict:
    """Process ``process``'s RNG states in the checkpoint ``folder`` (the first process's where it has none)."""
    own = folder / rng_file(process)
    with _refused_as(damaged):
        rng = load_file(own if own.exists() else folder / rng_file(0))
    if "torch" not in rng:
        raise damaged("its RNG states lack torch's")
    try:  # (set on a generator of its own: the process's is set once every file was read)
        torch.Generator().set_state(rng["torch"])
    except (TypeError, RuntimeError) as exc:
        raise damaged(f"{own.name if own.exists() else rng_file(0)} holds no RNG state of torch's ({exc})") from None
    return rng


def _read_shards(folder: Path, files: dict, damaged):
    """The shards' metadata (every tensor's whole shape and the parts each file holds), once the files are those
    state.json names, of the sizes it gives."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    held = {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}
    for name, size in files.items():
        if name not in held:
            raise damaged(f"no {SHARDS}/{name}")
        if held[name] != size:
            raise damaged(f"{SHARDS}/{name} holds {held[name]} bytes, not the {size} written")
    stray = sorted(set(held) - set(files))
    if stray:
        raise damaged(f"{SHARDS}/{stray[0]} is not one of its files")
    return HuggingFaceStorageReader(str(folder)).read_metadata()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites the ones after its checkpoint); returns
    them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if step == 0 or not path.exists():
        path.write_text("")
        return []
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    except UnicodeDecodeError as exc:
        raise PerpairError(f"file {path}: not a metrics file (not UTF-8 text at byte {exc.start}); it cannot be kept "
                           f"for the steps up to {step} that --resume continues after") from None
    kept, metrics = [], []
    for number, line in enumerate(lines, 1):
        try:
            at = (values := json.loads(line))["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # the line of a step being written when the run was killed: after the checkpoint
                break
            raise PerpairError(f"file {path}, line {number}: not a line of metrics; it cannot be kept for the "
                               f"steps up to {step} that --resume continues after") from None
        if at <= step:
            kept.append(line)
            metrics.append(values)
    # renamed over the file, not rewritten in place: a run killed here keeps every line, not half of them
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return metrics


def save_model(config: TrainConfig, accelerator, module, tokenizer) -> dict[str, str]:
    """HF-format outputs: full weights in OUT/model, or the adapter in OUT/adapter (and merged in OUT/model)."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type == DistributedType.FSDP:
        # Each rank holds a shard: every rank takes part in gathering the full weights, rank 0 receives them.
        gathered = accelerator.get_state_dict(module)
        state_dict = {name.removeprefix("model."): value for name, value in gathered.items()}  # CompletionLogps.model
    from perpair.models import no_progress_bars

    with no_progress_bars():  # (Transformers' "Writing model shards" bar amid the run's progress)
        return on_main_process(accelerator, lambda: _save_model(config, accelerator, module, tokenizer,
                                                                state_dict)) or {}


def _save_model(config: TrainConfig, accelerator, module, tokenizer, state_dict) -> dict[str, str]:
    model = accelerator.unwrap_model(module).model
    out = Path(config.out)
    saved = {}
    inner = model.get_base_model() if config.lora is not None else model
    if hasattr(inner, "perpair_use_cache"):  # training turned the key/value cache off: the model's own setting
        inner.config.use_cache = inner.perpair_use_cache
    if config.lora is None:
        with _in_place(out / "model") as folder:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        saved["model"] = str(out / "model")
    else:
        from perpair.models import resolve_model

        base = Path(resolve_model(config.model))
        if base.is_dir():
            # PEFT records the path the model was loaded from, as given: a relative one (`--model models/mine`)
            # named the base only from this working directory, and elsewhere read as a Hub id
            for adapter in model.peft_config.values():
                adapter.base_model_name_or_path = str(base.resolve())
        with _in_place(out / "adapter") as folder:
            model.save_pretrained(folder, state_dict=state_dict)
        saved["adapter"] = str(out / "adapter")
        if config.lora.merge:
            merged = model.merge_and_unload()
            with _in_place(out / "model") as folder:
                merged.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
            saved["model"] = str(out / "model")
    return saved


@contextmanager
def _in_place(target: Path):
    """A folder to write ``target``'s files into, renamed to ``target`` once they all are: a run killed while
    saving leaves no ``target`` that looks complete (only ``.NAME.tmp``, which the next save removes), and a
    ``target`` already there (a resumed run's) is replaced only by a complete one."""
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if target.exists():  # a folder cannot be renamed over another: the old one goes aside first, then away
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
