"""Checks made before training starts, so a bad setting is a one-line error rather than a wasted or wrong run.

- The training length must be one the model's position encoding supports: ``factor x original length`` for the
  static frequency-scaling rope types (PI = ``linear``, ``yarn``, ``llama3``, ``longrope``: their frequencies are
  designed for exactly that range), a method's own ``max_length`` (Self-Extend: ``(L - W) * G + W``). Dynamic
  methods and plain RoPE have no bound. With PoSE the positions reach ``pose_target_len``, which is checked instead.
- PoSE and document packing give position ids that are not ``0 ... T - 1``: every position encoding follows them
  (lce's attention function places a call's keys at its queries' positions, ``lce.core.plan.key_positions``).
- ``train.resume_from`` must exist and hold a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lce.errors import ConfigError
from lce.train.checkpoint import latest_checkpoint
from lce.train.config import TrainConfig

#: transformers rope types whose scaled frequencies cover ``factor x original_max_position_embeddings`` positions.
STATIC_SCALED_ROPE_TYPES = ("linear", "yarn", "llama3", "longrope")


def supported_length(model: nn.Module) -> tuple[int | None, str]:
    """The longest sequence the model's position encoding is configured for, and where that bound comes from
    (``None``: no bound)."""
    from lce.hf.patch import patch_spec
    from lce.posenc import POSENCS
    from lce.posenc.logn import original_length

    spec = patch_spec(model)
    original = original_length(model.config)
    if spec is not None:
        posenc = POSENCS.build(spec["posenc"])
        bound = posenc.max_length(original)
        if bound is not None:
            return bound, f"posenc={posenc.name} ({posenc!r})"
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type") in STATIC_SCALED_ROPE_TYPES and rope.get("factor"):
        factor = float(rope["factor"])
        return int(factor * original), f"rope_type={rope['rope_type']} (factor {factor:g} x original length {original})"
    return None, "no bound"


def check_positions(model: nn.Module, cfg: TrainConfig) -> None:
    """Raise ConfigError when the positions training will use are beyond the model's position encoding."""
    bound, source = supported_length(model)
    key, length = ("pose_target_len", cfg.pose_target_len) if cfg.pose_target_len else ("seq_len", cfg.seq_len)
    if bound is not None and length > bound:
        raise ConfigError(
            f"train.{key}: {length} is above the {bound} positions the position encoding supports, {source}; "
            f"raise the scaling factor (or the method's window) or lower train.{key}"
        )


def resolve_resume(out_dir: str | Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume: the newest under ``out_dir`` (the run's own, always preferred once it exists),
    else ``resume_from`` (a checkpoint directory, or a run directory for its newest), else None.

    Raises:
        ConfigError: ``resume_from`` does not exist or holds no checkpoint.
    """
    if resume_from is not None:
        path = Path(resume_from).expanduser()
        if not path.exists():
            raise ConfigError(f"train.resume_from: {path} does not exist; give a checkpoint directory "
                              "(.../checkpoints/step_00000200) or a run directory holding checkpoints/")
        found = path if (path / "state.json").is_file() else latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"train.resume_from: {path} holds no checkpoint (neither state.json nor "
                              "checkpoints/step_*/state.json)")
    own = latest_checkpoint(out_dir)
    if own is not None:
        return own
    return found if resume_from is not None else None
