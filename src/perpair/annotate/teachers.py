"""The three teachers behind one interface: each turns :class:`Call` s into :class:`CallRecord` s.

- :class:`RatingsTeacher` (sync, instant): the gap from the data's own ratings.
- :class:`LocalTeacher` (sync, batched): a local causal LM ranks the label options by likelihood.
- :class:`ApiTeacher` (async): a chat endpoint answers in JSON; answers are validated and re-asked.

The runner (:mod:`perpair.annotate.runner`) decides what to ask and writes every record to the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perpair.annotate.cache import CallRecord
from perpair.annotate.config import MAX_REASKS, ApiTeacherConfig, LocalTeacherConfig, RatingsTeacherConfig
from perpair.annotate.schema import CATEGORIES, UNKNOWN
from perpair.annotate.templates import (
    MAGNITUDE_WORDS,
    ParseError,
    Template,
    answer_json_schema,
    get_template,
    parse_answer,
)
from perpair.errors import PerpairError
from perpair.llm.client import ChatClient, ChatError


@dataclass
class Call:
    """One unit of work: one pair, one teacher, one template."""

    key: str
    pair_id: str
    teacher: str
    template: str
    swapped: bool
    pair: dict[str, Any]

    def record(self, status: str, **values: Any) -> CallRecord:
        return CallRecord(key=self.key, pair_id=self.pair_id, teacher=self.teacher, template=self.template,
                          status=status, **values)


# How the reason of a call that gave no valid answer within max_reasks begins.
OUT_OF_REASKS = "invalid answer after"


def call_key(pair_id: str, teacher_id: str, fingerprint: dict[str, Any], template_id: str, seed: int,
             material: dict[str, Any] | None = None) -> str:
    """The cache key: everything that changes the answer (never the base URL or the concurrency). ``material``:
    what of the pair beyond its texts (which its id hashes) the teacher reads, for a teacher that reads more
    (the ratings teacher: the scores); left out of the key when None, so other teachers' keys stay as they were."""
    parts: list[Any] = [pair_id, teacher_id, fingerprint, template_id, seed]
    if material is not None:
        parts.append(material)
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- ratings -----------------------------------------------------------------------------------------

RATING_COLUMNS = ("score_chosen", "score_rejected", "ratings_chosen", "ratings_rejected")

# Raw UltraFeedback's GPT-4 aspects and the category each one's gap stands for.
ASPECT_CATEGORY = {
    "honesty": "factuality",
    "truthfulness": "factuality",
    "instruction_following": "instruction_following",
    "helpfulness": "helpfulness",
}


