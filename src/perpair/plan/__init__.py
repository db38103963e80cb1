"""The plan stage: per pair a β (SP²DPO), a route and a curriculum position (MixDPO), offline.

Entry points::

    schedule = resolve_schedule("mixdpo", config_path=None, beta=None)
    result = build_plan("pairs.parquet", "annotations.parquet", schedule, preset="mixdpo")
    write_plan(result, "plan.parquet")
    write_report(result.table, result.provenance, report_dir("plan.parquet"))
    print(explain(result, pair_id))
    table, provenance = load_plan("plan.parquet", "pairs.parquet")  # refuses a mismatched pairs file

The maths lives in small pure modules: :mod:`~perpair.plan.beta`, :mod:`~perpair.plan.difficulty`,
:mod:`~perpair.plan.curriculum`; the schedule and its presets in :mod:`~perpair.plan.config`.
"""

from perpair.plan.build import (
    ARROW_SCHEMA,
    KIND,
    SCHEMA_VERSION,
    PlanResult,
    build_plan,
    idle_global_beta,
    load_plan,
    write_plan,
)
from perpair.plan.config import PRESETS, Schedule, resolve_schedule
from perpair.plan.explain import explain
from perpair.plan.report import remove_report, report_dir, write_report

__all__ = [
    "ARROW_SCHEMA",
    "KIND",
    "PRESETS",
    "SCHEMA_VERSION",
    "PlanResult",
    "Schedule",
    "build_plan",
    "idle_global_beta",
    "explain",
    "load_plan",
    "remove_report",
    "report_dir",
    "resolve_schedule",
    "write_plan",
    "write_report",
]
