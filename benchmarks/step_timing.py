"""How a Mugs step is timed: device clocks, the matmul peak, a model stepping through `train_step`, timed loops over
batches (warm-up first, one host sync at the end), the host-GPU sync count, and the switch to the PyTorch kernels.
"""

import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from mugs_fast.config import MugsConfig
from mugs_fast.mugs import Mugs, train_step
from mugs_fast.optim import build_optimizer, build_schedules
from mugs_fast.runtime import seed_everything

ITERS_PER_EPOCH = 1000  # any length: only the schedules' values at the timed steps matter
SYNC_CHECK_STEPS = 2  # steps run under PyTorch's sync debug mode, after the timing


class Clock:
    """Elapsed time of device work: CUDA events (the host syncs only in `seconds`), or the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self._t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()  # sync: the one wait of a timed loop, after its last step
        return self._start.elapsed_time(end) / 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device) -> tuple[float, str]:
    """The matmul rate of `device`: median of 10 bf16 8192^3 products on a GPU (fp32 512^3 on a CPU, smoke only)."""
    cuda = device.type == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))  # random data: never time zeros
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10 if cuda else 3):
        clock = Clock(device)
        clock.start()
        a @ b
        times.append(clock.seconds())
    return 2 * size**3 / statistics.median(times) / 1e12, "bf16" if cuda else "fp32"


class Stepper:
    """A Mugs model with its optimizer and schedules on `device`; each call is one `train_step` at the next step.

    Steps start after the last-layer freeze, so that every timed step updates every parameter, as most of a run does.
    """

    def __init__(self, cfg: MugsConfig, device: torch.device) -> None:
        seed_everything(cfg.seed)  # the same initial weights as a training run's
        self.model = Mugs(cfg).to(device)
        self.optimizer = build_optimizer(cfg, self.model.student)
        self.schedules = build_schedules(cfg, ITERS_PER_EPOCH)
        self.step = ITERS_PER_EPOCH * min(cfg.freeze_last_layer, cfg.epochs - 1)

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        train_step(self.model, self.optimizer, self.schedules, batch, self.step)
        self.step += 1


def synthetic_batch(cfg: MugsConfig, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random crops on `device` shaped as the loaders deliver them: teacher / student_global (2B, 3, G, G),
    student_local (L*B, 3, l, l), weak (B,) bool."""
    g = torch.Generator(device).manual_seed(0)
    crops = lambda n, s: torch.randn(n, 3, s, s, generator=g, device=device).to(dtype)
    big, small = cfg.global_crop_size, cfg.size_crops[0]
    return {
        "teacher": crops(2 * batch, big),
        "student_global": crops(2 * batch, big),
        "student_local": crops(cfg.local_crops_number * batch, small),
        "weak": torch.rand(batch, generator=g, device=device) < 0.5,
    }


def time_steps(step: Callable[[], float], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Runs `warmup` untimed calls of `step`, then `steps` timed ones. `step` returns the host seconds it spent getting
    its batch. Returns (seconds of the timed calls, share of their host time spent getting batches)."""
    for _ in range(warmup):
        step()
    synchronize(device)  # sync: the warm-up's work stays out of the timing
    clock, wait, t0 = Clock(device), 0.0, time.perf_counter()
    clock.start()
    for _ in range(steps):
        wait += step()
    seconds = clock.seconds()
    return seconds, wait / (time.perf_counter() - t0)


def on_batch(stepper: Stepper, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """A step on a fixed, device-resident batch (no waiting)."""

    def step() -> float:
        stepper(batch)
        return 0.0

    return step


def fed_from(batches: Iterator[dict], stepper: Stepper) -> Callable[[], float]:
    """A step on the next batch of `batches`, returning the host seconds spent getting it."""

    def step() -> float:
        t = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t
        stepper(batch)
        return waited

    return step


def endless(loader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def syncs_per_step(step: Callable[[], float], steps: int = SYNC_CHECK_STEPS) -> float:
    """Host-GPU synchronisations per call of `step` that PyTorch reports (its sync debug mode); 0 is the goal."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught) / steps
