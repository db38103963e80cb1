"""A human-readable derivation of one pair's β, route and order.

Every number is printed with full precision (Python's shortest round-trip repr), so a reader can redo
the arithmetic by hand — or a test can parse it — and get the planned β exactly.
"""

from __future__ import annotations

import numpy as np

from perpair.plan.build import PlanResult
from perpair.plan.report import mislabeled_action


def _f(value: float) -> str:
    return repr(float(value))


def explain(result: PlanResult, pair_id: str) -> str:
    """How ``pair_id``'s β, route and order were derived: every input and the arithmetic."""
    row = result.row_of(pair_id)
    table = result.table
    schedule = result.schedule
    provenance = result.provenance
    n = table.num_rows
    lines = [
        f"pair {pair_id}: row {row + 1} of {n} in the pairs file",
        f"schedule: preset {provenance.get('preset') or '(none)'}, "
        f"sha256 {provenance['schedule_sha256'][:16]}",
        "",
        _annotation_line(result, row),
    ]
    if result.trace.mislabeled_acted[row]:
        lines.append(f"  mislabeled with confidence {_f(table['confidence'][row].as_py())} > threshold "
                     f"{_f(schedule.mislabeled.threshold)}: {mislabeled_action(provenance['counts'])}")
    lines += ["", *_beta_lines(result, row), "", *_difficulty_lines(result, row), "",
              *_route_lines(result, row), "", *_order_lines(result, row)]
    return "\n".join(lines) + "\n"


def _annotation_line(result: PlanResult, row: int) -> str:
    category = result.table["category"][row].as_py()
    if category is None:
        return "annotation: none (unannotated pair)"
    return (f"annotation: category = {category}, magnitude = {_f(result.table['magnitude'][row].as_py())}, "
            f"confidence = {_f(result.table['confidence'][row].as_py())}")


def _beta_lines(result: PlanResult, row: int) -> list[str]:
    table, cfg, trace = result.table, result.schedule.beta, result.trace
    route = table["route"][row].as_py()
    if route == "drop":
        return ["β: none (the pair is dropped)"]
    beta = table["beta"][row].as_py()
    if cfg.kind == "global":
        return [f"β = β_global = {_f(beta)}  [beta.kind global: one β for every pair]"]
    if table["category"][row].as_py() is None:
        return [f"β = β_global = {_f(beta)}  [no annotation: unannotated pairs get the global β]"]
    lines = [f"β  [beta.kind {cfg.kind}: SP²DPO's per-pair β; the mapping below is ours]"]
    source = row
    if trace.donor[row] >= 0:
        source = int(trace.donor[row])
        lines += [
            f"  random control: this pair receives the β derived for pair {trace.pair_ids[source]} "
            f"(a permutation seeded with {result.schedule.seed} of the {trace.normalised_pairs} "
            "preference-routed annotated pairs sorted by pair_id); that pair's derivation:",
            "  " + _annotation_line(result, source),
        ]
    lines += _signal_lines(result, source)
    raw = trace.raw_beta[source]
    if trace.factor is None:
        why = "beta.normalise off" if not cfg.normalise else "no preference-routed annotated pair"
        lines.append(f"  β = β_raw = {_f(raw)}  [{why}]")
    else:
        lines += [
            f"  c = β_global / geomean(β_raw over the {trace.normalised_pairs} preference-routed annotated "
            f"pairs) = {_f(cfg.beta)} / {_f(trace.geometric_mean_raw)} = {_f(trace.factor)}",
            f"  β = c × β_raw = {_f(trace.factor)} × {_f(raw)} = {_f(trace.factor * raw)}",
        ]
    if route != "preference":
        lines.append(f"  (β is not used on the {route} route)")
    return lines


def _signal_lines(result: PlanResult, row: int) -> list[str]:
    table, cfg, trace = result.table, result.schedule.beta, result.trace
    signal = table["signal"][row].as_py()
    lines = []
    if trace.mislabeled_acted[row] and result.schedule.mislabeled.action == "beta_max":
        lines.append(f"  s = 0.0  [mislabeled above threshold, action beta_max: signal {_f(signal)} forced]")
    else:
        category = table["category"][row].as_py()
        magnitude = table["magnitude"][row].as_py()
        g = cfg.magnitude_gain
        low = min(int(np.floor(magnitude)), len(g) - 2)
        t = magnitude - low
        if t == 0 or t == 1:
            index = low + int(t)
            gain_text = f"g({_f(magnitude)}) = table[{index}] = {_f(g[index])}"
        else:
            gain_text = (f"g({_f(magnitude)}) = g({low}) + {_f(t)} × (g({low + 1}) − g({low})) = "
                         f"{_f(g[low])} + {_f(t)} × ({_f(g[low + 1])} − {_f(g[low])}) = "
                         f"{_f(trace.gain[row])}")
        lines += [
            f"  prior({category}) = {_f(trace.prior[row])}",
            f"  {gain_text}   [g table at magnitudes 0, 1, 2, 3: {', '.join(_f(v) for v in g)}]",
            f"  s = prior · g · confidence = {_f(trace.prior[row])} × {_f(trace.gain[row])} × "
            f"{_f(table['confidence'][row].as_py())} = {_f(signal)}",
        ]
    lines.append(f"  β_raw = β_max^(1 − s) × β_min^s = {_f(cfg.beta_max)}^(1 − {_f(signal)}) × "
                 f"{_f(cfg.beta_min)}^{_f(signal)} = {_f(trace.raw_beta[row])}")
    return lines


