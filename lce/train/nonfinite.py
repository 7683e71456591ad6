"""Non-finite training steps: skipped, logged as such, never checkpointed, and fatal after a few in a row.

A step whose loss or global gradient norm is NaN or infinite does not update the weights (``lce.train.loop`` skips
the optimizer step and clears the gradients; DeepSpeed ZeRO-3 skips a step whose gradient norm is not finite
itself). A broken model (a bad config, weights gone to inf) produces one such step after another; after
``train.max_nonfinite_steps`` in a row training stops with ``NonFiniteLossError`` naming the step, the values and
the last good checkpoint, instead of running on and checkpointing garbage. An isolated spike is skipped and training
goes on.

Under ``mixed_precision=fp16`` the GradScaler skips steps whose scaled gradients overflow and lowers its scale; such a
step (finite loss, infinite gradient norm) is logged as non-finite but is the scaler's business: it is not counted,
and may be checkpointed (its weights and scale are a consistent state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lce.errors import LceError

FLAG = "nonfinite"  # true in the JSONL record of a step with a non-finite value; those values are null


class NonFiniteLossError(LceError):
    """Training stopped: the loss or gradient norm was not finite for ``train.max_nonfinite_steps`` steps in a row."""


def is_healthy(loss: float, grad_norm: float, loss_scaling: bool) -> bool:
    """Whether a step with this global ``loss`` and gradient norm may update the weights and be checkpointed: both
    finite, or with fp16's GradScaler (``loss_scaling``) a finite loss (the scaler skips overflowing gradients)."""
    return math.isfinite(loss) and (math.isfinite(grad_norm) or loss_scaling)


class NonFiniteGuard:
    """Counts non-finite steps in a row and says when training must stop.

    Args:
        limit: ``train.max_nonfinite_steps``.
        last_checkpoint: the checkpoint this run resumed from, or None; ``saved`` updates it.
        loss_scaling: fp16's GradScaler is in use (its overflow steps are not counted).
    """

    def __init__(self, limit: int, last_checkpoint: Path | None, loss_scaling: bool):
        self.limit = limit
        self.last_checkpoint = last_checkpoint
        self.loss_scaling = loss_scaling
        self.streak = 0

    def update(self, step: int, loss: float, grad_norm: float, applied: bool) -> NonFiniteLossError | None:
        """Record step ``step``; returns the error to stop with, or None to go on.

        Args:
            applied: whether the step's update reached the weights. Only DeepSpeed applies a step with a non-finite
                loss (when its gradients were finite anyway); training then stops at once, the weights being suspect.
        """
        if is_healthy(loss, grad_norm, self.loss_scaling):
            self.streak = 0
            return None
        self.streak += 1
        if applied:
            return self.error(step, loss, grad_norm, "DeepSpeed applied its update (its gradient norm was finite), "
                              "so the weights are suspect")
        if self.streak >= self.limit:
            return self.error(step, loss, grad_norm, "the weights are those of the last finite step")
        return None

    def saved(self, path: Path) -> None:
        """A checkpoint of a healthy step was written to ``path``."""
        self.last_checkpoint = path

    def finish(self, step: int, loss: float, grad_norm: float) -> NonFiniteLossError | None:
        """The run ended at ``step``; returns the error to stop with if it ended on non-finite steps (they have no
        checkpoint, and the run's final state would be that of an earlier step), else None."""
        if not self.streak:
            return None
        return self.error(step, loss, grad_norm, "the run ended on them, so its last steps have no checkpoint; the "
                          "weights are those of the last finite step")

    def error(self, step: int, loss: float, grad_norm: float, outcome: str) -> NonFiniteLossError:
        """The one-line error for the non-finite step ``step``; ``outcome`` says what the weights are."""
        checkpoint = (f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint is not None
                      else "no checkpoint was saved before it")
        return NonFiniteLossError(
            f"train: step {step}: loss {loss}, grad_norm {grad_norm}: not finite for {self.streak} step(s) in a row "
            f"(train.max_nonfinite_steps={self.limit}); {outcome}; {checkpoint}"
        )


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each non-finite float as None and ``nonfinite: true`` when there was one.

    ``json.dumps`` writes NaN and Infinity, which are not JSON; the loss and gradient norm of a non-finite step are
    written as null instead, and the flag marks the step.
    """
    bad = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if not bad:
        return record
    return {**{key: None if key in bad else value for key, value in record.items()}, FLAG: True}
