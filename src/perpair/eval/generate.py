"""Batched generation of answers with a model's chat template: Transformers, or vLLM when installed.

Generation is greedy by default (AlpacaEval and Arena-Hard compare one answer per prompt). Every finished batch is
written to the cache before the next starts (:func:`generate_cached`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from perpair.errors import PerpairError
from perpair.eval.cache import ResultCache, cache_key

Messages = list[dict[str, str]]


class GenerationConfig(BaseModel):
    """How answers are generated."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(2048, ge=1, description="Tokens generated at most per answer.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass (Transformers).")
    max_prompt_tokens: int = Field(4096, ge=16, description="Longer prompts lose their beginning.")
    backend: str = Field("auto", pattern="^(auto|transformers|vllm)$")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")


class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[Messages]) -> list[str]: ...


def torch_dtype(name: str):
    """A dtype name as torch's; ``auto``: bfloat16 on a GPU, float32 on a CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


class TransformersGenerator:
    """Left-padded batched ``generate`` with the tokenizer's chat template."""

    def __init__(self, model: str, config: GenerationConfig):
        import torch

        from perpair.models import load_causal_lm, load_tokenizer
        from perpair.onednn import note_emulated_bf16, pack_linears

        self.name, self.config = model, config
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model, dtype=torch_dtype(config.dtype)).to(device).eval()
        note_emulated_bf16(self.model.dtype, device, f"generation with {model}", "dtype float32")
        pack_linears(self.model, rows=config.batch_size)  # on a CPU: a token step's products have batch_size rows

    def format(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, prompts: Sequence[Messages]) -> list[str]:
        import torch

        cfg = self.config
        texts = [self.format(m) for m in prompts]
        self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                               truncation=True, max_length=cfg.max_prompt_tokens).to(self.model.device)
        sampling: dict[str, Any] = ({"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
                                    if cfg.temperature > 0 else {"do_sample": False})
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=cfg.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class VLLMGenerator:
    """vLLM's offline ``LLM.generate`` (continuous batching on a GPU) on the prompts' tokens as
    :class:`TransformersGenerator` makes them: the chat template, then the last ``max_prompt_tokens`` tokens. vLLM's
    own ``truncate_prompt_tokens`` cannot do it: ``LLM.chat`` ignores it (vllm-project/vllm#27642) and vLLM 0.17
    removed it from ``SamplingParams``; a longer prompt was sent whole (another answer, or an error past the
    model's length)."""

    def __init__(self, model: str, config: GenerationConfig):
        from vllm import LLM, SamplingParams

        self.name, self.config = model, config
        self.llm = LLM(model=model, dtype=config.dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self.params = SamplingParams(max_tokens=config.max_new_tokens, temperature=config.temperature,
                                     top_p=config.top_p)

    def generate(self, prompts: Sequence[Messages]) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # the beginning goes, as in TransformersGenerator (truncation_side left)
        inputs = [{"prompt_token_ids": list(i[-self.config.max_prompt_tokens:])} for i in ids]
        outputs = self.llm.generate(inputs, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def resolved_backend(backend: str) -> str:
    """The backend that generates: ``auto`` is vLLM when it is installed and a GPU is there, else Transformers."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise PerpairError("backend vllm: vLLM is not installed (pip install vllm, on a machine with a CUDA GPU); "
                           "the transformers backend needs nothing more")
    if backend != "auto":
        return backend
    return "vllm" if importlib.util.find_spec("vllm") is not None and _has_cuda() else "transformers"


def load_generator(model: str, config: GenerationConfig) -> Generator:
    if resolved_backend(config.backend) == "vllm":
        return VLLMGenerator(model, config)
    return TransformersGenerator(model, config)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def generate_cached(load: Callable[[], Generator], identity: Any, prompts: Sequence[Messages], cache: ResultCache,
                    *, kind: str = "generation", batch_size: int = 8,
                    on_progress: Callable[[int, int], None] | None = None) -> tuple[list[str], int]:
    """Answers for ``prompts``; cached ones are read, the others generated in batches (the generator is only
    loaded when something is missing). Returns ``(answers, number generated now)``."""
    keys = [cache_key(identity, p) for p in prompts]
    answers: list[str | None] = [None] * len(prompts)
    missing = []
    for i, key in enumerate(keys):
        hit = cache.get(kind, key)
        if hit is None:
            missing.append(i)
        else:
            answers[i] = hit["output"]
    done = len(prompts) - len(missing)
    if on_progress:
        on_progress(done, len(prompts))
    generator = load() if missing else None
    step = batch_size if not isinstance(generator, VLLMGenerator) else max(batch_size, 256)
    for start in range(0, len(missing), step):
        chunk = missing[start:start + step]
        outputs = generator.generate([prompts[i] for i in chunk])
        cache.put_many(kind, [(keys[i], {"output": o}) for i, o in zip(chunk, outputs, strict=True)])
        for i, o in zip(chunk, outputs, strict=True):
            answers[i] = o
        done += len(chunk)
        if on_progress:
            on_progress(done, len(prompts))
    return answers, len(missing)  # type: ignore[return-value]


def generation_identity(fingerprint: str, config: GenerationConfig, tokenizer: str | None = None) -> dict[str, Any]:
    """What an answer is cached under: the model's content, its tokenizer and chat template (``tokenizer``, from
    :func:`perpair.models.tokenizer_identity`) and the settings that change it, the backend and dtype as they resolve
    here (``auto`` is vLLM on one machine and Transformers on another, bfloat16 on a GPU and float32 on a CPU: other
    answers)."""
    settings = {**config.model_dump(include={"max_new_tokens", "temperature", "top_p", "max_prompt_tokens"}),
                **resolved_settings(config)}
    identity: dict[str, Any] = {"model": fingerprint, "settings": settings}
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer
    return identity


def resolved_settings(config: GenerationConfig) -> dict[str, str]:
    """The backend and dtype that generate, as ``auto`` resolves them on this machine."""
    backend = resolved_backend(config.backend)
    # vLLM reads dtype auto from the model's config.json, which the model's fingerprint holds
    return {"backend": backend, "dtype": config.dtype if backend == "vllm" else dtype_name(config.dtype)}


def dtype_name(name: str) -> str:
    """A dtype name as :func:`torch_dtype` resolves it here (``auto``: bfloat16 on a GPU, float32 on a CPU)."""
    return str(torch_dtype(name)).removeprefix("torch.")


def generate_answers(model_path: str, config: GenerationConfig, texts: Sequence[str], cache: ResultCache,
                     on_progress: Callable[[int, int], None] | None = None) -> tuple[list[str], int]:
    """Single-turn answers of the model at ``model_path`` to ``texts``, cached under the model's content and the
    settings that change an answer, and its tokenizer and chat template. Returns ``(answers, number generated now)``."""
    from perpair.models import model_fingerprint, tokenizer_identity

    identity = generation_identity(model_fingerprint(model_path), config, tokenizer_identity(model_path))
    return generate_cached(lambda: load_generator(model_path, config), identity,
                           [[{"role": "user", "content": text}] for text in texts], cache,
                           batch_size=config.batch_size, on_progress=on_progress)
