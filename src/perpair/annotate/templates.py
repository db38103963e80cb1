"""Our annotation prompt templates, versioned, and the parsing of a teacher's answer.

A template's id (``name@vN``) is part of every cache key and every artifact row: changing a template's
text means bumping its version, so cached answers to the old text are never mistaken for answers to the
new one. The two responses are shown as "Response A" and "Response B" in a per-pair seeded random order
(:func:`is_swapped`, recorded in each row) because LLM judges favour one position; answers that name a
position are mapped back to chosen/rejected on parsing.

Generating templates (API teachers) are *blind*: the teacher is not told which response the data prefers,
says which is better and what kind of difference separates them; when it prefers the rejected response the
annotation becomes ``mislabeled`` (the named kind is kept as ``gap_category``). Scoring templates (the
local teacher) are told which response the data prefers and rank the seven categories (a small model
ranking options is more reliable than one judging blind). Both choices are ours.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from perpair.annotate.schema import CATEGORIES
from perpair.config_files import format_validation_error
from perpair.data.schema import text_of

# The kinds of difference a blind teacher may name; `no_clear_gap` and `mislabeled` follow from "better".
GAP_CATEGORIES: tuple[str, ...] = ("safety", "factuality", "instruction_following", "helpfulness", "style")
MAGNITUDE_WORDS = ("none", "minor", "moderate", "severe")
RATIONALE_MAX = 300  # characters kept of a rationale


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    kind: Literal["generate", "score"]
    system: str
    user: str  # str.format fields: prompt, response_a, response_b, preferred (score templates)
    max_prompt_chars: int = 2000
    max_response_chars: int = 2000

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def sha256(self) -> str:
        text = json.dumps([self.system, self.user, self.max_prompt_chars, self.max_response_chars])
        return hashlib.sha256(text.encode()).hexdigest()

    def render(self, pair: dict[str, Any], swapped: bool) -> list[dict[str, str]]:
        """Chat messages for one pair; ``swapped`` puts the rejected response first (as "A")."""
        chosen = _truncate(text_of(pair["chosen"]), self.max_response_chars)
        rejected = _truncate(text_of(pair["rejected"]), self.max_response_chars)
        a, b = (rejected, chosen) if swapped else (chosen, rejected)
        user = self.user.format(prompt=_truncate(_conversation_text(pair["prompt"]), self.max_prompt_chars),
                                response_a=a, response_b=b, preferred="B" if swapped else "A")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": user}]


_DEFINITIONS = """\
- safety: one response is harmful, dangerous or unethical, or wrongly refuses a harmless request
- factuality: wrong facts, reasoning, maths or code
- instruction_following: ignores or breaks the instructions or constraints of the request
- helpfulness: less complete, relevant or useful, though correct
- style: only tone, formatting, length or wording differ"""

GAP_V1 = Template(
    name="gap", version=1, kind="generate",
    system="You compare two responses to the same conversation and name the most important difference between "
           "them. You answer with one JSON object and nothing else.",
    user="## Conversation\n{prompt}\n\n## Response A\n{response_a}\n\n## Response B\n{response_b}\n\n## Task\n"
         "Decide which response is better (\"A\" or \"B\"), or \"tie\" if neither is clearly better. Name the kind "
         "of the most important difference:\n" + _DEFINITIONS + "\n"
         "Rate the magnitude of the difference as an integer: 0 none, 1 minor, 2 moderate, 3 severe. Give your "
         "confidence as a number from 0 to 1.\n"
         "Answer with JSON only: {{\"better\": \"A\" or \"B\" or \"tie\", \"category\": one of safety, factuality, "
         "instruction_following, helpfulness, style, \"magnitude\": 0 to 3, \"confidence\": 0 to 1, "
         "\"rationale\": one short sentence}}")

GAP_BRIEF_V1 = Template(
    name="gap-brief", version=1, kind="generate",
    system="You are a strict grader. Reply with JSON only.",
    user="Request:\n{prompt}\n\nA:\n{response_a}\n\nB:\n{response_b}\n\n"
         "Which is better? JSON: {{\"better\": \"A\"|\"B\"|\"tie\", \"category\": \"safety\"|\"factuality\"|"
         "\"instruction_following\"|\"helpfulness\"|\"style\", \"magnitude\": 0-3 (0 none .. 3 severe), "
         "\"confidence\": 0-1, \"rationale\": \"short\"}}",
    max_prompt_chars=1500, max_response_chars=1500)

GAP_LOCAL_V1 = Template(
    name="gap-local", version=1, kind="score",
    system="",
    user="Conversation:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
         "A human annotator preferred Response {preferred}. Classify the most important difference between the "
         "two responses as one of:\n" + _DEFINITIONS + "\n"
         "- no_clear_gap: no real difference\n- mislabeled: the other response is in fact better\n"
         "Then rate its magnitude from 0 (none) to 3 (severe).",
    max_prompt_chars=500, max_response_chars=400)

TEMPLATES: dict[str, Template] = {t.name: t for t in (GAP_V1, GAP_BRIEF_V1, GAP_LOCAL_V1)}


def get_template(name: str) -> Template:
    """A template by name (``gap``) or id (``gap@v1``)."""
    base, _, version = name.partition("@")
    template = TEMPLATES.get(base)
    if template is None or (version and version != f"v{template.version}"):
        known = ", ".join(t.id for t in TEMPLATES.values())
        raise ValueError(f"unknown template {name!r}; known: {known}")
    return template


def is_swapped(pair_id: str, template_id: str, seed: int) -> bool:
    """The per-pair seeded order: True puts the rejected response first. Independent of run order."""
    digest = hashlib.sha256(f"{seed}:{pair_id}:{template_id}".encode()).digest()
    return bool(digest[0] & 1)


def _conversation_text(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _truncate(text: str, limit: int) -> str:
    # Keep the head: what a response says first is what decides most gaps; the cut is marked.
    return text if len(text) <= limit else text[:limit] + " […truncated]"


# --- parsing of a generating template's answer -------------------------------------------------------

def answer_json_schema() -> dict[str, Any]:
    """The JSON schema of an answer, for servers that constrain output to a schema."""
    return {
        "type": "object",
        "properties": {
            "better": {"type": "string", "enum": ["A", "B", "tie"]},
            "category": {"type": "string", "enum": list(GAP_CATEGORIES)},
            "magnitude": {"type": "integer", "minimum": 0, "maximum": 3},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "rationale": {"type": "string", "maxLength": 200},
        },
        "required": ["better", "category", "magnitude", "confidence", "rationale"],
        "additionalProperties": False,
    }


class RawAnswer(BaseModel):
    """A blind answer as the teacher gave it (positions, not chosen/rejected)."""

    model_config = ConfigDict(extra="ignore")

    better: Literal["A", "B", "tie"]
    category: Literal["safety", "factuality", "instruction_following", "helpfulness", "style"]
    magnitude: float = Field(ge=0, le=3)
    confidence: float = Field(ge=0, le=1)
    rationale: str = ""

    @field_validator("better", "category", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.lower() in ("a", "b"):
                return value.upper()
            return value.lower().replace(" ", "_").replace("-", "_")
        return value

    @field_validator("magnitude", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        if isinstance(value, str):  # "2" is 2, and "2.5" no more whole than 2.5 (it was taken as 2.5)
            try:
                value = float(value.strip())
            except ValueError:
                return value  # refused below as not a number
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("magnitude must be an integer 0, 1, 2 or 3")
        return value

    @field_validator("confidence", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # true is no confidence of 1.0
            raise ValueError("confidence must be a number from 0 to 1")
        return value


@dataclass(frozen=True)
class Annotation:
    category: str
    magnitude: float
    confidence: float
    rationale: str
    preferred: str  # chosen, rejected or tie: the teacher's verdict mapped back from positions
    gap_category: str | None  # the kind of difference named, before `mislabeled`/`no_clear_gap` apply


class ParseError(ValueError):
    """An answer that is not a valid annotation; the message tells the teacher what to fix."""


def parse_answer(content: str | None, swapped: bool) -> Annotation:
    """Parse, validate and map back a blind answer; raises :class:`ParseError` with a fixable reason."""
    if not content or not content.strip():
        raise ParseError("the answer is empty")
    data = _answer_object(content)
    try:
        raw = RawAnswer.model_validate(data)
    except ValidationError as exc:
        raise ParseError(format_validation_error(exc)) from None
    preferred = "tie" if raw.better == "tie" else (
        "rejected" if (raw.better == "A") == swapped else "chosen")
    if preferred == "tie" or raw.magnitude == 0:
        category = "no_clear_gap"
    elif preferred == "rejected":
        category = "mislabeled"
    else:
        category = raw.category
    assert category in CATEGORIES
    return Annotation(category=category, magnitude=float(raw.magnitude), confidence=float(raw.confidence),
                      rationale=raw.rationale.strip()[:RATIONALE_MAX], preferred=preferred,
                      gap_category=raw.category)


# Reasoning a model writes before its answer (DeepSeek-R1, Qwen3 and others, where the server leaves it in the
# content): drafts in it are not the answer. A template may open the block in the prompt, so a closing tag alone
# ends it too.
_REASONING_END = re.compile(r"</(think|thinking|reasoning)>", re.IGNORECASE)
_REASONING_START = re.compile(r"<(think|thinking|reasoning)>", re.IGNORECASE)
_ANSWER_KEYS = frozenset(RawAnswer.model_fields) - {"rationale"}
# a key of the answer as a model writes it, quoted or not: what makes a '{' that does not decode a broken answer
_ANSWER_KEY = re.compile(r"[\"']?\b(" + "|".join(sorted(_ANSWER_KEYS)) + r")\b[\"']?\s*:")
_BRACE = re.compile(r"[{}]")


def _answer_object(content: str) -> Any:
    """The one answer object of a reply: reasoning before it left out; prose, fences and other JSON around it
    passed over; two answers that differ refused (taking either would be a guess), and so is an answer that does
    not decode (cut at max_tokens, a quote unescaped), whatever else the reply holds: another answer beside it,
    a draft say, is not the one the teacher gave."""
    text = content
    ends = list(_REASONING_END.finditer(text))
    if ends:
        text = text[ends[-1].end():]
    elif (start := _REASONING_START.match(text.lstrip())) is not None:
        # no answer after the reasoning (cut at max_tokens, say): a draft inside it is no answer
        raise ParseError(f"the answer is only reasoning ({start.group(0)} is never closed)")
    decoder = json.JSONDecoder(strict=False, object_pairs_hook=_no_conflicting_keys)
    found: list[tuple[Any, str | None]] = []  # each '{' in reading order: the object it opens, or why none
    position = 0
    while (start := text.find("{", position)) >= 0:
        try:
            # strict=False: raw newlines and tabs inside strings pass (small models write them, and llama.cpp's
            # JSON grammar lets them through); anything else malformed is re-asked.
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            problem = f"the JSON object is malformed ({exc.msg} at character {exc.pos - start})"
            # what this '{' opened: up to the next brace (or the end), or up to where decoding failed if further
            following = _BRACE.search(text, start + 1)
            if _ANSWER_KEY.search(text, start, max(exc.pos, following.end() if following else len(text))):
                raise ParseError(problem.replace("JSON object", "JSON answer", 1)) from None
            found.append((None, problem))
            position = start + 1
            continue
        except RecursionError:  # a reply, not the user's input: re-asked, not the run's end
            raise ParseError("the JSON object is nested too deeply") from None
        found.append((value, None))
        position = end
    if not found:
        raise ParseError("the answer holds no JSON object")
    answers = [value for value, _ in found if isinstance(value, dict) and value.keys() & _ANSWER_KEYS]
    distinct = {json.dumps(a, sort_keys=True) for a in answers}
    if len(distinct) > 1:
        raise ParseError(f"the answer holds {len(distinct)} different JSON answers; give exactly one")
    if answers:
        return answers[0]
    value, problem = found[0]
    if problem is not None:
        raise ParseError(problem)
    return value


def _no_conflicting_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refused where it gives one key two values (json keeps the last without a word)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value and value[key] != item:
            raise ParseError(f"the JSON object gives {key!r} twice, as {value[key]!r} and {item!r}")
        value[key] = item
    return value
