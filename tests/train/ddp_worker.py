"""One process of the 2-process gloo run in test_distributed.py (run with ``accelerate launch``, not by pytest).

    accelerate launch --config_file conf/accelerate/cpu_ddp.yaml tests/train/ddp_worker.py OUT_DIR
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.conftest

from safetensors.torch import save_file

from lce.train import train
from tests.conftest import make_tiny_llama
from tests.train.test_distributed import BLOCKS, per_process_config

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    model = make_tiny_llama()
    train(model, BLOCKS, per_process_config(num_processes=int(os.environ["WORLD_SIZE"])), out_dir, progress=False)
    if int(os.environ["RANK"]) == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  str(out_dir / "final.safetensors"))
