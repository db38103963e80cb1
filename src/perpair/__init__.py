"""perpair: per-pair preference optimization of language models.

The pipeline is one subpackage per stage, each reading the previous stage's artifact:
``data`` (prepare) -> ``annotate`` -> ``plan`` -> ``train`` -> ``eval``.
"""

__version__ = "0.1.0"