class RatingsTeacher:
    """Ours: the aspect with the largest gap in favour of the preferred response names the category (ties
    between aspects go to the more objective category); the overall margin's size gives the magnitude; a tie
    is ``no_clear_gap``, a negative margin ``mislabeled``. Confidence = the share of rated aspects that agree
    with the overall margin's direction (1 for ties and when there are no aspects).

    With an overall score only (UltraFeedback binarized), or when no aspect favours the chosen response, the
    category is ``unknown`` but the magnitude still comes from the margin, so a plan's β still follows the
    margin (through its prior ``beta.priors.unknown``) instead of collapsing to one value."""

    asynchronous = False

    def __init__(self, config: RatingsTeacherConfig):
        self.config = config
        self.id = config.id
        self.weight = config.weight
        self.templates = config.templates
        # rule 2: an overall score alone gives category "unknown" with a magnitude (rule 1 gave no annotation)
        self.fingerprint = {"rule": 2, "edges": list(config.magnitude_edges)}

    def check(self) -> None:
        """Nothing to check before a run: the data's own ratings need no model."""

    @staticmethod
    def key_material(pair: dict[str, Any]) -> dict[str, Any]:
        """The scores and ratings the answer is made of: the pair id hashes only the texts, so the same texts
        with other scores (another preparation of the data) must not find this answer in the cache."""
        return {name: pair.get(name) for name in RATING_COLUMNS}

    def magnitude(self, margin: float) -> float:
        low, high = self.config.magnitude_edges
        size = abs(margin)
        return 0.0 if size == 0 else 1.0 if size <= low else 2.0 if size <= high else 3.0

    def annotate(self, call: Call) -> CallRecord:
        pair = call.pair
        chosen, rejected = pair.get("score_chosen"), pair.get("score_rejected")
        ratings_c = dict(pair.get("ratings_chosen") or [])
        ratings_r = dict(pair.get("ratings_rejected") or [])
        gaps = {a: ratings_c[a] - ratings_r[a] for a in ASPECT_CATEGORY if a in ratings_c and a in ratings_r}
        if chosen is None or rejected is None:
            if not gaps:
                return call.record("unknown", reason="the pair has no ratings")
            margin = sum(gaps.values()) / len(gaps)  # no overall score: the mean aspect gap stands in
        else:
            margin = chosen - rejected
        if margin == 0:
            return call.record("ok", category="no_clear_gap", magnitude=0.0, confidence=1.0, preferred="tie",
                               rationale=f"tie: overall margin {margin:g}")
        sign = 1.0 if margin > 0 else -1.0
        magnitude = self.magnitude(margin)
        preferred = "chosen" if sign > 0 else "rejected"
        best: str | None = None
        if gaps:
            by_category: dict[str, float] = {}
            for aspect, gap in gaps.items():
                category = ASPECT_CATEGORY[aspect]
                by_category[category] = max(by_category.get(category, -math.inf), sign * gap)
            ranked = sorted(by_category.items(), key=lambda item: (-item[1], CATEGORIES.index(item[0])))
            if ranked[0][1] > 0:
                best = ranked[0][0]
            agree = sum(1 for gap in gaps.values() if sign * gap > 0) / len(gaps)
        else:
            agree = 1.0
        detail = ", ".join(f"{a} {g:+g}" for a, g in sorted(gaps.items()))
        if sign < 0:
            rationale = f"negative overall margin {margin:g}" + (f"; aspects: {detail}" if gaps else "")
            return call.record("ok", category="mislabeled", gap_category=best, magnitude=magnitude,
                               confidence=agree, preferred=preferred, rationale=rationale)
        if best is None:
            why = "only an overall score" if not gaps else f"no aspect rating favours the chosen response ({detail})"
            return call.record("ok", category=UNKNOWN, magnitude=magnitude, confidence=agree, preferred=preferred,
                               rationale=f"overall margin {margin:g}; {why}: category unknown")
        return call.record("ok", category=best, gap_category=best, magnitude=magnitude, confidence=agree,
                           preferred=preferred, rationale=f"overall margin {margin:g}; aspects: {detail}")


# --- local -------------------------------------------------------------------------------------------

