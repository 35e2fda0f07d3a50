"""`AugmentedLoader`: a .beton -> one strong training crop per image for the release's linear probe (spec 10.2).

The release trains its linear classifier on DeiT's strong pipeline: RandomResizedCrop(224, scale 0.08-1,
bicubic) with a horizontal flip, RandAugment `rand-m9-mstd0.5-inc1` and RandomErasing (p 0.25, per-pixel noise),
no colour jitter (timm drops it when RandAugment is on). Built here from the multi-crop loader's parts: the plan's
draws (`params`: crop windows, RandAugment ops and levels, erasing boxes), its DALI graph with one crop per image
(`dali_pipeline`) and its torch finishing step (`finish`: erasing, normalisation, dtype). One deviation beyond the
multi-crop loader's own: RandAugment runs on the full image before the crop (that graph's order, the release's
order for pretraining), where DeiT's pipeline applies it to the crop.

Batches come from `EpochSampler` (seeded per epoch, equal shards per rank, drop_last); a sample whose JPEG header
is damaged is replaced by a stand-in drawn from the seed, as in `MultiCropLoader`.
"""

import collections
import os
from pathlib import Path

import numpy as np
import torch

from mugs_fast.data.beton import open_beton
from mugs_fast.data.contract import BetonSource, default_device
from mugs_fast.data.finish import CropFinisher, finish_arrays, to_device
from mugs_fast.data.jpeg import BadJpeg, jpeg_size
from mugs_fast.data.params import CropPlan, _crop_windows, _erase_boxes, _rand_augment, colour_affine, plan_rng
from mugs_fast.data.replacement import Replacements, stand_in
from mugs_fast.data.sampler import EpochSampler
from mugs_fast.runtime import compute_dtype

CROP_SCALE = (0.08, 1.0)  # DeiT's RandomResizedCrop


def linear_plan(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray, size: int) -> CropPlan:
    """One strong crop per image (K = 1): window and flip, RandAugment, erasing; no blur, jitter or solarize."""
    strong = np.ones((1, len(heights)), bool)
    roi = _crop_windows(rng, heights[None], widths[None], np.array([CROP_SCALE])[:, None, :])
    ra_op, ra_bin, ra_sign = _rand_augment(rng, strong)
    ones, zeros = np.ones(strong.shape), np.zeros(strong.shape)
    colour, shift = colour_affine(ones, ones, ones, zeros, strong & False)  # the identity
    erase = _erase_boxes(rng, strong, np.array([[size]]))
    blur = np.zeros(strong.shape, np.float32)
    return CropPlan(roi, strong, ra_op, ra_bin, ra_sign, blur, colour, shift, ~strong, erase, np.array([size]))


class AugmentedLoader(BetonSource):
    """Batches (images (B, 3, S, S) in `dtype` on `device`, labels (B,) int64) of strong crops of this rank's share.

    set_epoch(e) then iterate, as `MultiCropLoader`; the same seed gives the same batches and augmentations.
    Samples whose header does not decode are replaced (`Replacements`: named once, counted as yielded).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        size: int = 224,
        device: str | torch.device | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        num_threads: int | None = None,
    ):
        from mugs_fast.data.dali_pipeline import build_pipeline  # DALI imported only here

        path = Path(path)
        self.reader = open_beton(path)
        self.sampler = EpochSampler(len(self.reader), batch_size, seed, rank, world_size)
        self.replacements = Replacements(path)
        self.device = default_device(device)
        self.dtype = dtype or compute_dtype("bf16", self.device)
        self.size = size
        self._finisher = CropFinisher(self.device, self.dtype)
        self._pending: collections.deque = collections.deque()  # batch numbers not yet fed to DALI
        self._fed: collections.deque = collections.deque()  # (batch, indices, plan, replaced) DALI is working on
        threads = num_threads or min(16, len(os.sched_getaffinity(0)))
        self._pipe = build_pipeline(
            self._feed,
            batch_size=batch_size,
            crops_per_image=1,
            global_size=size,
            device=self.device,
            num_threads=threads,
            prefetch=2,
            hw_decoder_load=0.75,
        )

    def _decodes(self, i: int) -> bool:
        try:
            jpeg_size(self.reader[i][0])
        except BadJpeg as e:
            self.replacements.mark(i, str(e))
            return False
        return True

    def _feed(self):
        """DALI's external source: the next batch's JPEGs and their crop parameters."""
        from mugs_fast.data.dali_pipeline import source_batch

        if not self._pending:
            raise StopIteration
        batch, s = self._pending.popleft(), self.sampler
        indices, replaced = s.batch(batch).copy(), 0
        for slot, i in enumerate(indices):
            if not self._decodes(int(i)):
                j = stand_in(s.seed, int(i), len(self.reader), self._decodes)
                if j is None:
                    raise self.replacements.not_found(int(i))
                indices[slot], replaced = j, replaced + 1
        shapes = np.stack([self.reader.heights[indices], self.reader.widths[indices]], 1)
        plan = linear_plan(plan_rng(s.seed, s.epoch, s.rank, batch), shapes[:, 0], shapes[:, 1], self.size)
        self._fed.append((batch, indices, plan, replaced))
        return source_batch([self.reader[int(i)][0] for i in indices], shapes, plan, batch)

    def __iter__(self):
        """The batches of the current epoch, from its first."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        s = self.sampler
        self._pending.extend(range(len(s)))
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for _ in range(len(s)):
                crops_out, _tags = self._pipe.run(stream)
                batch, indices, plan, replaced = self._fed.popleft()
                self.replacements.num_replaced += replaced
                dense = crops_out.as_tensor()
                crops = feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.uint8, device=self.device), stream)
                host = {f"p.{k}": v for k, v in finish_arrays(plan, slice(0, 1)).items()}
                host["label"] = self.reader.labels[indices].astype(np.int64)
                on_device = to_device(host, self.device)  # one host -> device copy
                params = {k[2:]: v for k, v in on_device.items() if k.startswith("p.")}
                noise_seed = np.random.SeedSequence([s.seed, s.epoch, s.rank, batch, 1]).generate_state(1)[0]
                generator = torch.Generator(self.device).manual_seed(int(noise_seed))
                images = self._finisher(crops.view(1, len(indices), *crops.shape[1:]), params, generator)
                yield images, on_device["label"].clone()
        finally:
            self._drain()

    def _drain(self) -> None:
        """Lets DALI finish (and drops) what it was fed, so the next epoch starts clean."""
        from mugs_fast.data.dali_pipeline import drain

        self._pending.clear()
        drain(self._pipe)
        self._fed.clear()
