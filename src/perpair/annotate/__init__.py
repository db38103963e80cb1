"""The annotate stage: a semantic-gap annotation per preference pair (SP²DPO, He et al., 2026).

For now this package holds only the annotations artifact's schema and its validating reader
(:mod:`perpair.annotate.schema`), which the plan stage consumes.
"""
