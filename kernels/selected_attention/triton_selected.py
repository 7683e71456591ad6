"""Triton kernels of ``lce.kernels.selected_attention``: causal attention over selected key blocks, forward and
backward (``reference.py`` defines the op).

Layout: contiguous ``q [B, HQ, Tq, D]``, ``k, v [B, HKV, Tk, D]``, ``block_index [B, HS, Tq, N]`` (int32 or int64,
``-1`` = empty slot, ``HS`` = ``HQ`` or ``HKV``), ``q_pos [B, Tq]``; key ``j`` sits at position ``j`` and block ``b``
holds keys ``b * BS`` to ``b * BS + BS - 1``.

Forward (``selected_fwd_kernel``): one program per (query token, selection head, batch), as NSA's selected-branch
kernel (Yuan et al. 2025, arXiv:2502.11089, section 3.4; flash-linear-attention's ``parallel_nsa_fwd_kernel``). The
query tile is the ``G = HQ / HS`` query heads of that token that share the selection (``G = 1`` for a selection per
query head), padded with zero rows to ``BLOCK_G >= 16`` so ``tl.dot`` has a legal shape; the program walks the ``N``
slots of its row, skips ``-1`` slots and blocks that start after ``q_pos``, and loads each selected block's keys and
values once for the whole group (the point of a shared selection: ``G`` times less key/value traffic). Online softmax
in fp32 with ``exp2`` (``scale * log2(e)`` folded into one multiply); the causal mask (which also masks keys ``>= Tk``
of a partial last block) is applied only to the block that reaches past the query's last visible key. It stores the
log-sum-exp ``lse [B, HQ, Tq]`` (fp32, natural log; ``-inf`` for a row with no visible key, whose output is 0).

Backward: FlashAttention-2's gradients (Dao 2023, arXiv:2307.08691, Algorithm 2) with the probabilities recomputed
from ``lse``, ``P = exp(S - lse)``, ``dS = P * (dP - delta)``, ``dP = dO V^T``, ``delta = rowsum(dO * O)``, in two
deterministic kernels (no atomics):

- ``selected_bwd_dq_kernel``: the forward's per-token program; each (token, query head) belongs to exactly one
  program, so ``dq`` is summed in registers and stored once. It also computes and stores ``delta`` (the program
  holds its rows' ``O`` and ``dO`` anyway: no pre-kernel).
- ``selected_bwd_dk_dv_kernel``: one program per (key block, batch x KV head) over the rows that selected that block,
  the transposed schedule (flash-linear-attention's NSA backward also computes dk/dv per key block; MoBA gathers the
  queries of each selected block likewise). The selection is turned around first
  (``invert_selection``: one stable sort of the visible ``(row, block)`` pairs into per-block lists, ``O(B HS Tq N)``
  int32), and the kernel gathers the listed rows' queries, ``dO``, ``lse`` and ``delta`` into ``BLOCK_R``-row tiles
  (``BLOCK_R / G`` listed rows of ``G`` heads each: a selection per query head fills whole tiles with one head's
  tokens), sums ``dk = scale dS^T Q`` and ``dv = P^T dO`` of the block in fp32 registers and stores each once, in
  the keys' dtype. A fixed list order makes the gradients bitwise reproducible; every key block is written (with
  zeros where nothing selected it), so no buffer needs zeroing.

Precision: every ``tl.dot`` accumulates in fp32; bf16/fp16 operands run on tensor cores (``mma.sync`` for 16-row
tiles, wgmma where a product has 64 rows; a product of two 16-bit numbers is exact in fp32), the probabilities and
``dS`` are rounded to the input dtype before they feed a further dot (as FlashAttention does). fp32 inputs keep fp32
operands with exact IEEE dots (not TF32): the exactness path the tests hold to a tight tolerance.

Sizes: ``block_size`` is a constexpr, a power of two from 16 to 128 (a ``tl.arange`` length; 16 is ``tl.dot``'s
smallest tile); other sizes are refused with an ``LceError`` naming the ``ref`` backend, which takes any. Head dims
up to 256 (padded to a power of two). Offsets are int32 unless a tensor holds ``2^31`` elements or more (then int64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.errors import LceError
from lce.kernels.backend import MAX_GRID_YZ, on_device_of
from lce.kernels.triton_precision import dot as _dot
from lce.kernels.triton_precision import round_to as _to

#: Block sizes the Triton path takes (``block_size`` is a ``tl.arange`` length; 16 is ``tl.dot``'s smallest tile).
BLOCK_SIZES = (16, 32, 64, 128)
#: Largest head dim (its power-of-two tile is the kernels' width).
MAX_HEAD_DIM = 256

#: ``(kernel, head-dim tile, fp32?) -> (num_warps, num_stages)``, chosen with the compile check
#: (``python -m lce.kernels.inspect --ops selected_attention``, sm_90, block 64, 16-row query tiles): no spills, and
#: every bf16/fp16 dot on tensor cores. Tiles not listed take ``DEFAULT_OPTIONS``. One stage for the per-token
#: kernels: their loop's loads depend on a loaded block number and sit behind a branch, so Triton does not pipeline
#: them (2 or 3 stages compiled to the same registers and shared memory). The dk/dv kernel's loop has no branch and
#: pipelines: at head dim 128 2 stages (214 registers at 8 warps; 1 stage 160), at 256 one (2 stages spilled 220 B
#: with 32-row tiles).
#: At head dim 256 8 warps keep every bf16/fp16 kernel under ~225 registers. fp32 (IEEE dots, no tensor cores: the
#: exactness path) compiles without spills except the dk/dv kernel at head dim 256 (1,440-1,544 B) and, with a
#: selection per query head, at 128 (40 B); spills are enforced for bf16/fp16 only.
LAUNCH_TABLE: dict[tuple[str, int, bool], tuple[int, int]] = {
    ("forward", 256, False): (8, 1),
    ("backward_dq", 256, False): (8, 1),
    ("backward_dk_dv", 128, False): (8, 2),
    ("backward_dk_dv", 256, False): (8, 1),
    ("forward", 256, True): (8, 1),
    ("backward_dq", 256, True): (8, 1),
    ("backward_dk_dv", 64, True): (8, 1),
    ("backward_dk_dv", 128, True): (8, 1),
    ("backward_dk_dv", 256, True): (8, 1),
}
DEFAULT_OPTIONS = (4, 1)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _program(HQ, HS, KV_GROUP, Tq, D, INT64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's token ``t``, batch ``b``, first query head ``h0``, KV head, the row offsets of its query heads'
    ``[BLOCK_G]`` rows in ``q``-shaped tensors, their mask, the head-dim columns and their mask."""
    t = tl.program_id(0)
    hs = tl.program_id(1)
    b = tl.program_id(2)
    if INT64:
        t, hs, b = t.to(tl.int64), hs.to(tl.int64), b.to(tl.int64)
    group = HQ // HS  # query heads sharing the selection: G
    h0 = hs * group
    kvh = h0 // KV_GROUP
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    heads = b * HQ + h0 + rows  # [BLOCK_G] flat (batch, head) of each row
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    return t, hs, b, kvh, heads, row_ok, cols, col_ok


