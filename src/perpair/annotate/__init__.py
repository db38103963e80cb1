"""The annotate stage: a semantic-gap annotation per preference pair (SP²DPO, He et al., 2026).

Entry points: :func:`annotate` (one resumable run: pairs file + teachers -> annotations artifact and its
per-call table) and :func:`merge` (joins ``--shard`` outputs). The aggregated artifact's schema and its
validating reader, which the plan stage consumes, are in :mod:`perpair.annotate.schema`.
"""

from perpair.annotate.config import (
    AnnotateConfig,
    ApiTeacherConfig,
    LocalTeacherConfig,
    RatingsTeacherConfig,
    load_config,
    parse_teacher_spec,
)
from perpair.annotate.runner import AnnotateResult, MergeResult, Progress, annotate, calls_path, merge
from perpair.annotate.schema import CATEGORIES, read_annotations

__all__ = [
    "CATEGORIES",
    "AnnotateConfig",
    "AnnotateResult",
    "ApiTeacherConfig",
    "LocalTeacherConfig",
    "MergeResult",
    "Progress",
    "RatingsTeacherConfig",
    "annotate",
    "calls_path",
    "load_config",
    "merge",
    "parse_teacher_spec",
    "read_annotations",
]
