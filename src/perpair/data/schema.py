"""The canonical preference pair, its stable id and its Parquet schema.

``pair_id`` is defined so that anyone can recompute it from the pair's content alone:

1. Each message becomes ``[role, content]``, with ``content`` normalised: line endings ``\\r\\n`` and
   ``\\r`` become ``\\n``, Unicode is put in NFC form, and leading and trailing whitespace is stripped.
2. The pair becomes the JSON array ``[prompt, chosen, rejected]`` (each a list of ``[role, content]``),
   serialised with no whitespace between tokens and non-ASCII characters written as they are
   (``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``), encoded as UTF-8.
3. ``pair_id`` is the first 16 hexadecimal digits of the SHA-256 of those bytes.

A pair with tool descriptions (``tools``, passed to the chat template with the prompt) has the array
``[prompt, chosen, rejected, tools]`` instead, ``tools`` being the decoded JSON list the pair stores: the
same messages with other tools are another pair (the model sees another prompt).

So the same pair has the same id whichever file format it was read from (a plain-string response and a
one-message assistant list are the same pair), and the id changes when any of the three parts changes.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
KIND = "pairs"

# The turn markers of common chat templates (ChatML, Llama 3, Llama 2/Mistral, Gemma, Zephyr/Phi, GPT-2's end of text):
# text that holds them was rendered with a template already, where perpair renders a pair's messages with the model's.
TEMPLATE_MARKUP = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|start_header_id\|>|<\|eot_id\|>|<\|begin_of_text\|>|"
                             r"<start_of_turn>|<end_of_turn>|\[INST\]|\[/INST\]|<\|(?:system|user|assistant)\|>|"
                             r"<\|endoftext\|>")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)
RATINGS_TYPE = pa.map_(pa.string(), pa.float64())

ARROW_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt", MESSAGES_TYPE, nullable=False),
    pa.field("chosen", MESSAGES_TYPE, nullable=False),
    pa.field("rejected", MESSAGES_TYPE, nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_row", pa.int64(), nullable=False),
    pa.field("score_chosen", pa.float64()),
    pa.field("score_rejected", pa.float64()),
    pa.field("ratings_chosen", RATINGS_TYPE),
    pa.field("ratings_rejected", RATINGS_TYPE),
    pa.field("meta", pa.string(), nullable=False),
    # the tool descriptions given to the chat template with the prompt, a JSON list (null: none), as TRL's
    # ``tools`` column
    pa.field("tools", pa.string()),
])

Message = dict[str, str]


def normalise_text(text: str) -> str:
    """The normal form of a message's content used by ``pair_id`` (see the module docstring)."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def compute_pair_id(prompt: list[Message], chosen: list[Message], rejected: list[Message],
                    tools: str | None = None) -> str:
    """The stable content hash of a pair (see the module docstring for the exact recipe); ``tools`` is the pair's
    JSON text of tool descriptions, or None."""
    parts: list[Any] = [[[m["role"], normalise_text(m["content"])] for m in messages]
                        for messages in (prompt, chosen, rejected)]
    if tools is not None:
        parts.append(json.loads(tools))
    payload = json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class PairRecord:
    """One preference pair in canonical form.

    ``prompt`` is the conversation before the responses (system, user and earlier assistant turns);
    ``chosen`` and ``rejected`` are the assistant messages that answer it. ``meta`` is the untouched
    source row as JSON text.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str
    source_row: int
    meta: str = ""
    score_chosen: float | None = None
    score_rejected: float | None = None
    ratings_chosen: dict[str, float] | None = None
    ratings_rejected: dict[str, float] | None = None
    tools: str | None = None  # JSON text of the tool descriptions the chat template renders with the prompt
    pair_id: str = field(default="")
    # What a reader read in a way worth counting (a function call kept as text); counted by prepare, not stored
    # as a column.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pair_id:
            self.pair_id = compute_pair_id(self.prompt, self.chosen, self.rejected, self.tools)

    def as_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in ARROW_SCHEMA.names}
        for key in ("ratings_chosen", "ratings_rejected"):
            if row[key] is not None:
                row[key] = list(row[key].items())
        return row


def records_to_table(records: list[PairRecord]) -> pa.Table:
    """Arrow table of records in the canonical schema (column order and types fixed)."""
    columns: dict[str, list[Any]] = {name: [] for name in ARROW_SCHEMA.names}
    for record in records:
        for name, value in record.as_row().items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=ARROW_SCHEMA)


def text_of(messages: list[Message]) -> str:
    """The contents of a message list joined by blank lines (for display: the plan report's example pairs)."""
    return "\n\n".join(m["content"] for m in messages)