class LocalTeacher:
    """Ranks the seven categories by likelihood after the prompt, then the magnitudes 0-3 after the winning
    category, in one batched pass (:class:`perpair.llm.scoring.OptionScorer`). With ``calibrate`` (default),
    each label's likelihood is divided by its likelihood for a content-free pair first (contextual calibration,
    Zhao et al., 2021): small models otherwise pick the label they like best whatever the pair (SmolLM2 said
    ``safety`` for 987 of the 994 sample pairs). Confidence = the winning category's probability normalised
    over the seven. Always yields a valid annotation."""

    asynchronous = False
    ANSWER_PREFIX = "Category:"
    SUFFIX = "\nMagnitude (0-3): "

    def __init__(self, config: LocalTeacherConfig, *, model=None, tokenizer=None):
        self.config = config
        self.id = config.id
        self.weight = config.weight
        self.templates = config.templates
        # calibrate: "each order" since a swapped pair's prompt is calibrated by the content-free pair in its own
        # order (before, by the unswapped one's: other answers, so other cache keys)
        self.fingerprint = {"model": config.model, "max_length": config.max_length, "dtype": config.dtype,
                            "max_chars": config.max_chars, "calibrate": "each order" if config.calibrate else False}
        self._model, self._tokenizer = model, tokenizer
        self._scorer = None
        self._content_free: dict[tuple[str, bool], Any] = {}  # (template id, swapped) -> the content-free pair's

    def check(self) -> None:
        """Refuse a model that cannot load, before the run creates its cache (loading the weights waits until
        there is work: a resumed run that finds every answer cached never loads them)."""
        if self._model is not None:
            return
        from perpair.models import resolve_model

        try:  # a local path that names no folder is refused here (a Hub id is checked by loading its config)
            spec = resolve_model(self.config.model)
        except PerpairError as exc:
            raise PerpairError(f"teacher {self.id}: {exc}") from None
        folder = Path(spec)
        from transformers import AutoConfig

        try:
            with _quiet_transformers():
                AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            what = "a model folder (config.json)" if folder.is_dir() else "a model on the Hub or in its cache"
            raise PerpairError(f"teacher {self.id}: {spec} is not {what}: {first}") from None
        # part of every cache key: a model retrained at the same path, or a Hub repository moved, is another teacher
        from perpair.models import model_fingerprint

        self.fingerprint["weights"] = model_fingerprint(spec)
        # and so is one whose chat template or tokenizer was edited in place: the prompts it scores are others (a
        # Hub id stands for itself: its commit is in the weights' fingerprint)
        from perpair.models import tokenizer_identity

        if (tokenizer := tokenizer_identity(spec)) is not None:
            self.fingerprint["tokenizer"] = tokenizer
        from perpair.models import load_tokenizer

        with _quiet_transformers():
            encode = load_tokenizer(spec)
        # the magnitude is read as one token after the category: a tokenizer that encodes a digit alone as two
        # (SentencePiece's "▁", "0": Llama 2, Mistral) gave a traceback after the weights loaded
        if split := [m for m in range(len(MAGNITUDE_WORDS)) if len(encode(str(m), add_special_tokens=False)
                                                                   ["input_ids"]) != 1]:
            raise PerpairError(f"teacher {self.id}: the tokenizer of {spec} encodes the magnitude {split[0]} as more "
                               "than one token, and the local teacher reads each magnitude as one; use a model whose "
                               "tokenizer encodes a digit alone as one token (SmolLM2, Llama 3, Qwen), or an api: "
                               "teacher")

    def _load(self):
        if self._scorer is None:
            import torch

            from perpair.llm.scoring import OptionScorer
            from perpair.models import load_causal_lm, load_tokenizer, resolve_model
            from perpair.onednn import PROMPT_ROWS, note_emulated_bf16, pack_linears

            if self._model is None:
                path = resolve_model(self.config.model)
                dtype = torch.bfloat16 if self.config.dtype == "bfloat16" else torch.float32
                with _quiet_transformers():
                    self._tokenizer = load_tokenizer(path)  # (it refuses a blank chat template)
                    self._model = load_causal_lm(path, dtype=dtype)
                if torch.cuda.is_available():  # (it ran on the CPU whatever the machine had)
                    try:
                        self._model = self._model.to("cuda")
                    except torch.cuda.OutOfMemoryError:  # a model larger than the GPU: on the CPU, as before
                        self._model = self._model.to("cpu")
                        torch.cuda.empty_cache()
                pack_linears(self._model, rows=PROMPT_ROWS)  # on a CPU: the scorer only runs forwards
                note_emulated_bf16(dtype, self._model.device, f"the local teacher {self.config.model}",
                                   "its dtype: float32")
            self._scorer = OptionScorer(self._model, self._tokenizer, batch_size=self.batch_size,
                                        max_length=self.config.max_length)
        return self._scorer

    def prompt_text(self, template: Template, pair: dict[str, Any], swapped: bool) -> str:
        messages = template.render(pair, swapped)
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant: "
        return text + self.ANSWER_PREFIX

    def _score(self, scorer, prompts: list[str]):
        return scorer.score(prompts, [" " + c for c in CATEGORIES], suffix=self.SUFFIX,
                            then=[str(m) for m in range(len(MAGNITUDE_WORDS))])

    def _prior(self, scorer, template: Template, swapped: bool):
        """The label scores of a content-free pair under ``template``, shown in the order ``swapped`` says (the prompt
        names the preferred response, "A" or "B": the content-free input in the pair's own prompt format, as
        contextual calibration asks; computed once per template and order)."""
        if (template.id, swapped) not in self._content_free:
            answer = [{"role": "assistant", "content": "N/A"}]
            empty = {"prompt": [{"role": "user", "content": "N/A"}], "chosen": answer, "rejected": answer}
            self._content_free[template.id, swapped] = self._score(
                scorer, [self.prompt_text(template, empty, swapped)])[0]
        return self._content_free[template.id, swapped]

    @property
    def on_cpu(self) -> bool:
        """Whether the model runs on the CPU (the one it loads itself does unless a CUDA GPU is there)."""
        if self._model is None:
            import torch

            return not torch.cuda.is_available()
        return next(self._model.parameters()).device.type == "cpu"

    @property
    def batch_size(self) -> int:
        """The configured batch size, else :func:`perpair.llm.scoring.default_batch_size`."""
        from perpair.llm.scoring import default_batch_size

        return self.config.batch_size or default_batch_size(self.on_cpu)

    @property
    def threads(self) -> int | None:
        """PyTorch threads while scoring: the configured number, else 1 on a CPU, else PyTorch's (None)."""
        return self.config.threads or (1 if self.on_cpu else None)

    def annotate_batch(self, calls: list[Call]) -> list[CallRecord]:
        scorer = self._load()
        with _torch_threads(self.threads):
            return self._annotate_batch(scorer, calls)

    def _annotate_batch(self, scorer, calls: list[Call]) -> list[CallRecord]:
        records: list[CallRecord] = []
        by_template: dict[str, list[Call]] = {}
        for call in calls:
            by_template.setdefault(call.template, []).append(call)
        for template_id, group in by_template.items():
            template = _with_limits(get_template(template_id), self.config.max_chars)
            prompts = [self.prompt_text(template, call.pair, call.swapped) for call in group]
            scores = self._score(scorer, prompts)
            for call, score in zip(group, scores, strict=True):
                prior = self._prior(scorer, template, call.swapped) if self.config.calibrate else None
                logprob, then_all = score.logprob, score.then_logprob
                if prior is not None:  # p(label | pair) / p(label | content-free pair), renormalised below
                    logprob = [a - b for a, b in zip(logprob, prior.logprob, strict=True)]
                    then_all = [[a - b for a, b in zip(x, y, strict=True)]
                                for x, y in zip(then_all, prior.then_logprob, strict=True)]
                probs = _softmax(logprob)
                best = max(range(len(CATEGORIES)), key=lambda k: (probs[k], -k))
                then = then_all[best]
                magnitude = max(range(len(then)), key=lambda m: (then[m], -m))
                mag_probs = _softmax(then)
                raw = {"category": {c: round(p, 6) for c, p in zip(CATEGORIES, probs, strict=True)},
                       "magnitude": {str(m): round(p, 6) for m, p in enumerate(mag_probs)}}
                category = CATEGORIES[best]
                records.append(call.record(
                    "ok", category=category, magnitude=float(magnitude), confidence=round(probs[best], 6),
                    preferred="rejected" if category == "mislabeled" else "chosen", swapped=call.swapped,
                    rationale=f"likelihood ranking: {category} (p={probs[best]:.2f}), magnitude {magnitude} "
                              f"({MAGNITUDE_WORDS[magnitude]}, p={mag_probs[magnitude]:.2f})",
                    raw_response=json.dumps(raw, sort_keys=True), attempts=1))
        order = {call.key: i for i, call in enumerate(calls)}
        return sorted(records, key=lambda r: order[r.key])


