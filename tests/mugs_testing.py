"""Small Mugs configurations and batches shared by the model tests (odd sizes, 32/16-px crops, fp32), and the
commands that start the project's programs in processes of their own (`start`, `torchrun` with gloo)."""

import os
import socket
import subprocess
import sys

import torch
from prep_testing import REPO

from mugs_fast.config import MugsConfig, recipe


def small_cfg(**overrides) -> MugsConfig:
    """A 2-block ViT-Tiny on 32-px global / 16-px local crops with small heads, queues and memories."""
    base = dict(
        depth=2,
        global_crop_size=32,
        size_crops=(16,),
        local_crops_number=3,
        batch_size_per_gpu=5,
        head_hidden_dim=48,
        pred_hidden_dim=40,
        instance_out_dim=24,
        local_group_out_dim=20,
        instance_queue_size=97,
        local_group_queue_size=73,
        group_out_dim=56,
        group_bottleneck_dim=16,
        local_group_knn_top_n=3,
        epochs=4,
        warmup_epochs=1,
        freeze_last_layer=1,
        drop_path_rate=0.1,
        precision="fp32",
    )
    return recipe("tiny", **{**base, **overrides})


def make_batch(cfg: MugsConfig, batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random crops shaped as the loaders deliver them (crop-major rows) and weak flags, on CPU."""
    g = torch.Generator().manual_seed(seed)
    b = batch or cfg.batch_size_per_gpu
    size, local = cfg.global_crop_size, cfg.size_crops[0]
    return {
        "teacher": torch.randn(2 * b, 3, size, size, generator=g),
        "student_global": torch.randn(2 * b, 3, size, size, generator=g),
        "student_local": torch.randn(cfg.local_crops_number * b, 3, local, local, generator=g),
        "weak": torch.rand(b, generator=g) < 0.5,
    }


def start(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """`args` in a process of its own, from the repository root, with one OpenMP thread; text pipes for its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    pipe = subprocess.PIPE
    return subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=pipe, stderr=pipe, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """The start of a command line that runs a script or `-m module` in `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
