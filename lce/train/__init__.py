"""Train a causal LM at a short context: config, schedule, resumable data order, safetensors checkpoints, loop."""

from lce.train.checkpoint import latest_checkpoint, load_checkpoint, prune, read_state, save_checkpoint
from lce.train.config import TrainConfig
from lce.train.data import TrainBlocks, blocks_from_stream
from lce.train.loop import TrainResult, train
from lce.train.schedule import lr_at

__all__ = [
    "TrainBlocks",
    "TrainConfig",
    "TrainResult",
    "blocks_from_stream",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "prune",
    "read_state",
    "save_checkpoint",
    "train",
]
