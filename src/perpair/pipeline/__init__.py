"""The whole job, on top of the stages: ``perpair run CONFIG.yaml``.

Entry points::

    config = load_run_config("demo.yaml", overrides={"data": {"limit": 100}})
    result = run(config, from_stage=None)      # skips every stage whose inputs and settings are unchanged
    print(markdown_table(result.rows), result.report)

Nothing in the stages imports this package; it imports every stage.
"""

from perpair.pipeline.config import STAGES, RunConfig, load_run_config
from perpair.pipeline.report import markdown_table
from perpair.pipeline.run import RunResult, run, validate

__all__ = ["STAGES", "RunConfig", "RunResult", "load_run_config", "markdown_table", "run", "validate"]
