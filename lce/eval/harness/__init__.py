"""lm-evaluation-harness tasks on lce-patched models: the ``eval.harness`` config and its resumable runner.

- ``lce.eval.harness.model``: ``LceLM``, the lm-eval model registered as ``lce`` (needs ``pip install 'lce[harness]'``).
- ``python -m lce.eval.harness ...``: lm-eval's command line with that model registered and lce's bundled tasks on the
  include path (``lce.eval.harness.__main__``).
- ``HarnessConfig`` (``eval.harness``, options in ``conf/eval/harness/``) and ``run_harness``: an experiment runs its
  tasks on the patched model after the perplexity sweep and stores one row per task in ``harness.jsonl`` beside
  ``results.jsonl``; a rerun skips the tasks already stored.

This module imports neither torch nor lm-eval: the ``lce`` command checks a configuration with it first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lce.config import check, check_at_least, from_mapping, to_plain
from lce.errors import ConfigError

#: The bundled demo tasks (``lce_demo``, ``lce_demo_ppl``, ``lce_demo_choice``, ``lce_demo_gen``): local JSON, no
#: download. Always on the include path of ``run_harness`` and ``python -m lce.eval.harness``.
BUNDLED_TASKS = Path(__file__).with_name("tasks")
KIND = "harness"
INSTALL = "pip install 'lce[harness]'"


@dataclass(frozen=True)
class HarnessConfig:
    """lm-evaluation-harness tasks run on the evaluated model (one run of ``lm_eval.simple_evaluate`` per entry).

    Attributes:
        name: the option's name (``conf/eval/harness/<name>.yaml``).
        tasks: lm-eval task or group names, each run and stored as one unit (``longbench``, ``lce_demo_ppl``).
        include_path: more directories of task YAMLs (lce's bundled tasks are always included).
        num_fewshot: few-shot examples (None: each task's default).
        limit: examples per task (an int, or a fraction < 1); None: all. For trying a configuration, not for results.
        max_length: the longest input (None: what the patch supports, ``LceLM``); a longer input is an error, never
            truncated, except that perplexity tasks are cut into rolling windows of this length.
        max_gen_toks: tokens generated when a task does not say.
        apply_chat_template: put prompts in the tokenizer's chat template.
        metadata: passed to the tasks (lm-eval's ``--metadata``; RULER: ``{max_seq_lengths: [4096], tokenizer: ...}``).
        bootstrap_iters: bootstrap iterations for standard errors (0: none).
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """

    name: str = "custom"
    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: float | None = None
    max_length: int | None = None
    max_gen_toks: int = 256
    apply_chat_template: bool = False
    metadata: dict = field(default_factory=dict)
    bootstrap_iters: int = 1000
    seed: int = 1234

    def __post_init__(self):
        check(len(self.tasks) > 0, "eval.harness.tasks", "must list at least one lm-eval task or group")
        check(len(set(self.tasks)) == len(self.tasks), "eval.harness.tasks", f"has duplicates: {self.tasks}")
        check(self.limit is None or self.limit > 0, "eval.harness.limit", f"must be > 0, got {self.limit}")
        check(self.max_length is None or self.max_length >= 2, "eval.harness.max_length",
              f"must be >= 2, got {self.max_length}")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "eval.harness.num_fewshot",
              f"must be >= 0, got {self.num_fewshot}")
        check_at_least(self, "eval.harness", 1, "max_gen_toks")
        check_at_least(self, "eval.harness", 0, "bootstrap_iters")
        for path in self.include_path:
            check(Path(path).expanduser().is_dir(), "eval.harness.include_path", f"no such directory: {path}")

    def include_paths(self) -> list[str]:
        return [str(BUNDLED_TASKS), *(str(Path(p).expanduser()) for p in self.include_path)]


def require_lm_eval() -> None:
    """Raise a one-line ``LceError`` saying how to install lm-evaluation-harness when it is not installed."""
    import importlib.util

    from lce.errors import LceError

    if importlib.util.find_spec("lm_eval") is None:
        raise LceError(f"eval.harness: lm-evaluation-harness is not installed; {INSTALL}")


def build_harness(spec: Any, where: str = "eval.harness") -> HarnessConfig | None:
    """The harness tasks ``eval.harness`` selects: None (none), a mapping of fields or a ``HarnessConfig``."""
    spec = to_plain(spec)
    if spec is None or isinstance(spec, HarnessConfig):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of fields (eval/harness=longbench), got {spec!r}")
    return from_mapping(HarnessConfig, spec, where)


def harness_key(row: dict) -> str | None:
    """Identity of a harness row: ``point_key`` (run, method, params, model, length, seed, protocol) + the task; None
    for the rows of other evaluations."""
    from lce.eval.store import point_key

    if row.get("kind") != KIND:
        return None
    return point_key(row) + json.dumps({"task": row["task"]})


def cli_arguments(argv: list[str]) -> list[str]:
    """lm-eval command-line arguments with lce's defaults added where they are not given: lce's bundled tasks as
    ``--include_path``, and ``--device auto`` (lm-eval's command line would otherwise pass ``cuda:0`` on a machine
    without CUDA; ``auto`` is CUDA when available, else the CPU) for ``run``, the default command."""
    argv = list(argv)

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if not given("--include_path"):
        argv += ["--include_path", str(BUNDLED_TASKS)]
    if not given("--device") and argv[:1] not in (["ls"], ["validate"]):
        argv += ["--device", "auto"]
    return argv


def __getattr__(name: str):
    if name == "run_harness":
        from lce.eval.harness.run import run_harness

        return run_harness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
