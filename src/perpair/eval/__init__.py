"""The evaluation stage: AlpacaEval 2.0 (raw and length-controlled win rate, equal to alpaca_eval 0.6.6),
Arena-Hard-Auto v0.1, held-out preference accuracy, and the results report.

Entry points::

    from perpair.eval import ScoreOptions, score_annotations
    row = score_annotations("annotations.json", ScoreOptions(offline=True, data_dir="../shared/data/alpaca_eval"))

    from perpair.eval import score_judgment_file
    row = score_judgment_file("model_judgment/gpt-4-1106-preview/my-model.jsonl")

Every input (files, Hub downloads) is read by :mod:`~perpair.eval.sources` before a metric runs; the maths are
pure functions in :mod:`~perpair.eval.metrics`, :mod:`~perpair.eval.lc` and :mod:`~perpair.eval.arena_hard`.
"""

from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, default_output_dir, run_alpaca_eval
from perpair.eval.arena_run import ArenaHardConfig, run_arena_hard, score_judgment_file
from perpair.eval.generate import GenerationConfig
from perpair.eval.preference import PreferenceConfig, run_preference, write_results
from perpair.eval.report import write_report
from perpair.eval.score import ScoreOptions, json_ready, score_annotations, score_files

__all__ = [
    "AlpacaEvalConfig", "ArenaHardConfig", "GenerationConfig", "JudgeConfig", "PreferenceConfig", "ScoreOptions",
    "default_output_dir", "json_ready", "run_alpaca_eval", "run_arena_hard", "run_preference", "score_annotations",
    "score_files", "score_judgment_file", "write_report", "write_results",
]
