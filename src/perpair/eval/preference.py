"""Held-out preference accuracy: implicit-reward accuracy and margins of a policy against its reference.

For a pair (x, y_w, y_l) the DPO implicit reward margin (Rafailov et al. 2023, eq. 5 rearranged) is

    m = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]

and the pair is ranked correctly when m > 0. The reference-free variant is the length-normalised log-prob margin
of the policy alone, as SimPO's reward without its β (Meng et al. 2024, eq. 4):
``log π(y_w|x) / |y_w| − log π(y_l|x) / |y_l|``.

Ties (m = 0 exactly, e.g. policy = reference) count **half** in ``accuracy`` and are also reported on their own
(``n_ties``); ``accuracy_strict`` counts them as wrong, as TRL's ``rewards/accuracies`` does
(``chosen_rewards > rejected_rewards``). The maths are pure functions of log-prob tables
(:data:`perpair.plan.difficulty.REFERENCE_LOGPS_SCHEMA` columns); models are loaded and scored in
:func:`run_preference`, always through :func:`perpair.train.logprobs.sequence_logps` (the train stage's tokenization).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from perpair.errors import PerpairError
from perpair.eval.sources import model_identity

UNANNOTATED = "unannotated"


def _model_label(model: str) -> str:
    """The name the other evaluations give the model (``smollm2``: its checkpoint's folder), so that a report's rows
    of one model carry one name."""
    from perpair.eval.alpaca_eval import model_label
    from perpair.models import resolve_model

    return model_label(resolve_model(model))


def _join(policy: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Policy and reference log-probs side by side, by pair_id (pairs present in both)."""
    return policy.merge(reference, on="pair_id", suffixes=("", "_ref"), validate="one_to_one")


def implicit_reward_margins(policy: pd.DataFrame, reference: pd.DataFrame, beta: float) -> pd.Series:
    """β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] per pair, indexed by pair_id."""
    joined = _join(policy, reference)
    chosen = joined["chosen_logps"] - joined["chosen_logps_ref"]
    rejected = joined["rejected_logps"] - joined["rejected_logps_ref"]
    return pd.Series((beta * (chosen - rejected)).to_numpy(float), index=joined["pair_id"], name="margin")


def length_normalised_margins(policy: pd.DataFrame) -> pd.Series:
    """log π(y_w)/|y_w| − log π(y_l)/|y_l| per pair (reference-free), indexed by pair_id."""
    chosen = policy["chosen_logps"] / policy["chosen_tokens"].clip(lower=1)
    rejected = policy["rejected_logps"] / policy["rejected_tokens"].clip(lower=1)
    return pd.Series((chosen - rejected).to_numpy(float), index=policy["pair_id"], name="margin")


def margin_summary(margins: np.ndarray | pd.Series) -> dict[str, float | int]:
    """Accuracy (ties = ½), strict accuracy (ties = wrong), counts, and the mean margin with its standard error
    (ddof = 1). Empty input gives NaN statistics and zero counts."""
    m = np.asarray(margins, float)
    n = len(m)
    wins, ties = int((m > 0).sum()), int((m == 0).sum())
    nan = float("nan")
    return {
        "n": n,
        "n_correct": wins,
        "n_ties": ties,
        "n_wrong": n - wins - ties,
        "accuracy": (wins + ties / 2) / n if n else nan,
        "accuracy_strict": wins / n if n else nan,
        "mean_margin": float(m.mean()) if n else nan,
        "margin_se": float(m.std(ddof=1) / math.sqrt(n)) if n > 1 else nan,
    }


def summary_by_category(margins: pd.Series, categories: pd.Series) -> dict[str, dict[str, float | int]]:
    """:func:`margin_summary` per category (``categories`` indexed by pair_id; missing → ``unannotated``)."""
    labels = categories.reindex(margins.index).fillna(UNANNOTATED).to_numpy()
    return {str(c): margin_summary(margins.to_numpy()[labels == c]) for c in sorted(set(labels))}


def preference_metrics(policy: pd.DataFrame, reference: pd.DataFrame, beta: float,
                       categories: pd.Series | None = None) -> dict[str, Any]:
    """All the figures of a preference evaluation from the two log-prob tables (pure; no I/O)."""
    reward = implicit_reward_margins(policy, reference, beta)
    normalised = length_normalised_margins(policy.set_index("pair_id").loc[reward.index].reset_index())
    result: dict[str, Any] = {"implicit_reward": margin_summary(reward),
                              "length_normalised": margin_summary(normalised)}
    if categories is not None:
        result["implicit_reward_by_category"] = summary_by_category(reward, categories)
        result["length_normalised_by_category"] = summary_by_category(normalised, categories)
    return result


# ---------------------------------------------------------------------------------------------------- pipeline


class PreferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The trained policy: checkpoint folder, Hub id or smollm2.")
    ref: str = Field(description="The reference (initial) model.")
    data: Path = Field(description="A pairs artifact (e.g. the test split written by perpair prepare).")
    annotations: Path | None = Field(None, description="An annotations artifact: accuracy by category.")
    beta: float = Field(0.1, gt=0, description="β of the implicit reward (scales the margin, not the accuracy).")
    max_length: int | None = Field(1024, ge=1, description="Prompt + response truncation, as in training.")
    limit: int | None = Field(None, ge=1, description="Only the first N pairs.")
    tokens_per_forward: int = Field(0, ge=0, description="Pack pairs up to this many tokens per forward.")
    reference_cache: Path | None = Field(
        None, description="Folder of cached reference log-probs (the training stage's format): the reference's are "
                          "computed once per model, tokenizer, pairs file and max_length, and read by every later "
                          "evaluation against the same reference (perpair run's arms share them).")
    name: str | None = None


def _load(spec: str):
    import torch

    from perpair.models import load_causal_lm, load_tokenizer, resolve_model
    from perpair.onednn import PROMPT_ROWS, pack_linears

    path = resolve_model(spec)
    model = load_causal_lm(path, dtype=torch.float32)
    pack_linears(model, rows=PROMPT_ROWS)  # on a CPU: the evaluation only runs forwards
    return model, load_tokenizer(path)


def score_model(spec: str, pairs, config: PreferenceConfig,
                on_progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    from perpair.train.logprobs import sequence_logps

    model, tokenizer = _load(spec)
    table = sequence_logps(model, tokenizer, pairs, max_length=config.max_length,
                           tokens_per_forward=config.tokens_per_forward, on_progress=on_progress)
    return table.to_pandas()


def score_reference(pairs, config: PreferenceConfig,
                    on_progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The reference's log-probs of ``pairs``: scored as :func:`score_model` does, or, with
    ``config.reference_cache``, read from that cache, computing (and adding) only the pairs it lacks. The model is
    loaded only when a pair is missing."""
    if config.reference_cache is None:
        return score_model(config.ref, pairs, config, on_progress)
    from perpair.models import load_tokenizer, resolve_model
    from perpair.plan.difficulty import logps_table
    from perpair.train import reference
    from perpair.train.logprobs import DEFAULT_CHUNK, tokenize_table

    spec = resolve_model(config.ref)
    tokenizer = load_tokenizer(spec)
    ids, tokenized = tokenize_table(tokenizer, pairs, config.max_length)
    # recorded, as the train stage's pass does: a plan reading the cache tells them from pairs not computed yet
    left_out = sorted(set(pairs.column("pair_id").to_pylist()) - set(ids))  # their prompt alone fills max_length
    path, key = reference.cache_file(Path(config.reference_cache), spec, tokenizer, config.data, config.max_length)
    reference.reference_logps(path, key, ids, tokenized, lambda: _load(config.ref)[0], device="cpu",
                              tokens_per_forward=config.tokens_per_forward, chunk_size=DEFAULT_CHUNK,
                              on_progress=on_progress and (lambda done, total: on_progress(done)), left_out=left_out,
                              model_name=spec)
    cached = reference.load_cached(path)  # (chosen, chosen tokens, rejected, rejected tokens) per pair_id
    rows = [cached[i] for i in ids]
    return logps_table(ids, *([r[k] for r in rows] for k in range(4))).to_pandas()


def read_categories(path: Path, pairs_path: Path | None = None, pairs=None) -> pd.Series:
    """The category of each annotated pair of ``path``, by pair_id. Given the pairs file (``pairs_path`` and its
    table ``pairs``), annotations made from another pairs file are refused, as ``perpair plan`` refuses them."""
    from perpair.annotate.schema import align_to_pairs, read_annotations
    from perpair.artifacts import file_sha256

    table, provenance = read_annotations(path)
    if pairs_path is not None:
        align_to_pairs(path, table, provenance, str(pairs_path), file_sha256(pairs_path),
                       pairs.column("pair_id").combine_chunks().cast("string"))
    frame = table.select(["pair_id", "category"]).to_pandas()
    return frame.set_index("pair_id")["category"]


def _pairs(config: PreferenceConfig, pairs=None):
    """The pairs to evaluate: those of ``config.data`` (``pairs``: its table, already read), the first
    ``config.limit`` of them."""
    from perpair.data import read_pairs

    if pairs is None:
        pairs, _ = read_pairs(str(config.data))
    if config.limit:
        pairs = pairs.slice(0, config.limit)
    if pairs.num_rows == 0:
        raise PerpairError(f"{config.data}: no pairs to evaluate")
    return pairs


def cache_reference(config: PreferenceConfig) -> None:
    """The reference's log-probs of the pairs, into ``config.reference_cache`` (the missing ones computed): what
    several evaluations against the same reference, run side by side, then read instead of each computing."""
    if config.reference_cache is None:
        raise PerpairError("cache_reference needs a reference_cache folder")
    score_reference(_pairs(config), config)


def run_preference(config: PreferenceConfig,
                   on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Score the pairs under the policy and the reference and return the results row."""
    from perpair.data import read_pairs

    progress = on_progress or (lambda stage, done, total: None)
    every, _ = read_pairs(str(config.data))
    # annotations of another pairs file are refused before any model is loaded
    categories = read_categories(config.annotations, config.data, every) if config.annotations else None
    pairs = _pairs(config, every)
    n = pairs.num_rows
    policy = score_model(config.model, pairs, config, lambda d: progress("policy log-probs", d, n))
    if policy.empty:  # before the reference is scored: nothing to compare, and nothing is written
        raise _none_fits(config, n, config.model)
    reference = score_reference(pairs, config, lambda d: progress("reference log-probs", d, n))
    metrics = preference_metrics(policy, reference, config.beta, categories)
    summary = metrics["implicit_reward"]
    if summary["n"] == 0:  # the reference's tokenizer left out the pairs the policy's kept
        raise _none_fits(config, n, config.ref)
    row: dict[str, Any] = {
        "benchmark": "preference_accuracy", "name": config.name or _model_label(config.model),
        "model": config.model, "model_path": model_identity(config.model), "ref": config.ref,
        "data": str(config.data), "beta": config.beta,
        "max_length": config.max_length, "ties": "count half in accuracy; counted as wrong in accuracy_strict",
        "limit": config.limit, "n_pairs": n, "n_total": summary["n"], "n_skipped": n - summary["n"],
        "accuracy": summary["accuracy"], "mean_margin": summary["mean_margin"], "margin_se": summary["margin_se"],
        "length_normalised_accuracy": metrics["length_normalised"]["accuracy"],
        **metrics,
    }
    if categories is not None:
        row["annotations"] = str(config.annotations)
        row["n_annotated"] = int(categories.reindex(policy["pair_id"]).notna().sum())
    return row


def _none_fits(config: PreferenceConfig, n: int, model: str) -> PerpairError:
    """No pair of ``n`` fits ``max_length`` (under ``model``'s tokenizer): an accuracy of nothing is no result."""
    return PerpairError(f"no pair fits --max-length {config.max_length}: the prompt alone fills it in each of the {n} "
                        f"pair(s) of {config.data} evaluated ({model}'s tokenizer); raise --max-length (training's "
                        "max_length) or evaluate other pairs")


def markdown_table(row: dict[str, Any]) -> str:
    """Overall and per-category figures of one results row."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if not isinstance(value, float):
            return str(value)
        # a margin of a model close to its reference (3.4e-05) read "0.0000", and its s.e. too: as none
        return f"{value:.3g}" if value and abs(value) < 5e-5 else f"{value:.4f}"

    header = ("group", "n", "accuracy", "strict", "ties", "mean margin", "s.e.", "LN accuracy", "LN mean margin")
    lines = [f"Preference accuracy of {row['name']} against {row['ref']} (β = {row['beta']}; ties count half in "
             "accuracy, as wrong in strict; LN = reference-free length-normalised log-prob margin)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = [("all", row["implicit_reward"], row["length_normalised"])]
    for category, summary in row.get("implicit_reward_by_category", {}).items():
        groups.append((category, summary, row["length_normalised_by_category"][category]))
    for label, s, ln in groups:
        lines.append("| " + " | ".join([label, cell(s["n"]), cell(s["accuracy"]), cell(s["accuracy_strict"]),
                                        cell(s["n_ties"]), cell(s["mean_margin"]), cell(s["margin_se"]),
                                        cell(ln["accuracy"]), cell(ln["mean_margin"])]) + " |")
    return "\n".join(lines) + "\n"


def write_results(row: dict[str, Any], output: Path) -> dict[str, Path]:
    """``results.json`` (a one-row list, readable by ``perpair eval report``) and ``results.md``; ``output`` is a
    folder, or a ``.json`` file whose Markdown goes beside it."""
    from perpair.eval.score import json_ready
    from perpair.eval.sources import write_json_records

    path = output if output.suffix == ".json" else output / "results.json"
    write_json_records(path, [json_ready(row)])
    markdown = path.with_suffix(".md")
    markdown.write_text(markdown_table(row), encoding="utf-8")
    return {"json": path, "markdown": markdown}
