"""GGUF checkpoints (llama.cpp's format) as Hugging Face model directories, converted once and cached.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``) by dequantising every tensor to float, which
takes seconds to minutes and happens on every load. lce converts a file once into a safetensors checkpoint with its
tokenizer (chat template included) under ``<cache>/gguf/<file stem>-<content hash>/`` and loads that directory from
then on, as any other local model. The hash is of the file's bytes, so a changed file converts again and a copy
under the same name (in another directory) does not. Conversion writes into a private temporary directory and renames
it into place: concurrent loads of the same file never see a half-written checkpoint and never fail because another
process won. A file transformers cannot read every weight of is refused, never cached half random.

The cache is ``$LCE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lce`` (``~/.cache/lce``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from lce.errors import LceError
from lce.paths import unwritable_reason

SUFFIX = ".gguf"
SOURCE_FILE = "lce_gguf.json"  # written into a converted directory: where it came from


def cache_root() -> Path:
    """The directory lce keeps converted checkpoints under."""
    if os.environ.get("LCE_CACHE_DIR"):
        return Path(os.environ["LCE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lce"


def gguf_file(path: Path, where: str) -> Path | None:
    """The GGUF file ``path`` names: itself if it is a ``.gguf`` file, the single ``.gguf`` file of a directory
    without ``config.json``, else None (not a GGUF checkpoint)."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) > 1:
        raise LceError(f"{where}: {path.absolute()} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}"
                       "); set model.path to one of them")
    return files[0] if files else None


def require_gguf_package(where: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LceError(f"{where}: reading a GGUF file needs the 'gguf' package: pip install 'lce[real]' "
                       "(or pip install gguf)")


def content_hash(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def architecture(file: Path) -> str:
    """``general.architecture`` of a GGUF file (llama.cpp's name, e.g. ``llama``)."""
    from gguf import GGUFReader

    field = GGUFReader(str(file)).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else "<none>"


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", "tokenizer_config"})  # metadata groups


def converted_checkpoint(file: Path, where: str) -> Path:
    """The cached Hugging Face directory (safetensors weights, config, tokenizer) for the GGUF ``file``, converting
    it first if no complete conversion of the same bytes exists.

    Raises:
        LceError: the ``gguf`` package is missing, the architecture is one transformers cannot read, or the file is
            not a valid GGUF file, or transformers cannot read every weight the model needs from it.
    """
    require_gguf_package(where)

    def unreadable(e: Exception) -> LceError:
        return LceError(f"{where}: {file} is not a readable GGUF file ({str(e).splitlines()[0] or type(e).__name__})")

    try:
        digest = content_hash(file)
    except OSError as e:
        raise unreadable(e) from None
    target = cache_root() / "gguf" / f"{file.stem}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():  # before parsing the metadata, which takes seconds for a real vocabulary
        return target
    try:
        arch = architecture(file)
    except (ValueError, OSError, AssertionError, IndexError) as e:  # gguf's reader asserts on a wrong magic
        raise unreadable(e) from None  # number (older releases), indexes past the end of a file cut short
    reason = unwritable_reason(target.parent)
    if reason is not None:
        raise LceError(f"{where}: cannot convert {file.name} into the cache: {reason} (set LCE_CACHE_DIR to a "
                       "writable directory)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _convert(file, arch, staging, where)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"source": str(file.absolute()), "sha256": digest, "architecture": arch}, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first: its result is identical
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(file: Path, arch: str, directory: Path, where: str) -> None:
    """Dequantise ``file`` through transformers into float32 safetensors (the values the quantised weights stand
    for, exactly; float32 holds every dequantised value) and save its tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": file.name, "local_files_only": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(file.parent), dtype=torch.float32,
                                                           output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # RuntimeError: a tensor shape the metadata contradicts
        if "not supported" in str(e):  # transformers' check, after its own renames (llama.cpp's qwen2moe, ...)
            raise LceError(f"{where}: GGUF architecture {arch!r} of {file.name} is not one transformers can read; "
                           f"supported: {', '.join(supported_architectures())}") from None
        raise LceError(f"{where}: transformers could not convert {file.name} ({str(e).splitlines()[0]})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers initialises them randomly and only logs it: never cache such a model
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LceError(f"{where}: {file.name} lacks {len(missing)} weight(s) a {arch!r} model needs "
                       f"({', '.join(missing[:3])}{more}); the file is incomplete or not as llama.cpp writes it")
    # transformers marks a model read from GGUF as quantised (its GGUF quantiser) and refuses to save it; the weights
    # are plain floats by now, so a model built from the same config without the marker takes them and saves.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        plain.load_state_dict(model.state_dict())
    except RuntimeError as e:  # transformers < 5.25 keeps a tensor whose shape contradicts the metadata
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise LceError(f"{where}: transformers could not convert {file.name} ({detail})") from None
    plain.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))

