"""Text sources (the ``data`` config group): the Python standard library, local text files, Hugging Face datasets.

Every source yields ``(doc_id, text)`` per split. Sources without their own splits are split by document with a
stable hash of the document id (sha256, so the split of a file never changes when other files are added or removed
and is the same on every machine and Python version): a document is ``test`` if its hash falls below
``test_fraction``, ``validation`` below ``test_fraction + validation_fraction``, else ``train``.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lce.config import check
from lce.errors import ConfigError, LceError
from lce.registry import Registry

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")

DATASETS: Registry = Registry("data")


def hash_split(doc_id: str, validation_fraction: float, test_fraction: float) -> str:
    """The split of ``doc_id`` under the stable hash rule (see module docstring)."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _check_split_fractions(where: str, validation_fraction: float, test_fraction: float) -> None:
    check(0 < validation_fraction < 1, f"{where}.validation_fraction", f"must be in (0, 1), got {validation_fraction}")
    check(0 < test_fraction < 1, f"{where}.test_fraction", f"must be in (0, 1), got {test_fraction}")
    check(validation_fraction + test_fraction < 1, where, "validation_fraction + test_fraction must be < 1")


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _files_split(files: list[tuple[str, Path]], split: str, cfg) -> Iterator[tuple[str, str]]:
    for doc_id, path in files:
        if hash_split(doc_id, cfg.validation_fraction, cfg.test_fraction) == split:
            text = _read_text(path)
            if len(text) >= cfg.min_chars:
                yield doc_id, text


@DATASETS.register("stdlib")
@dataclass(frozen=True)
class StdlibData:
    """The running Python's standard-library source: always present, so lce runs offline with no download.

    Found with ``sysconfig.get_paths()["stdlib"]`` (``sys.prefix`` would point into a virtual environment). Test
    suites, IDLE, lib2to3 and any installed packages are excluded by default: they are repetitive, or not the stdlib.
    """

    name: str = "stdlib"
    include: str = "*.py"
    exclude: list[str] = field(
        default_factory=lambda: [
            "site-packages/*", "dist-packages/*", "test/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*",
        ]
    )
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_chars: int = 1

    def __post_init__(self):
        _check_split_fractions("data", self.validation_fraction, self.test_fraction)

    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[tuple[str, Path]]:
        """``(relative path, path)`` of every included file, sorted; excluded folders are not even walked."""
        root = self.root()
        out = []
        for folder, subdirs, names in os.walk(root):
            rel_folder = Path(folder).relative_to(root).as_posix()
            prefix = "" if rel_folder == "." else rel_folder + "/"
            # A folder is pruned when a file inside it would be excluded (patterns like "test/*").
            subdirs[:] = sorted(d for d in subdirs if not self._excluded(f"{prefix}{d}/_"))
            for name in sorted(names):
                rel = prefix + name
                if fnmatch.fnmatch(name, self.include) and not self._excluded(rel):
                    out.append((rel, Path(folder) / name))
        if not out:
            raise LceError(f"data=stdlib: no files match {self.include!r} under {root}")
        return sorted(out)

    def _excluded(self, rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pattern) for pattern in self.exclude)

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        return _files_split(self.files(), split, self)


@DATASETS.register("local")
@dataclass(frozen=True)
class LocalData:
    """Local text files matching a glob (``**`` recurses); the document id is the path relative to the glob's root."""

    name: str = "local"
    pattern: str = "???"
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_chars: int = 1

    def __post_init__(self):
        _check_split_fractions("data", self.validation_fraction, self.test_fraction)
        check(self.pattern != "???", "data.pattern", "set a glob of text files, e.g. data.pattern='corpus/**/*.txt'")

    def files(self) -> list[tuple[str, Path]]:
        pattern = os.path.expanduser(self.pattern)
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise LceError(f"data.pattern: no files match {pattern!r}")
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        return [(p.relative_to(root).as_posix(), p) for p in paths]

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        return _files_split(self.files(), split, self)


@DATASETS.register("hf")
@dataclass(frozen=True)
class HFData:
    """A Hugging Face dataset by hub name or loader (``json``, ``parquet``, ``text`` with ``data_files``).

    Each split field names the dataset split to read; a split set to null is carved out of ``train_split`` by the
    stable hash of the example index (for datasets that ship only a train split).
    """

    name: str = "hf"
    path: str = "???"
    config_name: str | None = None
    data_files: dict | None = None
    text_field: str = "text"
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = "test"
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_chars: int = 1
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        _check_split_fractions("data", self.validation_fraction, self.test_fraction)
        check(self.path != "???", "data.path",
              "set a dataset name (e.g. data.path=pg19) or loader (json, parquet, text)")

    def _load(self, split: str):
        import datasets

        kwargs = {"split": split, "revision": self.revision}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            return datasets.load_dataset(self.path, self.config_name, **kwargs)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
            hint = " (HF_HUB_OFFLINE is set: the dataset must already be in the local cache)" if offline else ""
            raise LceError(f"data.path={self.path!r} split {split!r} could not be loaded{hint}: {e}") from None

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        own = {"train": self.train_split, "validation": self.validation_split, "test": self.test_split}[split]
        # Splits set to null are carved out of the train split by hash; the train split then loses those documents.
        carved_validation = self.validation_fraction if self.validation_split is None else 0.0
        carved_test = self.test_fraction if self.test_split is None else 0.0
        carve = own is None or (split == "train" and (carved_validation or carved_test))
        source = self.train_split if own is None else own
        ds = self._load(source)
        if self.text_field not in ds.column_names:
            raise ConfigError(
                f"data.text_field: {self.text_field!r} is not a column of {self.path}; "
                f"columns: {', '.join(ds.column_names)}"
            )
        for index, example in enumerate(ds):
            doc_id = f"{source}/{index}"
            if carve and hash_split(doc_id, carved_validation, carved_test) != split:
                continue
            text = example[self.text_field]
            if len(text) >= self.min_chars:
                yield doc_id, text


def build_data(spec, **params):
    """A data source config from a name, mapping or config node (see ``Registry.build``)."""
    return DATASETS.build(spec, "data", **params)

