"""Everything a run sets up before its first step: the accelerator (and what a launch may not ask for), the
tokenizer and model, the reference log-probs, the policy to train, its optimizer and learning-rate schedule.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from perpair.allocator import active_allocator
from perpair.errors import PerpairError
from perpair.models import config_dropout_rates, load_causal_lm, refused_by_transformers, resolve_model
from perpair.models import load_tokenizer as load_tokenizer_of
from perpair.onednn import PROMPT_ROWS, note_emulated_bf16, pack_linears, unpack_linears
from perpair.train import reference
from perpair.train.batches import PairData, StepBatches
from perpair.train.config import TrainConfig, launch_sharding, sharding_problem
from perpair.train.lean import lean_activations, mlp_keep_budget
from perpair.train.logprobs import check_architecture
from perpair.train.losses import ROUTE_PREFERENCE
from perpair.train.tokenize import TokenizedPair

REFERENCE_PACKING = 4  # the reference pass packs pairs up to this many × max_length tokens per forward


def setup_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.threads:
        torch.set_num_threads(config.threads)
    bf16 = uses_bf16(config)
    _forget_another_precision("bf16" if bf16 else "no")
    # cpu=True without CUDA: Accelerate then runs processes started by torchrun / accelerate launch as gloo ranks
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available(),
                              log_with=config.report_to or None, project_dir=str(Path(config.out) / "runs"))
    if accelerator.is_main_process and (note := launcher_precision_note(config, bf16)):
        sys.stderr.write(note + "\n")
    if accelerator.is_main_process:
        note_emulated_bf16(torch.bfloat16 if bf16 else torch.float32, accelerator.device, "training (precision bf16)",
                           "precision: fp32")
    set_seed(config.seed)
    if problem := unread_release_cpu_memory(config, accelerator.device.type):
        raise PerpairError(problem)
    if config.release_cpu_memory and accelerator.device.type == "cpu" and active_allocator() is None:
        release_freed_memory()  # glibc's malloc only: tcmalloc & co. (perpair.allocator) need no help
    check_sharding(config, accelerator.distributed_type)
    return accelerator


def launcher_precision_note(config: TrainConfig, bf16: bool) -> str | None:
    """What to say where ``accelerate launch`` (its ``--mixed_precision``, or its config file's) asked for another
    precision than the run's ``precision`` gives: Accelerate lets the Accelerator's own setting win, without a word.
    (``accelerate launch`` always passes one, "no" unless told: on a GPU with ``precision: auto`` this says that bf16
    wins.)"""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked is None or asked == ("bf16" if bf16 else "no"):
        return None
    runs = "bf16 autocast" if bf16 else "float32"
    why = f"precision {config.precision}" + (" (bf16 autocast where the device has it)" if config.precision == "auto"
                                              else "")
    fp16 = "; fp16 is not one of them" if asked == "fp16" else ""
    return (f"note: the launcher's mixed precision ({asked}) is not read: this run trains in {runs}, by its "
            f"{why}; set precision in the train config to choose (fp32 or bf16{fp16})")


def _forget_another_precision(wanted: str) -> None:
    """Accelerate keeps one mixed precision per process and refuses another (a ValueError: "AcceleratorState has
    already been initialized"), which ended ``perpair run`` in a traceback at its second arm where arms train in
    the run's process, one precision after another. One process alone (no process group) starts its state anew."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != wanted and not torch.distributed.is_initialized():
        AcceleratorState._reset_state()


def unread_release_cpu_memory(config: TrainConfig, device: str) -> str | None:
    """Why ``release_cpu_memory``, set, would change nothing in a training on ``device`` (a device type) in this
    process (None: it is read, or not set)."""
    if "release_cpu_memory" not in config.model_fields_set:
        return None
    if device == "cpu" and (allocator := active_allocator()) is None:
        return None
    where = f"under {allocator}" if device == "cpu" else f"on {device}"
    return (f"release_cpu_memory applies to a training on a CPU under glibc's malloc (PERPAIR_MALLOC=system), and "
            f"this one runs {where}: it would change nothing; drop it")


def uses_bf16(config: TrainConfig) -> bool:
    """bf16 autocast: asked for, or ``auto`` on a CUDA device that has it."""
    return config.precision == "bf16" or (
        config.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def recompute_mlp(config: TrainConfig, model) -> dict:
    """``lean_activations``' MLP arguments: ``recompute_mlp`` as set (true: every MLP recomputes, false: none), or
    unset, recomputing with the memory budget of :func:`~perpair.train.lean.mlp_keep_budget` for the last MLPs."""
    if config.recompute_mlp is not None:
        return {"recompute_mlp": config.recompute_mlp}
    return {"recompute_mlp": True, "keep_budget": mlp_keep_budget(model)}


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped when
    freed (returns whether it took). By default glibc raises that threshold to 32 MiB as large blocks are freed,
    so activations end up in its heap, where the holes they leave between longer-lived gradients and optimizer
    states stay resident: on ``benchmarks/vs_trl.py`` 0.5 GiB of the peak. The cost is a page fault per fresh 4 KiB
    page of each such buffer; the step time did not measurably change."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD


def check_sharding(config: TrainConfig, distributed_type) -> None:
    """Refuse what the loop does not yet do right with the sharding Accelerate chose, before any work is done
    (the config refused the same from the launch's environment already; this catches a mismatch)."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        sharding = "deepspeed"
    elif distributed_type == DistributedType.FSDP:
        sharding = "fsdp"
    else:
        if launch_sharding() == "fsdp":  # set by accelerate launch with an FSDP config
            raise PerpairError(f"an FSDP launch config, but Accelerate chose {distributed_type.value}: FSDP needs "
                               "GPUs (without one it would silently run DDP or single processes)")
        return
    problem = sharding_problem(config, sharding)
    if problem:
        raise PerpairError(problem)


def load_tokenizer(config: TrainConfig):
    tokenizer = load_tokenizer_of(resolve_model(config.model))
    if not tokenizer.chat_template:  # (a blank one load_tokenizer refuses, naming its file)
        raise PerpairError(f"model {config.model}: the tokenizer has no chat template; perpair "
                           "trains on conversations and tokenizes them as TRL does, with the template")
    if config.reference_model is not None:
        check_reference_tokenizer(config, tokenizer)
    return tokenizer


def load_model(spec: str, accelerator):
    """The model in float32, with SDPA attention, or its own (``eager``) where Transformers has no SDPA version of
    it (Gemma 2, Bloom): a packed forward computes attention with :func:`~perpair.train.attention.tree_attention`
    either way, or refuses the model."""
    path = resolve_model(spec)
    try:
        model = load_causal_lm(path, dtype=torch.float32, attn_implementation="sdpa")
    except PerpairError as exc:
        if "does not support an attention implementation" not in str(exc.__cause__):
            raise
        model = load_causal_lm(path, dtype=torch.float32, attn_implementation="eager")
    model.perpair_use_cache = model.config.use_cache  # the saved model's, put back by checkpoints.save_model
    model.config.use_cache = False
    return model.to(accelerator.device)


def reference_cache_file(config: TrainConfig, tokenizer, pairs: str | Path, *,
                         bf16: bool) -> tuple[Path, dict[str, object]]:
    """The file of the reference cache that a run of ``config`` on the pairs file ``pairs`` reads and fills, and
    the key it is named by: the reference model's files, the tokenizer, the pairs file, the length settings and
    the precision."""
    cache_dir = Path(config.reference_cache) if config.reference_cache else reference.default_cache_dir()
    return reference.cache_file(cache_dir, reference_name(config), tokenizer, pairs,
                                config.max_length, ld_alpha=config.ld_alpha, precision="bf16" if bf16 else "fp32")


def reference_name(config: TrainConfig) -> str:
    """The reference model as the user named it (resolved: a folder's path, a Hub id), for the cache's readers."""
    return resolve_model(config.reference_model or config.model)


def compute_reference(config: TrainConfig, data: PairData, batches: StepBatches, tokenizer, policy,
                      accelerator, on_progress: Callable[[int, int], None] | None = None,
                      from_first_step: bool = True, from_step: int = 0) -> reference.RunReference:
    """Reference log-probs (:class:`~perpair.train.reference.RunReference`, in the trained orientation) of the
    preference pairs of the run (SFT pairs and reference-free losses need none), from the cache, the missing
    ones computed now, except, with ``from_first_step`` (a run starting at its first step), those that step's
    forward gives (:func:`first_step_rows`). Several processes compute a share each (waiting while one process
    computed them all would outlast NCCL's 10-minute collective timeout on a large corpus); the main process
    writes the cache. ``policy``
    None: the initial model is loaded if a pair is missing (a pass that does not train). ``from_step``: the step a
    resumed run continues from; the steps before it are not trained again, and read no reference."""
    if config.objective.reference_free:
        return reference.RunReference()
    rows = sorted({r for step in batches.steps[from_step:] for r in step if data.route[r] == ROUTE_PREFERENCE})
    if not rows:
        return reference.RunReference()
    path, key = reference_cache_file(config, tokenizer, data.path, bf16=accelerator.mixed_precision == "bf16")
    # cached values are in the pair's own orientation: un-flip to look them up
    own = [_unflip(batches.tokenized[r]) if data.flipped[r] else batches.tokenized[r] for r in rows]
    ids = [data.pair_ids[r] for r in rows]
    first = first_step_rows(config, data, batches, policy, accelerator.num_processes) if from_first_step else set()
    cached = reference.load_cached(path) if first else {}
    deferred = frozenset(pid for r in first if (pid := data.pair_ids[r]) not in cached)

    autocast = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None

    def load():  # the initial policy is the default reference: no second model is loaded
        reuse = policy is not None and config.reference_model is None
        model = policy if reuse else load_model(config.reference_model or config.model, accelerator)
        top = max(max(p.prompt + p.chosen + p.rejected) for p in own)
        if (rows_ := model.get_input_embeddings().num_embeddings) <= top:
            raise PerpairError(f"reference_model {config.reference_model or config.model}: its embedding has "
                               f"{rows_} rows, and the tokenizer of model {config.model} gives token id {top}; the "
                               "reference must share the model's tokenizer")
        check_sequence_lengths(model, data, batches, rows)
        # On a CPU the pass runs forwards only: oneDNN's prepacked products (float32: 1.2-1.4x the pass on
        # the vs_trl workload). The policy's packed copies are dropped after the pass, before training.
        pack_linears(model, rows=PROMPT_ROWS, dtype=autocast)
        return model

    # Without gradients a forward keeps no activations, so several pairs share one (tree attention keeps each
    # pair's attention its own): larger matrix multiplications, fewer passes over the vocabulary projection.
    tokens = max(config.forward_tokens, REFERENCE_PACKING * config.max_length)
    options = dict(device=accelerator.device, tokens_per_forward=tokens, chunk_size=config.logits_chunk,
                   autocast_dtype=autocast, ld_alpha=config.ld_alpha, deferred=deferred,
                   left_out=[data.pair_ids[r] for r in batches.skipped_rows], model_name=reference_name(config))
    if accelerator.num_processes > 1:  # every process computes a share: none waits on another's whole pass
        from accelerate.utils import broadcast_object_list, gather_object

        options.update(share=(accelerator.process_index, accelerator.num_processes),
                       agree=lambda cached: broadcast_object_list([cached])[0],
                       gather=lambda mine: {k: v for part in gather_object([mine]) for k, v in part.items()},
                       write=accelerator.is_main_process)
    try:
        values, computed = reference.reference_logps(path, key, ids, own, load,
                                                     on_progress=on_progress if accelerator.is_main_process else None,
                                                     **options)
    finally:
        if policy is not None:
            unpack_linears(policy)
    run = reference.RunReference(needed=True, computed=computed)
    for row, (c, r) in zip(rows, values.tolist(), strict=True):
        if data.pair_ids[row] in deferred:  # not cached (NaN here): the first step's forward gives them
            run.from_first_step.add(row)
        else:
            run.values[row] = (r, c) if data.flipped[row] else (c, r)

    def cache(taken: dict[int, tuple[float, float]]) -> None:
        entries = {}
        for row, (c, r) in taken.items():
            pair = batches.tokenized[row]  # trained orientation: un-flip values and token counts alike
            c_tokens, r_tokens = len(pair.chosen), len(pair.rejected)
            if data.flipped[row]:
                c, r, c_tokens, r_tokens = r, c, r_tokens, c_tokens
            entries[data.pair_ids[row]] = (c, c_tokens, r, r_tokens)
        reference.add_cached(path, key, entries, model_name=reference_name(config))

    run.cache = cache if accelerator.is_main_process else None
    return run


def check_sequence_lengths(model, data: PairData, batches: StepBatches, rows: list[int] | None = None) -> None:
    """Refuse the longest sequence (a prompt and one response) of ``rows`` (default: every row of the run's steps)
    if ``model``'s sliding window or length-scaled rotary embedding cannot take it, before any forward: the refusal
    the forward holding it would make, after the work before it (the reference pass takes the longest pairs last)."""
    rows = rows if rows is not None else sorted({r for step in batches.steps for r in step})
    row = max(rows, key=lambda r: batches.tokenized[r].longest)
    tokens = batches.tokenized[row].longest
    check_architecture(model).check_sequence(model, tokens, f"pair {data.pair_ids[row]} of {data.path} ({tokens} "
                                                            "tokens of prompt and response)")


def check_router_loss(config: TrainConfig) -> None:
    """Refuse a Mixture-of-Experts model whose config asks for its router's load-balancing loss
    (``output_router_logits`` with a ``router_aux_loss_coef`` above 0): Transformers and TRL add it to the loss,
    perpair's losses do not, so the setting would change nothing."""
    from transformers import AutoConfig

    with refused_by_transformers(config.model, "its config"):  # (a config.json without model_type: a ValueError)
        model_config = AutoConfig.from_pretrained(resolve_model(config.model))
    model_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    coef = getattr(model_config, "router_aux_loss_coef", 0) or 0
    if getattr(model_config, "output_router_logits", False) and coef > 0:
        raise PerpairError(f"model {config.model}: its config sets output_router_logits with router_aux_loss_coef "
                           f"{coef}, a load-balancing loss of the experts' router that perpair train does not add "
                           "(TRL does); set output_router_logits to false in its config.json to train without it")


def check_reference_tokenizer(config: TrainConfig, tokenizer) -> None:
    """A ``reference_model`` scores the policy's token ids: refuse one whose own tokenizer (where its folder or Hub
    repository has one) has another vocabulary, whose log-probs of those ids would be another text's."""
    try:
        own = load_tokenizer_of(resolve_model(config.reference_model))
    except OSError:  # no tokenizer beside the weights: nothing to compare
        return
    except PerpairError as exc:  # (Transformers' ValueError or TypeError where it finds none)
        if isinstance(exc.__cause__, ValueError | TypeError):
            return
        raise
    if own.get_vocab() != tokenizer.get_vocab():
        raise PerpairError(f"reference_model {config.reference_model}: its tokenizer's vocabulary differs from that "
                           f"of model {config.model}; the reference scores the model's tokens, so both must share "
                           "one tokenizer")


def first_step_rows(config: TrainConfig, data: PairData, batches: StepBatches, policy, processes: int) -> set[int]:
    """Preference rows of the first step whose reference log-probs that step's own forward can give: the policy
    still has its initial weights, which are the reference (no ``reference_model``; a LoRA adapter starts as a
    zero update), and nothing in its forward is random (no dropout rate above 0). One process only: with several,
    each would hold only its share of the step's values."""
    if config.reference_model is not None or processes != 1 or _dropout_rates(policy, config):
        return set()
    return {r for r in batches.steps[0] if data.route[r] == ROUTE_PREFERENCE}


def _dropout_rates(model, config: TrainConfig) -> list[float]:
    """The dropout rates above 0 a training forward of ``model`` (with ``config``'s adapter) would apply: its
    dropout modules', and any ``*dropout*`` / ``*pdrop`` setting of its configuration (attention dropout is a
    setting, not a module)."""
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    if config.lora is not None:
        rates.append(config.lora.dropout)
    rates += config_dropout_rates(model.config.to_dict())
    return [rate for rate in rates if rate > 0]


def _unflip(pair: TokenizedPair) -> TokenizedPair:
    return TokenizedPair(pair.prompt, pair.rejected, pair.chosen)


def check_lora_targets(config: TrainConfig, model) -> None:
    """Refuse, before any work, ``lora.target_modules`` that PEFT would take without training what they name: an
    entry of a list that matches no module of the model (PEFT leaves it out without a word when another entry
    matches), a pattern that matches none, a module no adapter goes on (a block such as ``self_attn``: PEFT refused
    it only after the reference pass), and the model's output layer or input embedding. perpair's log-probs
    apply the output layer's weight directly (:class:`~perpair.train.logprobs.ChunkedTokenLogps`), so an adapter
    there never took part in the loss: it stayed zero (with other targets) or the run failed in its backward; an
    adapter on the input embedding failed the architecture check with a traceback. And ``recompute_mlp: true``
    where every MLP carries an adapter (``all-linear``), which recomputes nothing."""
    if config.lora is None:
        return
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D  # (GPT-2's linear layers)

    targets = config.lora.target_modules
    modules = dict(model.named_modules())
    output = model.get_output_embeddings()
    linear_keys = [key for key, module in modules.items()
                   if isinstance(module, torch.nn.Linear | Conv1D) and module is not output]
    linear = sorted({key.rsplit(".", 1)[-1] for key in linear_keys})
    keys = [name for name in modules if name]

    def matched(target: str | list[str]) -> list[str]:
        spec = LoraConfig(target_modules=target)
        return [key for key in keys if check_target_module_exists(spec, key)]

    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT's: every linear layer but the output
        found = set(linear_keys)
    else:
        if isinstance(targets, str) and not matched(targets):  # (PEFT refuses it too, but after the reference pass)
            raise PerpairError(f"lora.target_modules {targets!r} matches no module of model {config.model}: a string "
                               "is a regular expression over each module's whole name (model.layers.0.self_attn."
                               "q_proj), a list names modules by the last part of their names; its linear layers: "
                               f"{', '.join(linear)}")
        for target in [] if isinstance(targets, str) else targets:
            if not matched([target]):
                raise PerpairError(f"lora.target_modules {targets}: {target!r} matches no module of model "
                                   f"{config.model} (its linear layers: {', '.join(linear)}); PEFT would leave it "
                                   "out and train the rest without a word")
        found = set(matched(targets))
        adaptable = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        if other := sorted(key for key in found if not isinstance(modules[key], adaptable)):
            raise PerpairError(f"lora.target_modules {targets}: {other[0]!r} is a {type(modules[other[0]]).__name__}, "
                               f"not a layer an adapter goes on; name its linear layers ({', '.join(linear)})")
        embedding = model.get_input_embeddings()
        for kind, layer, why in (("output layer", output, "perpair's log-probs apply its weight directly, so an "
                                                          "adapter there would never train"),
                                 ("input embedding", embedding, "an adapter there is not supported")):
            name = next((key for key, module in modules.items() if module is layer), None)
            if name in found:
                raise PerpairError(f"lora.target_modules {targets}: {name!r} is the model's {kind}; {why}. Adapt "
                                   f"the layers inside the model ({', '.join(linear)}; 'all-linear' takes them all)")
    # recompute_mlp true: an MLP recomputes only with none of its projections adapted (lean.py's _mlp_kind)
    projections = ("gate_proj", "up_proj", "down_proj")
    mlps = [key for key, module in modules.items()
            if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in projections)]
    if config.recompute_mlp and config.lean_activations and mlps and \
            all(any(f"{key}.{n}" in found for n in projections) for key in mlps):
        raise PerpairError(f"recompute_mlp true does nothing with lora.target_modules {targets}: every MLP has an "
                           "adapter on a projection, and an adapted MLP runs its own layers, which recompute "
                           "nothing; drop recompute_mlp (gradient_checkpointing=true saves memory), or adapt no MLP "
                           "projection (e.g. [q_proj, k_proj, v_proj, o_proj])")


def prepare_policy(config: TrainConfig, model, single_process: bool = True):
    """Full fine-tuning, or a LoRA adapter (PEFT) on the frozen model."""
    if config.disable_dropout:  # TRL's default (disable_dropout_in_model): before an adapter, whose dropout is ours
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since Transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lean_activations and config.lora is None:  # under LoRA: once the adapters are in, below
        lean_activations(model, **recompute_mlp(config, model))
    model.train()
    if config.lora is None:
        own_cpu_weights(model)
        if single_process:
            # A forward reads a few hundred rows of the input embedding; its dense gradient would be a zeroed
            # [vocab, hidden] tensor per forward. Sparse, it is added into the parameter's gradient (dense as
            # soon as a tied output embedding contributes) and densified once before the optimizer step.
            model.get_input_embeddings().sparse = True
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # adapter initialisation
    lora = config.lora
    with warnings.catch_warnings():  # PEFT 0.21 reads Transformers 5's renamed property: a notice for PEFT's authors
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        try:
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        except ValueError as exc:  # PEFT's "Target modules {...} not found in the base model" (and its kin)
            first = " ".join(str(exc).split())
            raise PerpairError(f"lora.target_modules {lora.target_modules}: {first[:300]}") from None
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    if config.lean_activations:  # the state counted is the adapters' now: frozen weights keep no AdamW moments
        # under autocast the frozen weights are cast once for the run, not in every forward; on a CPU the adapted
        # layers' frozen weights are packed for oneDNN once, not laid out anew by every product
        lean_activations(model, **recompute_mlp(config, model), cache_casts=True, pack_frozen=True)
    return model


def own_cpu_weights(model) -> None:
    """Give every CPU parameter storage of its own, in this process's memory. Transformers maps a safetensors
    checkpoint into memory and hands out the tensors of its dtype as views of that file mapping; the first
    optimizer step then writes every page of it, each first write a copy-on-write fault. On
    ``benchmarks/vs_trl.py``'s 135M model that made the first AdamW step 1.9 s instead of 0.09 s; the copy here
    takes 0.16 s. Tied parameters stay tied (one ``Parameter``, one copy)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone()


# The parameters Transformers' Trainer (and so TRL's DPOTrainer) leaves out of weight decay, by name (its
# get_decay_parameter_names, 5.x): biases and normalisation weights; and every parameter of an nn.LayerNorm.
NO_DECAY_NAMES = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def make_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    params: list | list[dict] = [p for p in model.parameters() if p.requires_grad]
    if config.weight_decay:  # decay as TRL does: not the biases and norms (a norm's weights pulled towards 0)
        from transformers.trainer_pt_utils import get_parameter_names

        names = set(get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_NAMES)))
        decayed = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
        params = [{"params": [p for p in params if id(p) in decayed]},
                  {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    try:  # the fused kernel updates in place: fastest, and no temporary copies of the parameters
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=False, **kwargs)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant, linear or cosine decay to 0 (the shapes of transformers' schedulers)."""
    warmup = config.warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(config: TrainConfig, optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
