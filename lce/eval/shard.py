"""Evaluation sharded across processes (``accelerate launch``, ``torchrun``) with results identical to one process.

Every protocol of ``lce.eval.protocols`` scores through ``nll_fn(input_ids [B, T]) -> [B, T-1]`` and the windows it
asks for never depend on the values it gets back. ``score_sharded`` uses that to split the work without touching the
protocols:

1. every process runs the protocol once with a stand-in ``nll_fn``; call ``k`` (one batch of windows) is computed by
   the model only on process ``k % world_size``, the others get zeros, and that pass's score is discarded;
2. the computed ``[B, T-1]`` NLL tensors are all-gathered and put back in call order;
3. every process runs the protocol again, replaying call ``k``'s tensor.

Each batch is the same tensor a single process would have scored, computed by the same code, and the protocol sums
the replayed values in the same order, so the result equals a one-process run exactly, whatever the number of
processes (given the same backend and thread count per process: reductions of a matrix product may round
differently with another thread count). Only the main process should write results (``Shard.is_main``).
The gathered tensors hold every window's per-token NLL (4 bytes a prediction), a few MB per evaluation length even
at 128k tokens x 10 documents; overlapping windows (``yarn`` with a small stride) multiply that by their overlap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lce.errors import LceError

NllFn = Callable[[torch.Tensor], torch.Tensor]
Score = TypeVar("Score")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Shard:
    """This process's place among the evaluating processes.

    Attributes:
        rank: index of this process, ``0`` the main one.
        world_size: number of processes; 1 runs everything here and never touches ``torch.distributed``.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise LceError(f"shard: rank {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether work item ``index`` is computed here (round robin)."""
        return index % self.world_size == self.rank

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (picklable objects; a collective every process must call)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (a collective every process must call)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_shard() -> Shard:
    """The shard of this process: from an initialised ``torch.distributed`` group, else from accelerate's
    ``PartialState`` when a launcher started several processes (``WORLD_SIZE > 1``), else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Joins the launcher's process group (nccl on GPUs); accelerate takes the CPU path (gloo) only when asked.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu)
        return Shard(state.process_index, state.num_processes)
    return Shard()


@dataclass(frozen=True)
class _Failure:
    """A failure on one process, sent to all of them so that none waits for a collective forever."""

    rank: int
    out_of_memory: bool
    message: str


def score_sharded(score: Callable[[NllFn], Score], nll_fn: NllFn, shard: Shard,
                  is_out_of_memory: Callable[[BaseException], bool]) -> Score:
    """``score(nll_fn)`` with the ``nll_fn`` calls split across ``shard``'s processes; the same result on each.

    Args:
        score: runs a protocol with the ``nll_fn`` it is given and returns its score; must ask for the same windows
            whatever values it gets back.
        nll_fn: the real ``nll_fn`` (a model).
        shard: this process's shard.
        is_out_of_memory: tells an allocation failure from a bug (``lce.eval.runner.is_out_of_memory``).

    Raises:
        MemoryError: some process ran out of memory (on every process, so a sweep records the point as OOM).
        LceError: another process failed otherwise (the failing process re-raises its own error).
    """
    if shard.world_size == 1:
        return score(nll_fn)
    computed: dict[int, torch.Tensor] = {}
    calls = 0

    def computing_nll_fn(input_ids: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        index, calls = calls, calls + 1
        if not shard.owns(index):
            return torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        computed[index] = nll_fn(input_ids).detach().cpu()
        return computed[index]

    error, failure = None, None
    try:
        score(computing_nll_fn)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other processes, or they wait forever
        error = e
        lines = str(e).strip().splitlines()
        failure = _Failure(shard.rank, is_out_of_memory(e), f"{type(e).__name__}: {lines[0] if lines else ''}")
    parts = shard.all_gather(failure if failure is not None else computed)
    failures = [part for part in parts if isinstance(part, _Failure)]
    if failures:
        first = next((f for f in failures if f.out_of_memory), failures[0])
        if first.out_of_memory:
            raise MemoryError(f"out of memory on process {first.rank}: {first.message}")
        if error is not None:
            raise error
        raise LceError(f"evaluation failed on process {first.rank}: {first.message}")
    results = {index: nll for part in parts for index, nll in part.items()}
    replayed = 0

    def replaying_nll_fn(input_ids: torch.Tensor) -> torch.Tensor:
        nonlocal replayed
        nll, replayed = results[replayed], replayed + 1
        return nll

    return score(replaying_nll_fn)


def run_on_main(shard: Shard, work: Callable[[], Result], what: str) -> Result:
    """``work()`` on the main process only, for work that is not shared out (retrieval trials); every process
    returns its result.

    Raises:
        LceError: on the other processes, when ``work`` failed on the main one (which re-raises its own error);
            ``what`` names the work in the message.
    """
    if not shard.is_main:
        result = shard.broadcast(None)
        if isinstance(result, _Failure):
            raise LceError(f"{what} failed on the main process: {result.message}")
        return result
    try:
        result = work()
    except BaseException as e:
        shard.broadcast(_Failure(shard.rank, False, f"{type(e).__name__}: {e}"))  # the others wait: release them
        raise
    return shard.broadcast(result)