@triton.jit
def selected_fwd_kernel(
    Q, K, V, BLOCK_INDEX, Q_POS, OUT, LSE, qk_scale,
    HQ, HKV, HS, KV_GROUP, Tq, Tk, N, D,
    BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    """``OUT [B, HQ, Tq, D]`` (q's dtype) and ``LSE [B, HQ, Tq]`` (fp32) of one token's ``G`` query heads over their
    selected blocks. Grid ``(Tq, HS, B)``; ``qk_scale = scale * log2(e)``."""
    t, hs, b, kvh, heads, row_ok, cols, col_ok = _program(HQ, HS, KV_GROUP, Tq, D, INT64, BLOCK_G, BLOCK_D)
    q_rows = (heads * Tq + t) * D
    qd_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    # The last key the query sees: its position, or the last key when the position lies past the keys.
    last = tl.minimum(tl.load(Q_POS + b * Tq + t).to(tl.int32), Tk - 1)
    kv_rows = (b * HKV + kvh) * Tk
    selection = BLOCK_INDEX + ((b * HS + hs) * Tq + t) * N
    offs = tl.arange(0, BS)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(N):
        start = tl.load(selection + n).to(tl.int32) * BS
        # -1 slots and blocks wholly in the query's future are skipped: no load, no flops.
        if (start >= 0) & (start <= last):
            keys = start + offs
            key_ok = keys <= last  # causal, and keys >= Tk of a partial last block
            kv = (kv_rows + keys) * D
            kv_mask = key_ok[:, None] & col_ok[None, :]
            k = tl.load(K + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_G, BS], tl.float32)) * qk_scale
            if start + BS - 1 > last:  # only the block that reaches past the query needs the mask
                s = tl.where(key_ok[None, :], s, float("-inf"))
            # Every block here has a visible key (``start <= last``), so m_new is finite: no -inf - -inf.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(_to(p, v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    alive = l_i > 0.0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # a row with no visible key keeps acc = 0
    tl.store(OUT + q_rows[:, None] + cols[None, :], _to(out, OUT.dtype.element_ty), mask=qd_mask)
    lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + heads * Tq + t, lse, mask=row_ok)


