"""CPU training throughput by intra-op threads and OpenMP wait policy, on an idle machine and beside one busy process.

Why ``lce`` sets ``OMP_WAIT_POLICY=PASSIVE`` (``lce.cli.quiet_cpu_threads``): torch's OpenMP threads spin while they
wait, and when another process holds one of the cores the spinning threads of a small model wait on each other for a
whole scheduler slice per operation. Each configuration runs in a fresh process (the wait policy is read when torch
loads OpenMP); "busy" runs one spinning Python process beside it. One training step is a forward, a backward and an
AdamW step of a randomly initialised Llama; the median of the steps after the first two is reported.

    python experiments/benchmarks/threads.py --out experiments/results/threads

Output: ``threads.csv`` (long format: model, params, tokens, load, wait_policy, threads, steps_per_s, tokens_per_s,
date, cpu, cores, torch) and a printed table with each configuration's ratio to one thread on the same load.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

#: name -> (LlamaConfig fields, batch, tokens per sequence): the quickstart's tiny Llama, a 25M Llama, SmolLM2-135M.
MODELS = {
    "tiny_llama": ({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 259}, 8, 128),
    "llama_25m": ({"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "vocab_size": 259}, 8, 128),
    "smollm2_135m_shape": ({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}, 1, 512),
}

CHILD = """
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
fields, batch, tokens, threads, steps = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**fields, max_position_embeddings=1024, tie_word_embeddings=True))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, fields["vocab_size"], (batch, tokens + 1))
times = []
for _ in range(steps):
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
steady = sorted(times[2:])
print(json.dumps({"seconds": steady[len(steady) // 2], "params": sum(p.numel() for p in model.parameters())}))
"""


def measure(name: str, threads: int, policy: str, busy: bool, steps: int) -> dict:
    fields, batch, tokens = MODELS[name]
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper()}
    env.pop("OMP_NUM_THREADS", None)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([fields, batch, tokens, threads, steps])],
                              env=env, capture_output=True, text=True, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": name, "params": result["params"], "tokens": batch * tokens, "load": "busy" if busy else "idle",
            "wait_policy": policy, "threads": threads, "steps_per_s": 1 / result["seconds"],
            "tokens_per_s": batch * tokens / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=7, help="steps per configuration (the first two are warm-up)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/threads"))
    args = parser.parse_args()
    import torch

    stamp = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
             "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    rows = []
    for name in args.models:
        for busy in (False, True):
            for policy in ("active", "passive"):
                for threads in args.threads:
                    row = {**measure(name, threads, policy, busy, args.steps), **stamp}
                    rows.append(row)
                    base = next(r for r in rows if (r["model"], r["load"], r["threads"]) ==
                                (name, row["load"], args.threads[0]))
                    print(f"{name:20} {row['load']:5} {policy:8} threads={threads}  {row['steps_per_s']:7.2f} steps/s"
                          f"  x{row['steps_per_s'] / base['steps_per_s']:.2f} vs {base['wait_policy']} "
                          f"threads={base['threads']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "threads.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