def _difficulty_lines(result: PlanResult, row: int) -> list[str]:
    table, trace = result.table, result.trace
    source = result.schedule.margin.source
    value = table["difficulty"][row].as_py()
    if source == "none":
        return ["difficulty: none  [margin.source none]"]
    if source == "ratings":
        chosen, rejected = trace.score_chosen[row], trace.score_rejected[row]
        formula = f"score_chosen − score_rejected = {_f(chosen)} − {_f(rejected)}"
        raw, note = chosen - rejected, "margin.source ratings, MixDPO"
    elif source == "teacher":
        magnitude, confidence = (np.nan if v is None else v for v in (
            table["magnitude"][row].as_py(), table["confidence"][row].as_py()))
        sign = "−" if table["category"][row].as_py() == "mislabeled" else ""
        formula = f"{sign}magnitude × confidence = {sign}{_f(magnitude)} × {_f(confidence)}"
        raw = (-1.0 if sign else 1.0) * magnitude * confidence
        note = "margin.source teacher, negative for mislabeled; ours"
        if table["category"][row].as_py() == "no_clear_gap":
            formula, raw = f"0 (no_clear_gap: a tie has no margin; magnitude {_f(magnitude)})", 0.0
            note = "margin.source teacher, 0 for no_clear_gap; ours"
    else:
        ref = trace.reference or {}
        names = ("chosen_logps", "chosen_tokens", "rejected_logps", "rejected_tokens")
        lp_c, n_c, lp_r, n_r = (ref[k][row] if k in ref else np.nan for k in names)
        formula = (f"logp_chosen / tokens_chosen − logp_rejected / tokens_rejected = "
                   f"{_f(lp_c)} / {_f(n_c)} − {_f(lp_r)} / {_f(n_r)}")
        raw, note = lp_c / n_c - lp_r / n_r, "margin.source reference; ours"
    if value is None:
        return [f"difficulty: none ({formula}: not available)  [{note}]"]
    lines = [f"difficulty = {formula} = {_f(raw)}  [{note}]"]
    if table["flipped"][row].as_py():
        lines.append(f"  negated because chosen and rejected are flipped: difficulty = {_f(value)}")
    return lines


def _route_lines(result: PlanResult, row: int) -> list[str]:
    table, trace, routing = result.table, result.trace, result.schedule.routing
    route = table["route"][row].as_py()
    value = table["difficulty"][row].as_py()
    eps = table["label_smoothing"][row].as_py()
    reasons = []
    if trace.below_tau[row]:
        reasons.append(f"difficulty {_f(value)} < τ = {_f(routing.tau)}")
    if trace.lowest_quantile[row]:
        reasons.append(f"in the lowest q = {_f(routing.quantile)} fraction by difficulty")
    if route == "drop" and trace.mislabeled_acted[row]:
        reasons = ["mislabeled above threshold, action drop"]
    elif route == "drop":  # routed: which rule did it, as for the sft route
        reasons.append("routing.action drop")
    elif not reasons:
        if routing.tau is None and routing.quantile is None:
            reasons.append("routing off")
        elif value is None:
            reasons.append("no difficulty: kept on the preference route")
        else:
            if routing.tau is not None:
                reasons.append(f"difficulty {_f(value)} ≥ τ = {_f(routing.tau)}")
            if routing.quantile is not None:
                reasons.append(f"not in the lowest q = {_f(routing.quantile)} fraction")
    reason = "; ".join(reasons)
    lines = [f"route = {route}: {reason}"]
    if route == "preference":
        lines.append(f"  label_smoothing = ε = {_f(eps)}  [cDPO on preference-routed pairs; MixDPO uses 0.1]")
    else:
        lines.append(f"  label_smoothing = {_f(eps)}  [only preference-routed pairs are smoothed]")
    return lines


def _order_lines(result: PlanResult, row: int) -> list[str]:
    table, trace, cur = result.table, result.trace, result.schedule.curriculum
    order = table["order"][row].as_py()
    if order is None:
        return ["order: none (the pair is dropped)"]
    head = f"order = {order} (0-based) of {trace.trained} trained pairs"
    kind = cur.kind
    if kind == "none":
        return [f"{head}  [curriculum none: file order among trained pairs]"]
    if kind == "random":
        return [f"{head}  [curriculum random: a permutation seeded with {result.schedule.seed} of the "
                "trained pairs sorted by pair_id]"]
    if kind == "bucketed":
        bucket = int(trace.bucket[row])
        if bucket < 0:
            return [f"{head}  [curriculum bucketed: no difficulty, after every bucket, by pair_id]"]
        margins = np.array(table["difficulty"].to_numpy(zero_copy_only=False), dtype=np.float64)
        inside = margins[trace.bucket == bucket]
        return [f"{head}  [curriculum bucketed: bucket {bucket + 1} of {cur.buckets} (difficulty "
                f"{_f(inside.max())} down to {_f(inside.min())}), buckets run easy→hard, shuffled inside "
                f"with seed {result.schedule.seed}]"]
    value = table["difficulty"][row].as_py()
    direction = "large to small" if kind == "easy_to_hard" else "small to large"
    if value is None:
        return [f"{head}  [curriculum {kind}: no difficulty, after every pair with one, by pair_id]"]
    margins = np.array(table["difficulty"].to_numpy(zero_copy_only=False), dtype=np.float64)
    trained = ~np.array(table["order"].is_null().to_numpy(zero_copy_only=False))
    ahead = (margins > value) if kind == "easy_to_hard" else (margins < value)
    before = int(np.sum(trained & ahead))
    ties = int(np.sum(trained & (margins == value) & (trace.pair_ids < trace.pair_ids[row])))
    return [f"{head}  [curriculum {kind}: sorted by difficulty from {direction}, ties by pair_id: "
            f"{before} pairs have a {'larger' if kind == 'easy_to_hard' else 'smaller'} difficulty and "
            f"{ties} share {_f(value)} with a smaller pair_id; {before} + {ties} = {before + ties}]"]
