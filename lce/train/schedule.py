"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (as in nanoGPT's ``get_lr``).

The rate is a pure function of the step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math

from lce.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step``.

    The training loop passes the 1-based number of the step it is about to take, so step 1 already learns
    (``lr / warmup_steps``) and step ``cfg.steps`` uses exactly the floor ``lr * min_lr_ratio``.

    Args:
        step: step number; 0 ... ``warmup_steps`` ramps linearly from 0 to ``lr``, then a half cosine falls to
            ``lr * min_lr_ratio`` at ``cfg.steps`` and stays there.
        cfg: supplies ``lr``, ``min_lr_ratio``, ``warmup_steps`` and ``steps``.

    Returns:
        The learning rate. A warm-up longer than the run never reaches ``lr``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    if decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
