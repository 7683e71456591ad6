"""The forward's tile choice (``lce.kernels.attention.tuning``): the launch table's shape off the GPU, the fastest
candidate on it, timed once per key."""

import torch

from lce.kernels.attention import tuning


def test_candidates_start_with_the_launch_tables_shape_and_fp32_has_no_others():
    h200 = (9, 0)
    bf16 = tuning.candidates(torch.bfloat16, 128, h200)
    assert (bf16[0].block_m, bf16[0].block_n) == (64, 64) and len(bf16) > 1
    assert all(c.num_warps == 8 for c in bf16[1:])
    assert tuning.candidates(torch.float32, 128, h200) == [tuning.candidates(torch.float32, 128, h200)[0]]
    assert tuning.candidates(torch.float32, 256, h200)[0].block_m == 32  # fp32 at head dim 256: 32 x 32 tiles


def test_off_the_gpu_the_first_candidate_runs_untimed():
    options = tuning.candidates(torch.bfloat16, 128, (9, 0))
    ran = []
    assert tuning.forward_config(("cpu-key",), options, ran.append, on_gpu=False) == options[0]
    assert ran == [] and ("cpu-key",) not in tuning.chosen


def test_on_the_gpu_the_fastest_is_kept_for_the_key(monkeypatch):
    import triton.testing

    options = tuning.candidates(torch.bfloat16, 128, (9, 0))
    cost = {config: 3.0 - index for index, config in enumerate(options)}  # the last candidate is fastest
    timed = []

    def fake_bench(fn, warmup, rep):
        timed.append(fn())
        return cost[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tuning, "chosen", {})
    key = ("gpu-key",)
    assert tuning.forward_config(key, options, lambda config: config, on_gpu=True) == options[-1]
    assert len(timed) == len(options)
    assert tuning.forward_config(key, options, lambda config: config, on_gpu=True) == options[-1]
    assert len(timed) == len(options)  # timed once per key
    monkeypatch.setenv("LCE_AUTOTUNE", "0")
    assert tuning.forward_config(("other",), options, lambda config: config, on_gpu=True) == options[0]
