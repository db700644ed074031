"""The dual-stream trainer (the project's main job): ``python -m tsparse.train --config
configs/<name>.yaml [--model PATH] [--resume | --resume-from CKPT] [key=value ...]``.

* :mod:`.config` - the YAML config and ``key=value`` overrides, every key checked.
* :mod:`.trainer` - :class:`Trainer`: stage 0 (supervised format warm-up), stage 1
  (localization GRPO), stage 2 (sparse-reasoning GRPO with token selection and fusion).
* :mod:`.optim` - AdamW, optionally on fp32 master weights (bf16 models).
* :mod:`.checkpoint` - checkpoints that resume (model, optimizer, progress, RNG).
* :mod:`.metrics` - per-step JSON Lines, the PNG plot, the summary tables.

The method the trainer runs lives in :mod:`tsparse.dualstream` (rollouts, pruning, rewards,
advantages, log-probs and the decoupled loss).
"""

from .config import STAGES, ConfigError, TrainConfig, load_train_config
from .trainer import Trainer

__all__ = ["STAGES", "ConfigError", "TrainConfig", "Trainer", "load_train_config", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