@contextlib.contextmanager
def _quiet_transformers():
    """Loading without transformers' progress bars, notices and FutureWarnings: the user cannot act on them,
    and perpair's own progress and errors say what matters."""
    from transformers.utils import logging as hf_logging

    from perpair.models import no_progress_bars

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_progress_bars(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """PyTorch's intra-op threads set to ``threads`` (if given) for the block, then put back."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _with_limits(template: Template, max_chars: int | None) -> Template:
    if max_chars is None:
        return template
    return dataclasses.replace(template, max_prompt_chars=max_chars, max_response_chars=max_chars)


def _softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


# --- API ---------------------------------------------------------------------------------------------

STRUCTURED_MODES = ("json_schema", "json_object", "json_object_plain", "none")


class ApiTeacher:
    """Asks a chat endpoint; validates the JSON answer; re-asks (bounded) with the validation errors.

    Structured output: ``json_schema`` is the OpenAI/vLLM/SGLang form, ``json_object`` with a ``schema`` the
    llama.cpp form, plain ``json_object`` the Ollama form. In ``auto`` mode a 400/422 answer to one form
    moves the whole teacher to the next form (servers reject forms they do not know). Servers that accept a
    schema may still not enforce its bounds (llama.cpp lets magnitude 4 through), hence validation always.
    """

    asynchronous = True

    def __init__(self, config: ApiTeacherConfig, *, transport=None):
        self.config = config
        self.id = config.id
        self.weight = config.weight
        self.templates = config.templates
        # max_reasks bounds the tries, it does not shape an answer: out of the key, so raising it re-asks only the
        # calls that ran out of re-asks (:meth:`reusable`), not every answer already paid for
        self.fingerprint = {"model": config.model, "temperature": config.temperature,
                            "max_tokens": config.max_tokens, "seed": config.seed, "max_chars": config.max_chars}
        # the fingerprints of the keys written before 7 Dec 2026, which held max_reasks (any value it can take, as
        # the run that wrote them had it): their answers are still read
        self.legacy_fingerprints = [{**self.fingerprint, "max_reasks": n} for n in range(MAX_REASKS + 1)]
        self.client = ChatClient(config.client_config(), transport=transport)
        self._mode = "json_schema" if config.structured == "auto" else config.structured
        self._confirmed = config.structured != "auto"

    def reusable(self, record: CallRecord) -> bool:
        """Whether a cached answer stands under this teacher's settings: all but a failure for want of re-asks made
        with fewer than ``max_reasks`` (raised since, the call is asked again)."""
        return not (record.status == "failed" and (record.reason or "").startswith(OUT_OF_REASKS)
                    and record.reasks < self.config.max_reasks)

    def check(self) -> None:
        """Nothing to check before a run: the key variable is checked when the client is built, and a server
        that is down is a failed call (retried), not bad input."""

    def _response_format(self, mode: str) -> dict[str, Any] | None:
        schema = answer_json_schema()
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "annotation", "schema": schema, "strict": True}}
        if mode == "json_object":
            return {"type": "json_object", "schema": schema}
        if mode == "json_object_plain":
            return {"type": "json_object"}
        return None

    async def _chat(self, messages: list[dict[str, str]], request_id: str):
        attempts = transient = 0
        started: str | None = None  # the form this call's refusals first moved the teacher away from
        while True:
            mode = self._mode
            probing = self.config.structured == "auto" and mode != "none" and not self._confirmed
            try:
                # Until a form has worked once, try it without retries: a server that rejects a form rejects
                # it every time (llama.cpp even answers 500), and retrying would only wait.
                result = await self.client.chat(
                    messages, max_tokens=self.config.max_tokens, temperature=self.config.temperature,
                    seed=self.config.seed, response_format=self._response_format(mode), request_id=request_id,
                    max_retries=0 if probing else None)
            except ChatError as exc:
                if probing and _rejects_format(exc):
                    # The teacher learning what the server takes, not this call's work: left out of the
                    # call's attempts (the client's request count has it), so that a row does not depend on
                    # whether its call was among the first of a run (a resumed run probes again).
                    if self._mode == mode:  # the first call to learn it moves the teacher on
                        started = started or mode
                        self._mode = STRUCTURED_MODES[STRUCTURED_MODES.index(mode) + 1]
                    continue
                if (started is not None and mode == "none" and exc.status in (400, 422)
                        and self._mode == "none" and not self._confirmed):
                    # Refused in every form, plain text too: the refusal was this call's own (its prompt past the
                    # server's context, say), not the form's. The teacher goes back to the form it started from.
                    self._mode = started
                attempts += exc.attempts
                if probing and exc.retryable and transient < self.config.max_retries:
                    # A transient failure says nothing about the form: probe again, within the retry bound.
                    transient += 1
                    self.client.stats.retries += 1  # a retry all the same (the client's own loop was off)
                    await asyncio.sleep(self.client.backoff_delay(transient))
                    continue
                exc.attempts = attempts
                raise
            if mode == self._mode or STRUCTURED_MODES.index(mode) < STRUCTURED_MODES.index(self._mode):
                # a form that worked is one the server takes, even if another call's refusal (of something else)
                # moved the teacher past it meanwhile
                self._mode = mode
                self._confirmed = True
            result.attempts += attempts
            return result

    async def annotate(self, call: Call) -> CallRecord:
        template = _with_limits(get_template(call.template), self.config.max_chars)
        messages = template.render(call.pair, call.swapped)
        usage = {"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
        raw: str | None = None
        reason = ""
        for reask in range(self.config.max_reasks + 1):
            try:
                result = await self._chat(messages, request_id=call.key)
            except ChatError as exc:
                usage["attempts"] += exc.attempts
                return call.record("failed", swapped=call.swapped, reason=f"request failed: {exc}", raw_response=raw,
                                   reasks=reask, **usage)
            usage["attempts"] += result.attempts
            usage["prompt_tokens"] += result.prompt_tokens
            usage["completion_tokens"] += result.completion_tokens
            usage["cost"] += result.cost
            raw = result.content
            if not (raw or "").strip() and (refusal := _refusal(result.response)) is not None:
                # OpenAI's structured outputs answer a refusal as message.refusal with no content: re-asked, it was
                # "the answer is empty" twice more, the refusal recorded nowhere
                return call.record("failed", swapped=call.swapped, raw_response=refusal, reasks=reask,
                                   reason=f"the teacher refused: {refusal.strip()[:200]}", **usage)
            cut = (f"the answer was cut at max_tokens={self.config.max_tokens}"
                   if result.finish_reason == "length" else None)
            try:
                answer = parse_answer(raw, call.swapped)
            except ParseError as exc:
                reason = f"{exc} ({cut})" if cut else str(exc)
            else:
                if cut is None:
                    return call.record("ok", category=answer.category, magnitude=answer.magnitude,
                                       confidence=answer.confidence, rationale=answer.rationale,
                                       preferred=answer.preferred, gap_category=answer.gap_category,
                                       swapped=call.swapped, raw_response=raw, reasks=reask, **usage)
                # what parses in a reply cut short is not known to be the answer: a draft before it, say
                reason = cut
            messages = [*messages, {"role": "assistant", "content": raw or ""},
                        {"role": "user", "content": f"That answer is invalid: {reason}. Reply again with the "
                                                    "corrected JSON object only."}]
        return call.record("failed", swapped=call.swapped, raw_response=raw, reasks=self.config.max_reasks,
                           reason=f"{OUT_OF_REASKS} {self.config.max_reasks} re-asks: {reason}", **usage)


def _refusal(response: dict[str, Any]) -> str | None:
    """The refusal text of a chat completion (``choices[0].message.refusal``), or None."""
    message = response["choices"][0].get("message") or {}
    refusal = message.get("refusal")
    return refusal if isinstance(refusal, str) and refusal.strip() else None


def _rejects_format(exc: ChatError) -> bool:
    """Whether an error says the server does not take this ``response_format``."""
    return exc.status in (400, 422) or (exc.status is not None and exc.status >= 500
                                        and "response_format" in exc.reason)


def make_teacher(config, **kwargs):
    if isinstance(config, RatingsTeacherConfig):
        return RatingsTeacher(config)
    if isinstance(config, LocalTeacherConfig):
        return LocalTeacher(config, **kwargs)
    return ApiTeacher(config, **kwargs)
