"""mugs_fast.runtime: stop signals, host-side votes, the CPU thread split."""

import os
import signal

import pytest
import torch

from mugs_fast.config import MugsConfig
from mugs_fast.runtime import (
    Runtime,
    StopSignal,
    collective_failure,
    cpu_thread_budget,
    cpu_threads,
    init_runtime,
    shutdown,
)


def test_sigterm_and_sigint_set_the_flag_instead_of_stopping():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert stop.received is None and stop.name == ""
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_sigint_interrupts_at_once():
    with StopSignal() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)


def test_cpu_threads_leave_torch_at_least_one_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_threads(12) == (7, 1) and cpu_threads(3) == (3, 5) and cpu_threads(0) == (0, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 2 cores per process
    assert cpu_threads(12) == (1, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_threads(2) == (1, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU split applies without CUDA")
def test_runtime_of_a_single_cpu_process_and_its_thread_budget():
    before = torch.get_num_threads()
    rt = init_runtime(MugsConfig(num_workers=1))
    try:
        assert (rt.rank, rt.world_size, rt.device.type, rt.is_main, rt.distributed) == (0, 1, "cpu", True, False)
        assert rt.vote(True, False) == [True, False] and rt.gather_objects("x") == ["x"]
        assert rt.loader_threads == 1
    finally:
        shutdown(rt)
    assert torch.get_num_threads() == before
    with cpu_thread_budget(1) as loader_threads:
        assert loader_threads == 1
    assert torch.get_num_threads() == before


def test_collective_failure_leaves_other_errors_alone():
    # the timed-out and lost-connection paths run in test_train.py (2 processes, one frozen)
    pair = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    assert collective_failure(pair, RuntimeError("CUDA error: out of memory"), 10) is None
    single = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert collective_failure(single, RuntimeError("Timed out waiting 3000ms for recv operation"), 10) is None
