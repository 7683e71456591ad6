"""Learning-rate schedules: linear warm-up, then cosine (nanoGPT's ``get_lr``) or linear decay to a floor, or constant.

The rate is a pure function of the step, so a resumed run needs no scheduler state to continue exactly. The recipes
use all three: cosine for pre-training, linear to 0 for YaRN (``get_linear_schedule_with_warmup`` in its
``finetune.py``), constant after warm-up for PI and LongLoRA.
"""

from __future__ import annotations

import math

from lce.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step``.

    The training loop passes the 1-based number of the step it is about to take, so step 1 already learns
    (``lr / warmup_steps``) and, for the decaying schedules, step ``cfg.steps`` uses exactly the floor
    ``lr * min_lr_ratio``.

    Args:
        step: step number; 0 ... ``warmup_steps`` ramps linearly from 0 to ``lr``; then ``cfg.schedule`` decides:
            ``cosine`` is a half cosine and ``linear`` a straight line from ``lr`` to ``lr * min_lr_ratio`` at
            ``cfg.steps`` (staying there after), ``constant`` stays at ``lr``.
        cfg: supplies ``lr``, ``schedule``, ``min_lr_ratio``, ``warmup_steps`` and ``steps``.

    Returns:
        The learning rate. A warm-up longer than the run never reaches ``lr``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    if cfg.schedule == "constant" or decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return floor + (cfg.lr - floor) * shape
