"""Train a causal LM at a short context or fine-tune it at a longer one: config, schedule, resumable data order
(plain, packed or PoSE), LoRA, training strategies (one process, DDP, FSDP2, ZeRO-3), safetensors checkpoints, the
training device, non-finite steps, loop."""

from lce.train.batch import Batch, block_length, make_batch
from lce.train.checkpoint import (
    full_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    prune,
    read_state,
    save_checkpoint,
)
from lce.train.config import TrainConfig
from lce.train.data import TrainBlocks, blocks_from_stream
from lce.train.device import check_device
from lce.train.loop import TrainResult, train
from lce.train.lora import apply_lora, merge_lora
from lce.train.nonfinite import NonFiniteLossError
from lce.train.schedule import lr_at

__all__ = [
    "Batch",
    "NonFiniteLossError",
    "TrainBlocks",
    "TrainConfig",
    "TrainResult",
    "apply_lora",
    "block_length",
    "blocks_from_stream",
    "check_device",
    "full_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "make_batch",
    "merge_lora",
    "prune",
    "read_state",
    "save_checkpoint",
    "train",
]
