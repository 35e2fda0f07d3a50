"""`SyntheticLoader`: random crops at the training shapes, already on the device, to measure the model alone.

It is a `MultiCropSource` (`contract.py`) with the keys `teacher`, `student_global`, `student_local` and `weak`.
A pool of images (all crops of each: N(0, 1) noise in the loader's dtype, and a weak flag) is drawn once
from the seed, the same on every rank. Each step's global batch is a seeded draw of pool images; rank r
takes its rows [r*B, (r+1)*B). So W ranks with B images each see exactly what one process with W*B images
sees, in the same order. An epoch has as many images as ImageNet-1k, so schedules look like a real run's.
"""

import numpy as np
import torch

from mugs_fast.data.contract import MUGS_CROPS, CropSpec
from mugs_fast.data.finish import to_device

IMAGENET_TRAIN_IMAGES = 1_281_167
POOL_SIZE = 256


class SyntheticLoader:
    """Batches of random crops: teacher (2B,3,G,G), student_global (2B,3,G,G), student_local (L*B,3,l,l), weak (B,)."""

    def __init__(
        self,
        batch_size: int,
        *,
        crops: CropSpec = MUGS_CROPS,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        epoch_images: int = IMAGENET_TRAIN_IMAGES,
    ) -> None:
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_batches = epoch_images // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(f"an epoch of {epoch_images} images holds no global batch of {batch_size * world_size}")
        self.epoch, self.position = 0, 0
        self.device = torch.device(device)
        g = torch.Generator(self.device).manual_seed(seed)
        noise = lambda *shape: torch.randn(POOL_SIZE, *shape, generator=g, device=self.device).to(dtype)
        g_size, l_size = crops.global_size, crops.local_size
        self._teacher = noise(2, 3, g_size, g_size)  # (P, 2, 3, G, G)
        self._student_global = noise(2, 3, g_size, g_size)
        self._student_local = noise(crops.local_crops_number, 3, l_size, l_size)  # (P, L, 3, l, l)
        self._weak = torch.rand(POOL_SIZE, generator=g, device=self.device) < 0.5

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_replaced(self) -> int:
        """Always 0: random crops have no undecodable samples."""
        return 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("world_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state saved with {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _rows(self, batch: int) -> torch.Tensor:
        """This rank's pool rows (B,) of the current epoch's batch `batch`."""
        rng = np.random.default_rng([self.seed, self.epoch, batch])
        rows = rng.integers(POOL_SIZE, size=self.batch_size * self.world_size)  # the global batch
        start = self.rank * self.batch_size
        return to_device({"rows": rows[start : start + self.batch_size]}, self.device)["rows"]  # no host sync

    @staticmethod
    def _crop_major(x: torch.Tensor) -> torch.Tensor:
        """(B, C, 3, H, W) -> (C*B, 3, H, W): all images' crop 0, then crop 1, ..."""
        return x.transpose(0, 1).reshape(-1, *x.shape[2:])

    def __iter__(self):
        if self.position >= self.num_batches:
            self.position = 0
        while self.position < self.num_batches:
            rows = self._rows(self.position)
            self.position += 1
            yield {
                "teacher": self._crop_major(self._teacher[rows]),
                "student_global": self._crop_major(self._student_global[rows]),
                "student_local": self._crop_major(self._student_local[rows]),
                "weak": self._weak[rows],
            }
