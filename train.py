"""Mugs pretraining: `python train.py --recipe vit_small_100ep --data_path train.beton --output_dir runs/s100`.

Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (installed as `mugs-train`). Re-running the same command
resumes the run in --output_dir. Exit status: 0 finished or reached --max_steps, 1 error (one line on stderr),
2 usage, 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint. The command line is
`mugs_fast.engine.main`.
"""

import sys

from mugs_fast.engine import main

if __name__ == "__main__":
    sys.exit(main())
