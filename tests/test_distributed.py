"""Two gloo processes, each with half of the global batch, end with the buffers of one process on all of it."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mugs_testing import free_port, make_batch, small_cfg

from mugs_fast.distributed import all_gather_cat, all_reduce_mean, get_rank, get_world_size
from mugs_fast.mugs import Mugs, train_step
from mugs_fast.optim import build_optimizer, build_schedules

GLOBAL_BATCH = 6
STEPS = 2


def _shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s images of a crop-major global batch (crop-major again)."""
    b = GLOBAL_BATCH // world
    out = {"weak": batch["weak"][rank * b : (rank + 1) * b]}
    for key in ("teacher", "student_global", "student_local"):
        x = batch[key]
        crops = x.view(-1, GLOBAL_BATCH, *x.shape[1:])  # (C, G, 3, H, W)
        out[key] = crops[:, rank * b : (rank + 1) * b].reshape(-1, *x.shape[1:])
    return out


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = small_cfg(drop_path_rate=0.0, warmup_epochs=0, batch_size_per_gpu=GLOBAL_BATCH // world)
    model = Mugs(cfg)
    model.prepare(distributed=world > 1)
    opt = build_optimizer(cfg, model.student)
    sched = build_schedules(cfg, iters_per_epoch=3, world_size=world)
    for step in range(STEPS):
        batch = make_batch(cfg, batch=GLOBAL_BATCH, seed=step)
        batch["weak"] = torch.tensor([True, False, False, True, True, False])  # 1 weak image on rank 0, 2 on rank 1
        train_step(model, opt, sched, _shard(batch, rank, world), step)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("student.")}
    return {k: v.clone() for k, v in state.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert get_rank() == rank and get_world_size() == world
        x = torch.full((2, 3), float(rank))
        assert all_gather_cat(x).tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        assert torch.equal(all_reduce_mean(x), torch.full((2, 3), 0.5)) and torch.equal(
            x, torch.full((2, 3), float(rank))
        )
        state = _train(rank, world)
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_helpers_are_no_ops_in_one_process():
    x = torch.randn(3, 2)
    assert get_rank() == 0 and get_world_size() == 1
    assert all_gather_cat(x) is x and all_reduce_mean(x) is x


def test_two_gloo_processes_equal_one_process(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    single = _train(0, 1)
    for key, value in single.items():
        for state in ranks:  # every rank holds the same gathered buffers, equal to one process's
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    ptr = int(single["student_memory.ptr"])
    assert ptr == STEPS * 3 and int(single["teacher_memory.ptr"]) == STEPS * GLOBAL_BATCH
