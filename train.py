"""Mugs pretraining: `python train.py --recipe vit_small_100ep --data_path train.beton --output_dir runs/s100`.

Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (installed as `mugs-train`). Re-running the same command
resumes the run in --output_dir. Exit status: 0 finished or reached --max_steps, 1 error (one line on stderr),
2 usage, 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint.
"""

import signal
import sys

from mugs_fast.checkpoint import CheckpointWriteError
from mugs_fast.config import parse_config
from mugs_fast.engine import TrainError, train


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        result = train(cfg)
    except (TrainError, CheckpointWriteError) as e:
        print(f"mugs-train: error: {e}", file=sys.stderr)
        return 1
    if result.stopped_by.startswith("SIG"):
        return 128 + signal.Signals[result.stopped_by].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
