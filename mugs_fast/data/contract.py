"""What every multi-crop loader offers the training loop (`MultiCropSource`) and the crops it makes (`CropSpec`).

The loaders: `MultiCropLoader` (DALI, `loader.py`), `ReferenceLoader` (the release's PIL pipeline,
`reference.py`) and `SyntheticLoader` (random crops on the device, `synthetic.py`). Each is built from a
`CropSpec` and yields one dict per batch with at least these keys, crop-major (all images' crop 0, then crop 1):
    teacher         (2B, 3, G, G)   the weak global crops 0 and 1
    student_global  (2B, 3, G, G)   crops 2 and 3
    student_local   (L*B, 3, s, s)  the local crops
    weak            (B,) bool       the image's student global crops are weak
The .beton loaders add label, index and strong_local (see `MultiCropLoader`).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from mugs_fast.data.params import ERASE_P, GLOBAL_SCALE, LOCAL_SCALE, STRONG_P
from mugs_fast.data.replacement import Replacements
from mugs_fast.data.sampler import EpochSampler


@dataclass(frozen=True)
class CropSpec:
    """Mugs' multi-crop shapes and the augmentation's free parameters: 4 global crops of global_size px and
    local_crops_number local crops of local_size px (224 / 96 px and 10 local crops in Mugs; smaller ones for
    tests and demos); the RandomResizedCrop area ranges of both, the probability that a student crop is strong,
    and the probability of RandomErasing on a strong crop. Defaults: the release's.
    """

    local_crops_number: int = 10
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = GLOBAL_SCALE
    local_scale: tuple[float, float] = LOCAL_SCALE
    strong_p: float = STRONG_P
    erase_p: float = ERASE_P

    def __post_init__(self) -> None:
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def crops_per_image(self) -> int:
        return 4 + self.local_crops_number

    @classmethod
    def from_config(cls, cfg) -> "CropSpec":
        """The crops of a `MugsConfig` (the release's flags --local_crops_number, --global_crop_size, --size_crops,
        --global_crops_scale, --local_crops_scale, --prob (P(strong) = 1 - prob) and --re_prob)."""
        return cls(
            cfg.local_crops_number,
            cfg.global_crop_size,
            cfg.size_crops[0],
            tuple(cfg.global_crops_scale),
            tuple(cfg.local_crops_scale),
            1 - cfg.prob,
            cfg.re_prob,
        )


MUGS_CROPS = CropSpec()  # the paper's: 10 local crops, 224 / 96 px


@runtime_checkable
class MultiCropSource(Protocol):
    """A loader as the training loop and the checkpoint use it: one rank's batches of one epoch at a time.

    Resuming is exact: `load_state_dict(state_dict())` in a new process, then `set_epoch(e)` with the saved
    epoch, yields exactly the batches that were not yet yielded.
    """

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        ...

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The current epoch's batches from the current position; a finished epoch starts over."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate (keeps the position when it is the current one)."""
        ...

    def state_dict(self) -> dict:
        """The epoch and the position inside it (and what the loader learned about the data)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def num_replaced(self) -> int:
        """How many slots of the batches yielded so far held a stand-in for an undecodable sample."""
        ...


class BetonSource:
    """The part of `MultiCropSource` that the .beton loaders share: this rank's sampler (epoch, position) and the
    record of the undecodable samples replaced. A subclass sets `sampler` and `replacements` and adds `__iter__`."""

    sampler: EpochSampler
    replacements: Replacements

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Epoch and position inside it (the next batch to yield), and the undecodable samples found so far."""
        return {"sampler": self.sampler.state_dict(), "corrupt": dict(self.replacements.corrupt)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.replacements.load(state.get("corrupt", {}))

    @property
    def corrupt_samples(self) -> dict[int, str]:
        """Sample index -> reason, for every sample found not to decode (each replaced by another sample)."""
        return dict(self.replacements.corrupt)

    @property
    def num_replaced(self) -> int:
        """How many slots of the batches yielded so far held a replacement for an undecodable sample."""
        return self.replacements.num_replaced


def default_device(device: str | torch.device | None) -> torch.device:
    """torch.device of `device`, default cuda when available; 'cuda' gets the current device's index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
