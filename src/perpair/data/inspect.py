"""``inspect``: a summary of a pairs artifact (counts, sources, lengths, score margins, ties)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from perpair.artifacts import read_artifact
from perpair.data.schema import KIND, SCHEMA_VERSION

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(path: str) -> dict[str, Any]:
    """Plain-data summary of a pairs file; the CLI renders it as tables or JSON."""
    table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    columns = table.select(["prompt", "chosen", "rejected", "source", "score_chosen", "score_rejected"])
    rows = columns.to_pydict()
    n = table.num_rows

    def lengths(name: str) -> np.ndarray:
        return np.array([sum(len(m["content"]) for m in messages) for messages in rows[name]], dtype=float)

    def quantiles(values: np.ndarray) -> dict[str, float]:
        if not len(values):
            return {}
        stats = {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}
        return {**stats, "mean": float(values.mean()), "max": float(values.max())}

    turns = Counter(sum(m["role"] == "user" for m in prompt) for prompt in rows["prompt"])
    scored = [(c, r) for c, r in zip(rows["score_chosen"], rows["score_rejected"], strict=True)
              if c is not None and r is not None]
    margins = np.array([c - r for c, r in scored], dtype=float)
    return {
        "file": str(path),
        "pairs": n,
        "sources": dict(Counter(rows["source"])),
        "split": provenance.get("split"),
        "prompt_user_turns": {str(k): v for k, v in sorted(turns.items())},
        "with_system_message": sum(any(m["role"] == "system" for m in p) for p in rows["prompt"]),
        "length_chars": {name: quantiles(lengths(name)) for name in ("prompt", "chosen", "rejected")},
        "scored_pairs": len(scored),
        "ties": int((margins == 0).sum()),
        "negative_margins": int((margins < 0).sum()),
        "margin_histogram": _histogram(margins),
        "excluded": {
            report.get("path") or report.get("dataset"): {
                kind: {reason: entry["count"] for reason, entry in report[kind].items()}
                for kind in ("invalid", "degenerate", "duplicates")
            }
            for report in provenance.get("sources", [])
        },
    }


def _histogram(margins: np.ndarray) -> list[tuple[str, int]]:
    """Counts per margin value when there are few distinct values (rating scales), else 10 equal bins."""
    if not len(margins):
        return []
    values, counts = np.unique(margins, return_counts=True)
    if len(values) <= 25:
        return [(f"{v:g}", int(c)) for v, c in zip(values, counts, strict=True)]
    counts, edges = np.histogram(margins, bins=10)
    # numpy's last bin is closed: it holds the largest margin, which "[lo, max)" said it did not
    ends = [")"] * (len(counts) - 1) + ["]"]
    return [(f"[{lo:.3g}, {hi:.3g}{end}", int(c))
            for lo, hi, end, c in zip(edges[:-1], edges[1:], ends, counts, strict=True)]
