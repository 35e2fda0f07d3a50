"""Which samples each rank reads, batch by batch: seeded per-epoch shuffle, equal shards, resumable position.

Every rank draws the same permutation of the dataset for an epoch (from `seed` and the epoch), keeps the
first `num_batches * batch_size * world_size` entries (drop_last: the rest of the epoch is skipped, a
different rest every epoch) and takes every `world_size`-th of them, as torch's DistributedSampler does.
So the shards are disjoint and every rank runs the same number of batches, which DDP needs.

The position inside the epoch is the index of the next batch; `state_dict()` holds it (with the epoch), so a
resumed run sees exactly the batches it had not seen yet.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class EpochSampler:
    """Per-rank batches of sample indices for one epoch at a time.

    num_samples: dataset size. Raises ValueError when a rank would get no full batch.
    `batch(i)` -> int64 array (batch_size,) of the i-th batch of this rank in the current epoch.
    """

    num_samples: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0  # index of the next batch to hand out in this epoch

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank}, world_size {self.world_size}")
        if len(self) == 0:
            per_rank = self.num_samples // self.world_size
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {per_rank} samples each of the "
                f"{self.world_size} rank(s) gets from a dataset of {self.num_samples}: no full batch (drop_last)"
            )
        self._perm_epoch = None

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (drop_last)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Starts `epoch` from its first batch (unless it is the epoch a loaded state is in)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _shard(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
            used = len(self) * self.batch_size * self.world_size
            self._shard_cache = perm[:used][self.rank :: self.world_size]
            self._perm_epoch = self.epoch
        return self._shard_cache

    def batch(self, i: int) -> np.ndarray:
        """Sample indices of this rank's batch i of the current epoch."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range for {len(self)} batches")
        return self._shard()[i * self.batch_size : (i + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores epoch and position; the seed, world size, batch size and dataset size must match."""
        for key in ("seed", "world_size", "batch_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}: "
                    "the remaining batches of the epoch would differ"
                )
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"position {state['position']} out of range for {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
