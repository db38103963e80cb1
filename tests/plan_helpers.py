"""Builders of small pairs and annotations artifacts for the plan tests (not a test module)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from perpair.annotate import schema as ann_schema
from perpair.artifacts import file_sha256, write_artifact
from perpair.data.schema import SCHEMA_VERSION, PairRecord, records_to_table

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_pairs(path: Path, scores: list[tuple[float | None, float | None]], tag: str = "") -> list[str]:
    """A pairs file with one pair per (score_chosen, score_rejected); returns the pair ids in file order."""
    records = [
        PairRecord(prompt=[{"role": "user", "content": f"question {tag}{i}"}],
                   chosen=[{"role": "assistant", "content": f"good answer {i}"}],
                   rejected=[{"role": "assistant", "content": f"bad answer {i}"}],
                   source="test", source_row=i, meta=json.dumps({"row": i}),
                   score_chosen=sc, score_rejected=sr)
        for i, (sc, sr) in enumerate(scores)
    ]
    write_artifact(path, records_to_table(records), kind="pairs", schema_version=SCHEMA_VERSION,
                   provenance={"source": "tests", "tag": tag})
    return [r.pair_id for r in records]


def write_annotations(path: Path, pairs_path: Path, pair_ids: list[str], categories: list[str | None],
                      magnitudes: list[float | None], confidences: list[float | None],
                      pairs_sha256: str | None = None) -> None:
    table = pa.table({"pair_id": pair_ids, "category": categories, "magnitude": magnitudes,
                      "confidence": confidences}, schema=ann_schema.ARROW_SCHEMA)
    write_artifact(path, table, kind=ann_schema.KIND, schema_version=ann_schema.SCHEMA_VERSION,
                   provenance={"pairs_sha256": pairs_sha256 or file_sha256(pairs_path), "teacher": "tests"})


def random_annotations(path: Path, pairs_path: Path, pair_ids: list[str], seed: int = 0,
                       unannotated: int = 0) -> None:
    """Seeded synthetic annotations over every category; the first ``unannotated`` pairs are left out."""
    rng = np.random.default_rng(seed)
    ids = pair_ids[unannotated:]
    categories = [str(c) for c in rng.choice(ann_schema.CATEGORIES, size=len(ids))]
    magnitudes = [float(m) for m in rng.choice([0.0, 1.0, 2.0, 3.0, 1.5, 2.25], size=len(ids))]
    confidences = [float(c) for c in np.round(rng.uniform(0.3, 1.0, size=len(ids)), 3)]
    write_annotations(path, pairs_path, ids, categories, magnitudes, confidences)


_NUM = r"(-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))"


def beta_from_explanation(text: str, priors: dict[str, float], gain_table: list[float]) -> float:
    """Recompute β by hand from the numbers ``explain`` printed (checking each printed step on the way)."""
    found = re.search(rf"β = β_global = {_NUM}", text)
    if found:
        return float(found.group(1))
    category = re.findall(r"annotation: category = (\w+)", text)[-1]  # the donor's, for the random control
    if re.search(r"s = 0\.0  \[mislabeled above threshold, action beta_max", text):
        s = 0.0
    else:
        prior_cat, prior = re.search(rf"prior\((\w+)\) = {_NUM}", text).groups()
        assert prior_cat == category and float(prior) == priors[category]
        exact = re.search(rf"g\({_NUM}\) = table\[(\d)\] = {_NUM}", text)
        if exact:
            g = float(exact.group(3))
            assert g == gain_table[int(exact.group(2))]
        else:
            between = re.search(rf"g\({_NUM}\) = g\((\d)\) \+ {_NUM} × \(g\(\d\) − g\(\d\)\) = "
                                rf"{_NUM} \+ {_NUM} × \({_NUM} − {_NUM}\) = {_NUM}", text)
            _, low, t, a, t2, b, a2, printed = between.groups()
            assert float(a) == gain_table[int(low)] and float(b) == gain_table[int(low) + 1]
            g = float(a) + float(t) * (float(b) - float(a))
            assert g == float(printed) and t == t2 and a == a2
        p, g_printed, confidence, s_printed = map(float, re.search(
            rf"s = prior · g · confidence = {_NUM} × {_NUM} × {_NUM} = {_NUM}", text).groups())
        assert p == float(prior) and g_printed == g
        s = p * g * confidence
        assert s == s_printed
    beta_max, s1, beta_min, s2, raw_printed = map(float, re.search(
        rf"β_raw = β_max\^\(1 − s\) × β_min\^s = {_NUM}\^\(1 − {_NUM}\) × {_NUM}\^{_NUM} = {_NUM}",
        text).groups())
    assert s1 == s2 == s
    raw = beta_max ** (1 - s) * beta_min ** s
    assert raw == pytest.approx(raw_printed, rel=1e-14)
    norm = re.search(rf"c = β_global / geomean\(.*?\) = {_NUM} / {_NUM} = {_NUM}", text)
    if norm is None:
        assert "β = β_raw" in text
        return raw
    target, geomean, c_printed = map(float, norm.groups())
    c = target / geomean
    assert c == pytest.approx(c_printed, rel=1e-15)
    return c * raw
