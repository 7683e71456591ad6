"""Training hyperparameters: one typed config, validated on construction.

Defaults suit a tiny byte-level model trained on two CPU cores in minutes; ``conf/train/default.yaml`` repeats them
with comments and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lce.config import check, check_at_least

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]

# Fields that may change between a checkpoint and its resumption: they decide how long to run and what to record,
# never what the model computes. Every other field is part of the loss trajectory (``seed`` is compared as the
# effective run seed and ``grad_accum`` as the global batch, grad_accum x processes, see ``lce.train.loop``).
RESUMABLE_CHANGES = frozenset(
    {"name", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "val_every", "val_batches", "resume_from",
     "grad_accum", "max_nonfinite_steps"}
)


@dataclass
class TrainConfig:
    """How to train a causal LM at a short context.

    Attributes:
        name: option name in ``conf/train/``.
        steps: optimizer steps in the whole run (a resumed run continues up to this many).
        seq_len: training context in tokens; each block holds ``seq_len + 1`` tokens.
        micro_batch_size: blocks per forward/backward pass on each process.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate, reached at the end of warm-up.
        schedule: after warm-up, ``cosine`` (half cosine) or ``linear`` decay to ``lr * min_lr_ratio`` at the last
            step, or ``constant`` at ``lr``.
        min_lr_ratio: floor of the decay as a fraction of ``lr``.
        warmup_steps: steps of linear warm-up from 0 to ``lr``.
        weight_decay: AdamW decoupled weight decay, applied to weights with >= 2 dimensions only.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        grad_clip: maximum global gradient norm; ``<= 0`` disables clipping (the norm is still logged).
        max_nonfinite_steps: stop training (``lce.train.nonfinite.NonFiniteLossError``) when the loss or gradient
            norm is NaN or infinite for this many optimizer steps in a row; each such step is skipped (no update,
            no checkpoint), so 1 stops at the first and a larger value rides out isolated spikes.
        mixed_precision: ``auto`` is bf16 on a CUDA device that supports it and ``no`` elsewhere.
        gradient_checkpointing: recompute decoder layers in the backward pass to save activation memory.
        checkpoint_every: save a checkpoint every this many steps (and always at the end).
        keep_checkpoints: how many of the most recent checkpoints to keep.
        log_every: report to the logger and the progress bar every this many steps (the JSONL log gets every step).
        val_every: validation loss every this many steps; 0 disables.
        val_batches: at most this many micro-batches of validation blocks per validation.
        loss_chunk_size: rows of logits alive at once in the chunked loss.
        seed: data order and RNG seed; None uses the run seed.
        lora_rank: LoRA rank ``r``; 0 trains every weight (full fine-tuning).
        lora_alpha: LoRA scale numerator: adapters add ``(lora_alpha / lora_rank) * B @ A``.
        lora_dropout: dropout on the adapters' input.
        lora_targets: short names of the linear layers that get adapters.
        trainable: with LoRA, parameters whose names contain one of these are trained in full too (LongLoRA's
            LoRA+: ``[embed, norm]``).
        pack_documents: blocks hold several documents (the stream's ``eos`` ends each); every token attends only
            within its own document, with positions from 0 at each document start, through an explicit mask.
        pose_target_len: PoSE (arXiv:2309.10400): position ids of each ``seq_len`` window skip ahead so that they
            cover ``0 ... pose_target_len - 1``; 0 disables.
        pose_source_factor: PoSE draws its two chunks from a window of ``pose_source_factor * (seq_len + 1)`` tokens.
        resume_from: a checkpoint directory (or a run directory, for its newest checkpoint) to start from; it must
            exist. None resumes the newest checkpoint under the run directory, if any.
    """

    name: str = "default"
    steps: int = 200
    seq_len: int = 128
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 3
    mixed_precision: MixedPrecision = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    val_every: int = 50
    val_batches: int = 4
    loss_chunk_size: int = 4096
    seed: int | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trainable: list[str] = field(default_factory=list)
    pack_documents: bool = False
    pose_target_len: int = 0
    pose_source_factor: int = 5
    resume_from: str | None = None

    def __post_init__(self) -> None:
        w = "train"
        check_at_least(self, w, 1, "steps", "seq_len", "micro_batch_size", "grad_accum", "checkpoint_every",
                       "keep_checkpoints", "log_every", "val_batches", "loss_chunk_size", "max_nonfinite_steps")
        check_at_least(self, w, 0, "warmup_steps", "val_every", "weight_decay")
        check(self.lr > 0, f"{w}.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"{w}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.eps > 0, f"{w}.eps", f"must be > 0, got {self.eps}")
        check(len(self.betas) == 2, f"{w}.betas", f"must be two values [beta1, beta2], got {self.betas}")
        check(all(0 <= b < 1 for b in self.betas), f"{w}.betas", f"each must be in [0, 1), got {self.betas}")
        allowed = ("auto", "no", "bf16", "fp16")
        check(self.mixed_precision in allowed, f"{w}.mixed_precision",
              f"{self.mixed_precision!r} is not one of {', '.join(allowed)}")
        schedules = ("cosine", "linear", "constant")
        check(self.schedule in schedules, f"{w}.schedule", f"{self.schedule!r} is not one of {', '.join(schedules)}")
        check_at_least(self, w, 0, "lora_rank", "pose_target_len")
        check_at_least(self, w, 1, "pose_source_factor")
        check(self.lora_alpha > 0, f"{w}.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"{w}.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        check(self.lora_rank == 0 or len(self.lora_targets) > 0, f"{w}.lora_targets",
              "must name at least one linear layer when lora_rank > 0")
        check(self.lora_rank > 0 or not self.trainable, f"{w}.trainable",
              f"{self.trainable} selects parameters to train besides LoRA adapters, but lora_rank is 0 (every "
              "weight is trained already); set lora_rank > 0 or trainable=[]")
        check(self.pose_target_len == 0 or self.pose_target_len > self.seq_len, f"{w}.pose_target_len",
              f"{self.pose_target_len} must exceed seq_len={self.seq_len} (PoSE stretches a seq_len window over "
              "the target length), or be 0 to disable PoSE")
        check(not (self.pose_target_len and self.pack_documents), f"{w}.pack_documents",
              "cannot be combined with PoSE (pose_target_len > 0): PoSE positions span one document")
