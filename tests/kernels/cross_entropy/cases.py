"""Shared inputs for the fused linear cross-entropy tests: a random head and hidden states, and a runner returning the
NLL with its gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lce.kernels.cross_entropy import IGNORE_INDEX, LogitHead


@dataclass
class Case:
    hidden: torch.Tensor  # [N, C]
    weight: torch.Tensor  # [V, C]
    bias: torch.Tensor | None  # [V]
    multiplier: float
    softcap: float | None
    targets: torch.Tensor  # [N]
    upstream: torch.Tensor  # [N] gradient flowing into the NLL

    def head(self, dtype: torch.dtype = torch.float32, grad: bool = True) -> tuple[torch.Tensor, LogitHead]:
        """``(hidden, head)`` cast to ``dtype`` as fresh leaves (requiring grad when ``grad``)."""
        leaf = lambda t: None if t is None else t.to(dtype).detach().requires_grad_(grad)
        return leaf(self.hidden), LogitHead(leaf(self.weight), leaf(self.bias), self.multiplier, self.softcap)


def make_case(n: int = 37, c: int = 40, v: int = 75, bias: bool = True, multiplier: float = 1.0,
              softcap: float | None = None, ignored: tuple[int, ...] = (0, 3), seed: int = 0) -> Case:
    """Weights scaled so that logits spread over a few units: soft-caps of 1-2 bend them and softmax is far from
    uniform (gradients then differ visibly between right and wrong formulas)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignored)] = IGNORE_INDEX
    return Case(
        hidden=torch.randn(n, c, generator=g),
        weight=torch.randn(v, c, generator=g) * 0.4,
        bias=torch.randn(v, generator=g) if bias else None,
        multiplier=multiplier,
        softcap=softcap,
        targets=targets,
        upstream=torch.randn(n, generator=g),
    )


def nll_and_grads(fn, case: Case, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``fn(hidden, head, targets) -> nll [N]`` and the gradients of ``sum(nll * upstream)``, all as fp32."""
    hidden, head = case.head(dtype)
    nll = fn(hidden, head, case.targets)
    (nll * case.upstream).sum().backward()
    out = {"nll": nll.detach(), "dh": hidden.grad, "dw": head.weight.grad}
    if head.bias is not None:
        out["db"] = head.bias.grad
    return {name: t.float() for name, t in out.items()}


class LargestTensor(TorchDispatchMode):
    """Records the most bytes of any tensor a torch op returns inside the block (forward and backward alike). Bytes,
    not elements: Triton's interpreter copies tensors through byte views."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out
