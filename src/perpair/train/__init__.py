"""The train stage: per-pair DPO / SFT (SP²DPO's β_i, MixDPO's routes and order) at plain-DPO cost.

Entry points::

    from perpair.train import load_config, train
    result = train(load_config("train.yaml", {"steps": 100}))
    print(result.summary["pairs_per_second"])

    # summed completion log-probs + token counts of every pair, for other stages (evaluation, planning)
    from perpair.train import sequence_logps
    table = sequence_logps(model, tokenizer, pairs_table, max_length=1024)

Modules: :mod:`~perpair.train.losses` (pure per-pair losses, registered by name),
:mod:`~perpair.train.tokenize` (TRL-compatible tokenization), :mod:`~perpair.train.logprobs` (packed,
completion-only, chunked log-probs), :mod:`~perpair.train.reference` (on-disk reference cache),
:mod:`~perpair.train.config` (the validated config), :mod:`~perpair.train.loop` (the loop and its step),
:mod:`~perpair.train.setup` (accelerator, model, reference pass, optimizer), :mod:`~perpair.train.batches`
(per-pair inputs, the pairs of every step, packing), :mod:`~perpair.train.checkpoints` (checkpoints, saved model).
"""

from perpair.train.config import LoraConfig, TrainConfig, load_config, parse_overrides
from perpair.train.logprobs import sequence_logps
from perpair.train.loop import NonFiniteLoss, TrainResult, reference_pass, train
from perpair.train.losses import LOSSES, Logps, LossParams, PairLosses, routed_losses

__all__ = [
    "LOSSES", "LoraConfig", "LossParams", "Logps", "NonFiniteLoss", "PairLosses", "TrainConfig",
    "TrainResult", "load_config", "parse_overrides", "reference_pass", "routed_losses", "sequence_logps",
    "train",
]
