"""Benchmarks that test the seeds' claims end to end (on top of the stages; nothing imports this package).

Entry point::

    result = run_controlled(ControlledConfig(seeds=3), "bench_controlled/")
"""

from perpair.bench.controlled import ControlledConfig, run_controlled

__all__ = ["ControlledConfig", "run_controlled"]
