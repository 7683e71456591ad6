"""The compile check (``lce.kernels.inspect``): kernels lce would launch, compiled for Hopper (sm_90) on this CPU
machine, must fit shared memory, must not spill registers in a bf16/fp16 kernel (beyond the recorded
``KNOWN_SPILLS``, empty today) and must use tensor cores wherever they multiply bf16/fp16 tiles.

The default run compiles a representative subset (``inspect.default_subset``: bf16 at head dims 128 and 256, plain
causal forward (with the tuner's other shapes) and backward, whose head-dim-256 launches had to shrink; decode; the
dk/dv kernel with every modifier at head dim 256; DCA forward and backward; linear attention; selected-block
attention's forward and backward at head dim 128) in a fresh process (the tests run under Triton's interpreter, whose
kernels cannot be compiled); the full matrix is ``-m slow`` (and ``python -m lce.kernels.inspect``). Skipped where
Triton or its bundled ``cuobjdump`` is absent, where this Triton cannot compile for a GPU target ahead of time, or
where it is another release than the one the known spills were recorded with (``inspect.RECORDED_WITH``).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

from lce.errors import LceError
from lce.kernels import inspect as kinspect
from lce.kernels.attention.launch import launch_options

SM90 = kinspect.TARGETS["sm_90"]


def _unavailable() -> str | None:
    """Why the ahead-of-time compile cannot run here, or None."""
    if kinspect.tool("cuobjdump") is None:
        return f"Triton {triton.__version__} has no bundled cuobjdump (triton/backends/nvidia/bin/)"
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"Triton {triton.__version__} cannot compile for a GPU target without one: {e}"
    if not hasattr(GPUTarget("cuda", 90, 32), "arch"):
        return f"Triton {triton.__version__}'s GPUTarget has no arch"
    return None


def _other_release() -> str | None:
    """Why the recorded spills do not apply to this Triton, or None."""
    if ".".join(triton.__version__.split(".")[:2]) != kinspect.RECORDED_WITH:
        return (f"the recorded spills are Triton {kinspect.RECORDED_WITH}'s and Triton {triton.__version__} allocates "
                "registers differently (python -m lce.kernels.inspect prints its figures)")
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
recorded_release = pytest.mark.skipif(_other_release() is not None, reason=str(_other_release()))


def _unexpected(rows: list[kinspect.Row]) -> dict[str, list[str]]:
    return {f"{r.target}/{r.key}": r.problems for r in rows if r.problems and not kinspect.known_problem(r)}


@recorded_release
def test_representative_configurations_compile_within_limits():
    rows = kinspect.rows_in_subprocess("--subset", "--arch", "90")
    assert not _unexpected(rows), _unexpected(rows)
    by_key = {r.key: r for r in rows}
    plain = by_key["attention_forward/causal/bf16/d128"]
    assert plain.hgmma > 0 and plain.spill_stores == 0 and 0 < plain.shared_bytes <= SM90.shared_per_block
    assert plain.blocks_per_sm >= 1
    # Segments rotate before the kernels (prerotate.py): no sine or cosine in any segment kernel, and no spill.
    segments = [r for r in rows if "segment" in r.case]
    assert {r.kernel for r in segments} >= {"attention_forward", "attention_backward_dq", "attention_backward_dk_dv"}
    assert all(r.sincos_ops == 0 and r.mufu_sincos == 0 and r.spill_stores == 0 for r in segments), segments
    # Every shape the tuner may pick compiles within the rules too.
    assert any(r.case.startswith("causal [128x") for r in rows)
    # Selected-block attention: both forwards and both backward kernels, both selection layouts, on tensor cores
    # (the merge of the key-block-major forward's partials has no product), none spilling.
    selected = [r for r in rows if r.kernel.startswith("selected_attention")]
    assert {r.kernel for r in selected} == {"selected_attention_fwd", "selected_attention_bwd_dq",
                                            "selected_attention_bwd_dk_dv", "selected_attention_block_major_fwd",
                                            "selected_attention_block_major_bwd_dq",
                                            "selected_attention_block_major_merge"}
    products = [r for r in selected if r.kernel != "selected_attention_block_major_merge"]
    assert all(r.hgmma + r.hmma > 0 for r in products), products
    assert all(r.spill_stores == 0 and r.blocks_per_sm >= 1 for r in selected), selected


def test_launch_configuration_is_what_the_check_compiles():
    """The check reads warps and stages from the launch code: head dim 256 backward runs with fewer stages than 128."""
    configs = {c.key: c for c in kinspect.default_subset(SM90)}
    d128 = configs["attention_backward_dk_dv/causal/bf16/d128"].kwargs
    d256 = configs["attention_backward_dk/causal/bf16/d256"].kwargs  # dk and dv apart at head dim 256
    assert d256["num_stages"] < d128["num_stages"]
    assert launch_options("backward_dk_dv", torch.bfloat16, 256, (9, 0))["num_stages"] == d256["num_stages"]
    assert (d256["PARTS"], configs["attention_backward_dv/causal/bf16/d256"].kwargs["PARTS"]) == (1, 2)
    assert d128["PARTS"] == 3


@pytest.mark.parametrize("capability, kernel, dtype, head_dim", [
    ((9, 0), "forward", torch.float32, 256), ((8, 0), "forward", torch.bfloat16, 256),
    ((8, 0), "backward_dk_dv", torch.bfloat16, 256), ((8, 6), "backward_dq", torch.bfloat16, 128),
], ids=lambda x: str(x))
def test_launch_table_shrinks_the_pipeline_where_three_stages_overflow(capability, kernel, dtype, head_dim):
    assert launch_options(kernel, dtype, head_dim, capability)["num_stages"] < 3


def test_a_block_mask_takes_one_stage_off_the_forward_at_head_dim_256():
    """The per-pair mask gather keeps one more tile per stage: bf16 head dim 256 overflowed at 3 stages (246,272 B)."""
    plain = launch_options("forward", torch.bfloat16, 256, (9, 0))["num_stages"]
    assert launch_options("forward", torch.bfloat16, 256, (9, 0), block_mask=True)["num_stages"] == plain - 1
    assert launch_options("forward", torch.bfloat16, 128, (9, 0), block_mask=True)["num_stages"] == 3


def test_a_configuration_that_cannot_fit_is_refused_in_one_line():
    with pytest.raises(LceError, match=r"float32 at head dim 256.*compute capability 8\.6.*backend 'ref'") as info:
        launch_options("backward_dq", torch.float32, 256, (8, 6))
    assert "\n" not in str(info.value)


def test_blocks_per_sm_follows_the_limits():
    assert kinspect.blocks_per_sm(255, 60_000, 4, SM90) == 2  # registers: 65,536 / (256 * 128) = 2
    assert kinspect.blocks_per_sm(128, 140_000, 4, SM90) == 1  # shared memory
    assert kinspect.blocks_per_sm(128, SM90.shared_per_block + 1, 4, SM90) == 0


def test_check_flags_each_problem():
    row = kinspect.Row("k", "c", "bf16", 128, "sm_90", shared_bytes=300_000, shared_limit=232_448, spill_stores=8,
                       tensor_cores_expected=True)
    problems = kinspect.check_row(row)
    assert len(problems) == 3, problems
    fp32 = kinspect.Row("k", "c", "fp32", 128, "sm_90", shared_bytes=1, shared_limit=232_448, spill_stores=8,
                        tensor_cores_expected=False)
    assert kinspect.check_row(fp32) == []


@pytest.mark.slow
@recorded_release
@pytest.mark.parametrize("arch", [90, 80])
def test_every_configuration_compiles_within_limits(arch):
    """The full matrix (about an hour on two cores, most of it fp32): every op, dtype, head dim, modifier and segment
    count. On sm_90 the spills must be exactly the recorded ones; on sm_80 spills are reported, not held
    (``inspect.SPILL_TARGET``)."""
    target = kinspect.TARGETS[f"sm_{arch}"]
    rows = kinspect.rows_in_subprocess("--arch", str(arch), "--jobs", "2", timeout=6 * 3600)
    assert not _unexpected(rows), _unexpected(rows)
    if arch == 90:
        spilling = {f"{r.target}/{r.key}" for r in rows if r.dtype != "fp32" and r.spill_stores > 0}
        recorded = {k for k in kinspect.KNOWN_SPILLS if k.startswith(target.name)}
        assert spilling == recorded, {"new": spilling - recorded, "fixed (drop from KNOWN_SPILLS)": recorded - spilling}