@triton.jit
def selected_bwd_dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, BLOCK_INDEX, Q_POS, DQ, scale, qk_scale,
    HQ, HKV, HS, KV_GROUP, Tq, Tk, N, D,
    BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    """``DQ [B, HQ, Tq, D]`` (q's dtype) of one token's ``G`` query heads, and their ``DELTA = rowsum(dO * O)``
    ``[B, HQ, Tq]`` (fp32) for the dk/dv kernel. Grid and arguments as the forward's, plus ``OUT``, ``DO``
    (``[B, HQ, Tq, D]``) and the forward's ``LSE``."""
    t, hs, b, kvh, heads, row_ok, cols, col_ok = _program(HQ, HS, KV_GROUP, Tq, D, INT64, BLOCK_G, BLOCK_D)
    q_rows = (heads * Tq + t) * D
    qd_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    o = tl.load(OUT + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    # delta here, not in a pre-kernel: this program holds its rows' O and dO anyway.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + heads * Tq + t, delta, mask=row_ok)
    # P = exp2(S * log2(e) - lse * log2(e)); a row with no visible key (lse = -inf) and the padding rows take +inf,
    # so their P is 0, never NaN.
    lse = tl.load(LSE + heads * Tq + t, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    last = tl.minimum(tl.load(Q_POS + b * Tq + t).to(tl.int32), Tk - 1)
    kv_rows = (b * HKV + kvh) * Tk
    selection = BLOCK_INDEX + ((b * HS + hs) * Tq + t) * N
    offs = tl.arange(0, BS)

    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(N):
        start = tl.load(selection + n).to(tl.int32) * BS
        if (start >= 0) & (start <= last):
            keys = start + offs
            key_ok = keys <= last
            kv = (kv_rows + keys) * D
            kv_mask = key_ok[:, None] & col_ok[None, :]
            k = tl.load(K + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_G, BS], tl.float32)) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            if start + BS - 1 > last:
                p = tl.where(key_ok[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_G, BS], tl.float32))
            ds = _to(p * (dp - delta[:, None]), q.dtype)
            dq = _dot(ds, k, dq)
    tl.store(DQ + q_rows[:, None] + cols[None, :], _to(dq * scale, DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def selected_bwd_dk_dv_kernel(
    Q, K, V, DO, LSE, DELTA, Q_POS, ROWS, OFFSETS, DK, DV, scale, qk_scale,
    HQ, HKV, HS, Tq, Tk, D, n_blocks,
    BS: tl.constexpr, BLOCK_R: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr,
):
    """``DK``, ``DV`` ``[B, HKV, Tk, D]`` (k's dtype) of one key block of one KV head, summed in registers over the
    (token, selection head) rows that selected it: ``ROWS[OFFSETS[i]:OFFSETS[i + 1]]`` for list ``i = (b * HKV +
    kv head) * n_blocks + block`` (``invert_selection``), each row standing for its ``G`` query heads. Grid
    ``(n_blocks, B * HKV)``. A tile is ``BLOCK_R`` query rows: ``BLOCK_R / GP`` listed rows of ``GP`` (``G``
    rounded up to a power of two) heads each."""
    kb = tl.program_id(0)
    bkv = tl.program_id(1)
    if INT64:
        kb, bkv = kb.to(tl.int64), bkv.to(tl.int64)
    group = HQ // HS
    b = bkv // HKV
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    keys = kb * BS + tl.arange(0, BS)
    key_ok = keys < Tk
    kv = (bkv * Tk + keys) * D
    kv_offsets = kv[:, None] + cols[None, :]
    kv_mask = key_ok[:, None] & col_ok[None, :]
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    first = tl.load(OFFSETS + bkv * n_blocks + kb)
    end = tl.load(OFFSETS + bkv * n_blocks + kb + 1)
    r = tl.arange(0, BLOCK_R)
    entry_in_tile = r // GP
    g = r % GP

    dk = tl.zeros([BS, BLOCK_D], tl.float32)
    dv = tl.zeros([BS, BLOCK_D], tl.float32)
    for e in range(first, end, BLOCK_R // GP):
        entry = e + entry_in_tile
        row_ok = (entry < end) & (g < group)
        row = tl.load(ROWS + entry, mask=row_ok, other=0)  # (b * HS + hs) * Tq + t
        if INT64:
            row = row.to(tl.int64)
        t = row % Tq
        hs = (row // Tq) % HS
        heads = b * HQ + hs * group + g
        q_rows = (heads * Tq + t) * D
        qd_mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
        # Listed rows saw at least one key of the block; padding rows take lse = +inf (P = 0).
        lse = tl.load(LSE + heads * Tq + t, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + heads * Tq + t, mask=row_ok, other=0.0)
        last = tl.minimum(tl.load(Q_POS + b * Tq + t, mask=row_ok, other=-1).to(tl.int32), Tk - 1)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_R, BS], tl.float32)) * qk_scale
        p = tl.math.exp2(s - lse[:, None] * _LOG2E)
        p = tl.where(keys[None, :] <= last[:, None], p, 0.0)  # causal, keys >= Tk, padding rows
        dv = _dot(tl.trans(_to(p, do.dtype)), do, dv)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_R, BS], tl.float32))
        ds = _to(p * (dp - delta[:, None]), q.dtype)
        dk = _dot(tl.trans(ds), q, dk)
    tl.store(DK + kv_offsets, _to(dk * scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, _to(dv, DV.dtype.element_ty), mask=kv_mask)


def invert_selection(block_index: torch.Tensor, q_pos: torch.Tensor, block_size: int, heads: int, kv_heads: int,
                     num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection turned around for the dk/dv kernel: ``(rows, offsets)``, int32. List ``i = (b * HKV + kv head)
    * n_blocks + block`` holds ``rows[offsets[i]:offsets[i + 1]]``, the flat rows ``(b * HS + hs) * Tq + t`` of
    ``block_index`` that selected that block of that KV head and see at least one of its keys (a block that starts
    after ``q_pos`` is dropped, as the forward skips it), in ascending order (a stable sort: the summation order is
    fixed, so the gradients are deterministic). ``O(B HS Tq N)`` memory and one sort."""
    batch, sel_heads, tq, slots = block_index.shape
    n_blocks = -(-num_keys // block_size)
    index = block_index.long()
    last = q_pos.long().clamp(max=num_keys - 1)[:, None, :, None]
    visible = (index >= 0) & (index * block_size <= last) & (index < n_blocks)
    kv_of_head = torch.arange(sel_heads, device=index.device) * (heads // sel_heads) // (heads // kv_heads)
    batch_ids = torch.arange(batch, device=index.device)[:, None, None, None]
    lists = (batch_ids * kv_heads + kv_of_head[None, :, None, None]) * n_blocks + index
    rows = torch.arange(batch * sel_heads * tq, device=index.device).view(batch, sel_heads, tq, 1)
    lists, rows = lists[visible], rows.expand(-1, -1, -1, slots)[visible]
    lists, order = torch.sort(lists, stable=True)
    counts = torch.bincount(lists, minlength=batch * kv_heads * n_blocks)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows[order].to(torch.int32), offsets.to(torch.int32)


def launch_options(kernel: str, dtype: torch.dtype, head_dim: int) -> dict[str, int]:
    """``{"num_warps", "num_stages"}`` of ``kernel`` (``forward``, ``backward_dq`` or ``backward_dk_dv``) for inputs
    of ``dtype`` and ``head_dim`` (``LAUNCH_TABLE``, else ``DEFAULT_OPTIONS``)."""
    tile = max(16, triton.next_power_of_2(head_dim))
    warps, stages = LAUNCH_TABLE.get((kernel, tile, dtype == torch.float32), DEFAULT_OPTIONS)
    return {"num_warps": warps, "num_stages": stages}


def check_supported(q: torch.Tensor, k: torch.Tensor, block_index: torch.Tensor, block_size: int) -> None:
    """A one-line ``LceError`` for what the Triton path does not take (the ``ref`` backend takes all of it)."""
    if block_size not in BLOCK_SIZES:
        raise LceError(f"selected_attention: the triton backend takes block sizes {', '.join(map(str, BLOCK_SIZES))} "
                       f"(powers of two from 16 to 128), got {block_size}; use backend 'ref' for other sizes")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LceError(f"selected_attention: the triton backend takes float16, bfloat16 or float32 inputs, got "
                       f"{q.dtype}; use backend 'ref'")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise LceError(f"selected_attention: the triton backend takes head dims up to {MAX_HEAD_DIM}, got "
                       f"{q.shape[-1]}; use backend 'ref'")
    if max(block_index.shape[0], block_index.shape[1], block_index.shape[0] * k.shape[1]) > MAX_GRID_YZ:
        raise LceError(f"selected_attention: the triton backend launches batch x selection heads = "
                       f"{block_index.shape[0]} x {block_index.shape[1]} programs (and batch * KV heads = "
                       f"{block_index.shape[0] * k.shape[1]}) on grid axes limited to {MAX_GRID_YZ}; use backend "
                       "'ref'")


def _sizes(q, k, block_index, block_size: int) -> tuple[tuple[int, int, int], dict]:
    """The grid and the size arguments of the per-token kernels (forward and dq)."""
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    sel_heads, slots = block_index.shape[1], block_index.shape[3]
    big = max(q.numel(), k.numel(), block_index.numel()) >= 2 ** 31
    sizes = {"HQ": heads, "HKV": kv_heads, "HS": sel_heads, "KV_GROUP": heads // kv_heads, "Tq": tq, "Tk": tk,
             "N": slots, "D": dim, "BS": block_size, "BLOCK_G": max(16, triton.next_power_of_2(heads // sel_heads)),
             "BLOCK_D": max(16, triton.next_power_of_2(dim)), "INT64": big}
    return (tq, sel_heads, batch), sizes


def forward_launch(q, k, v, block_index, q_pos, out, lse, block_size: int, scale: float) -> tuple[tuple, dict]:
    """``(grid, kwargs)`` of the forward kernel (tensors may be meta tensors: ``lce.kernels.inspect`` compiles what
    this returns)."""
    grid, sizes = _sizes(q, k, block_index, block_size)
    kwargs = {"Q": q, "K": k, "V": v, "BLOCK_INDEX": block_index, "Q_POS": q_pos, "OUT": out, "LSE": lse,
              "qk_scale": scale * LOG2E, **sizes, **launch_options("forward", q.dtype, q.shape[-1])}
    return grid, kwargs


def dk_dv_rows(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> int:
    """Query rows per tile of the dk/dv kernel, at least one listed row of ``G`` heads: on CUDA 32, and 16 above
    head dim 128 or in fp32 (two fp32 ``[BS, D]`` accumulators are held beside the tiles: fp32 with 32 rows spilled
    528-1,780 B at head dims 64-128 and ~40 KB at 256, with 16 at most 40 B up to 128 and ~1.5 KB at 256); in the
    interpreter (CPU tensors) 32. Meta tensors (``lce.kernels.inspect``) count as CUDA."""
    rows = 16 if device.type != "cpu" and (head_dim > 128 or dtype == torch.float32) else 32
    return max(rows, triton.next_power_of_2(group))


def backward_launches(q, k, v, out, do, lse, delta, block_index, q_pos, rows, offsets, dq, dk, dv, block_size: int,
                      scale: float) -> dict[str, tuple[tuple, dict]]:
    """``{"dq": (grid, kwargs), "dk_dv": (grid, kwargs)}``: the two backward launches, dq first (it writes
    ``delta``, which the dk/dv kernel reads)."""
    grid, sizes = _sizes(q, k, block_index, block_size)
    dq_kwargs = {"Q": q, "K": k, "V": v, "OUT": out, "DO": do, "LSE": lse, "DELTA": delta,
                 "BLOCK_INDEX": block_index, "Q_POS": q_pos, "DQ": dq, "scale": scale, "qk_scale": scale * LOG2E,
                 **sizes, **launch_options("backward_dq", q.dtype, q.shape[-1])}
    group = q.shape[1] // block_index.shape[1]
    n_blocks = -(-k.shape[2] // block_size)
    big = sizes["INT64"] or rows.numel() >= 2 ** 31
    dk_dv_kwargs = {"Q": q, "K": k, "V": v, "DO": do, "LSE": lse, "DELTA": delta, "Q_POS": q_pos, "ROWS": rows,
                    "OFFSETS": offsets, "DK": dk, "DV": dv, "scale": scale, "qk_scale": scale * LOG2E,
                    "HQ": q.shape[1], "HKV": k.shape[1], "HS": block_index.shape[1], "Tq": q.shape[2],
                    "Tk": k.shape[2], "D": q.shape[3], "n_blocks": n_blocks, "BS": block_size,
                    "BLOCK_R": dk_dv_rows(q.device, q.dtype, q.shape[3], group), "GP": triton.next_power_of_2(group),
                    "BLOCK_D": sizes["BLOCK_D"], "INT64": big,
                    **launch_options("backward_dk_dv", q.dtype, q.shape[-1])}
    return {"dq": (grid, dq_kwargs), "dk_dv": ((n_blocks, q.shape[0] * k.shape[1]), dk_dv_kwargs)}


def selected_forward(q, k, v, block_index, q_pos, block_size: int, scale: float):
    """``(out [B, HQ, Tq, D], lse [B, HQ, Tq] fp32)`` of contiguous inputs."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to launch: no query, or no key to see (output 0)
        return out.zero_(), lse.fill_(float("-inf"))
    grid, kwargs = forward_launch(q, k, v, block_index, q_pos, out, lse, block_size, scale)
    with on_device_of(q):
        selected_fwd_kernel[grid](**kwargs)
    return out, lse


def selected_backward(q, k, v, out, do, lse, block_index, q_pos, block_size: int, scale: float):
    """``(dq, dk, dv)`` in the inputs' dtypes (contiguous inputs)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    rows, offsets = invert_selection(block_index, q_pos, block_size, q.shape[1], k.shape[1], k.shape[2])
    launches = backward_launches(q, k, v, out, do, lse, delta, block_index, q_pos, rows, offsets, dq, dk, dv,
                                 block_size, scale)
    with on_device_of(q):
        grid, kwargs = launches["dq"]
        selected_bwd_dq_kernel[grid](**kwargs)
        grid, kwargs = launches["dk_dv"]
        selected_bwd_dk_dv_kernel[grid](**kwargs)
    return dq, dk, dv


class SelectedAttentionFunction(torch.autograd.Function):
    """Autograd for a Triton forward and backward pair (this file's per-token kernels, or
    ``triton_block_major``'s key-block-major ones): ``forward(q, k, v, block_index, q_pos, block_size, scale) -> (out,
    lse)`` and ``backward(q, k, v, out, do, lse, block_index, q_pos, block_size, scale) -> (dq, dk, dv)``; saves ``q,
    k, v, out, lse`` (``O(T)``) and the selection."""

    @staticmethod
    def forward(ctx, q, k, v, block_index, q_pos, block_size: int, scale: float, forward=None, backward=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        block_index, q_pos = block_index.contiguous(), q_pos.contiguous()
        out, lse = (forward or selected_forward)(q, k, v, block_index, q_pos, block_size, scale)
        ctx.save_for_backward(q, k, v, out, lse, block_index, q_pos)
        ctx.block_size, ctx.scale, ctx.backward = block_size, scale, backward or selected_backward
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, block_index, q_pos = ctx.saved_tensors
        dq, dk, dv = ctx.backward(q, k, v, out, do.contiguous(), lse, block_index, q_pos, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def selected_attention_triton(q, k, v, block_index, block_size: int, scale: float, q_pos=None) -> torch.Tensor:
    """The Triton path of ``lce.kernels.selected_attention.selected_attention`` (arguments and result as
    ``reference.selected_attention_reference``; ``function.check_inputs`` has checked the shapes).

    Raises:
        LceError: a block size, dtype, head dim or grid the kernels do not take (``check_supported``).
    """
    check_supported(q, k, block_index, block_size)
    if q_pos is None:
        tq, tk = q.shape[2], k.shape[2]
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(q.shape[0], tq)
    out, _ = SelectedAttentionFunction.apply(q, k, v, block_index, q_pos, int(block_size), float(scale))
    return out
