"""`EvalLoader`: a .beton -> evaluation images: Resize(shorter side, bicubic) -> CenterCrop -> ImageNet normalise.

This is the kNN / linear-probe transform of DINO and the release (Resize(256) -> CenterCrop(224)); for runs on
smaller crops the resize scales with the crop (`resize_size = round(crop_size * 256 / 224)`). The window that
torchvision's Resize + CenterCrop keeps is computed on the host from the image size (its exact integer
arithmetic), and one DALI graph decodes (nvJPEG on GPU, DALI's CPU operators otherwise) and resamples that
window to the crop size in one bicubic, antialiased resize (the training loader's crop op), then normalises.

Samples come in file order. With several ranks each takes a contiguous share of equal length (the last one
padded), so features can be all-gathered and stay in file order; padding rows, and samples that do not decode
cleanly (the training loader's checks, `mugs_fast.data.jpeg.check_jpeg`: the header, and once per sample a strict
decode in background threads), carry the label -1 and are to be dropped.
"""

import collections
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from mugs_fast.data.beton import BetonError, open_beton
from mugs_fast.data.dali_pipeline import cut_window, drain, no_origin_tracing
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD, to_device
from mugs_fast.data.jpeg import BadJpeg, check_jpeg
from mugs_fast.data.lookahead import CheckAhead

INVALID = -1  # label of padding rows and undecodable samples


def resize_for(crop_size: int) -> int:
    """The shorter side to resize to before a centre crop of `crop_size` (256 for 224)."""
    return round(crop_size * 256 / 224)


def shard(num_samples: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous share of range(num_samples), padded to ceil(N / W) entries.

    Returns (indices (n,) int64, real (n,) bool); padding entries repeat sample 0 and are not real.
    """
    per_rank = -(-num_samples // world_size)
    positions = np.arange(rank * per_rank, (rank + 1) * per_rank)
    real = positions < num_samples
    return np.where(real, positions, 0).astype(np.int64), real


def centre_windows(heights: np.ndarray, widths: np.ndarray, resize_size: int, crop_size: int) -> np.ndarray:
    """Source windows (N, 4: y0, x0, y1, x1, float32 pixels) of Resize(resize_size) -> CenterCrop(crop_size).

    torchvision's arithmetic: the shorter side becomes resize_size, the longer int(resize_size * long / short);
    the crop starts at int(round((side - crop) / 2)) of the resized image.
    """
    short, long = np.minimum(heights, widths), np.maximum(heights, widths)
    resized_long = (resize_size * long / short).astype(np.int64)
    new_h = np.where(heights <= widths, resize_size, resized_long)
    new_w = np.where(heights <= widths, resized_long, resize_size)
    top, left = np.round((new_h - crop_size) / 2).astype(np.int64), np.round((new_w - crop_size) / 2).astype(np.int64)
    sy, sx = heights / new_h, widths / new_w  # source pixels per resized pixel
    return np.stack([top * sy, left * sx, (top + crop_size) * sy, (left + crop_size) * sx], -1).astype(np.float32)


@pipeline_def
def _eval_pipeline(source, crop_size: int, decoder: str):
    jpegs, windows = fn.external_source(source=source, num_outputs=2, batch=True, parallel=False)
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False)
    return fn.crop_mirror_normalize(
        cut_window(images, windows, crop_size),
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        output_layout="CHW",
        dtype=types.FLOAT,
    )


class EvalLoader:
    """Batches (images (b, 3, S, S) float32 on `device`, labels (b,) int64) of this rank's share of a .beton.

    Every rank yields the same number of rows (`len(loader.indices)`); a label of -1 marks a row to drop.
    device: 'cuda' (nvJPEG 'mixed' decoding, GPU ops) or 'cpu'. num_threads: DALI's CPU threads.
    verify: decode every sample once on the host (libjpeg-turbo, warnings are errors) in num_threads background
        threads, as `MultiCropLoader` does; False: the header check only.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        crop_size: int = 224,
        resize_size: int | None = None,
        device: str | torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = None,
        verify: bool = True,
    ):
        path = Path(path)
        self.reader = open_beton(path)
        if len(self.reader) == 0:
            raise BetonError(f"{path} holds no samples")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.crop_size, self.resize_size = crop_size, resize_size or resize_for(crop_size)
        self.indices, self._real = shard(len(self.reader), rank, world_size)
        self._pending: collections.deque = collections.deque()  # batches (start, indices, real) not yet fed to DALI
        self._fed: collections.deque = collections.deque()  # labels of the batches DALI is working on
        self.verify = verify
        self._checked = np.zeros(len(self.reader), bool)
        self._corrupt: dict[int, str] = {}  # sample index -> why it does not decode
        threads = num_threads or min(16, len(os.sched_getaffinity(0)))
        self._ahead = CheckAhead(self._inspect, threads) if verify else None
        on_gpu = self.device.type == "cuda"
        with no_origin_tracing():
            self._pipe = _eval_pipeline(
                self._feed,
                crop_size,
                "mixed" if on_gpu else "cpu",
                batch_size=batch_size,
                num_threads=threads,
                device_id=self.device.index if on_gpu else None,
                prefetch_queue_depth=2,
            )
            self._pipe.build()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_classes(self) -> int:
        return self.reader.num_classes

    @property
    def corrupt_samples(self) -> dict[int, str]:
        """Sample index -> reason, for every sample found not to decode (its rows carry the label -1)."""
        return dict(self._corrupt)

    def _inspect(self, i: int) -> str | None:
        """Why sample i does not decode, or None. Only reads: runs in the checking threads."""
        try:
            check_jpeg(self.reader[i][0], decode=self.verify)
        except BadJpeg as e:
            return str(e)
        return None

    def _record(self, i: int, why: str | None) -> None:
        if self._checked[i]:
            return
        self._checked[i] = True
        if why is not None:
            self._corrupt[i] = why
            warnings.warn(f"{self.reader.path}: sample {i} is left out ({why})", RuntimeWarning, stacklevel=3)

    def _check_ahead(self) -> None:
        """Keeps the strict check of the next batches' unchecked samples running in the background threads."""
        if self._ahead is not None:
            self._ahead.submit_next((key, indices[~self._checked[indices]]) for key, indices, _ in self._pending)

    def _labels(self, key: int, indices: np.ndarray, real: np.ndarray) -> np.ndarray:
        """The samples' labels, INVALID for padding and for samples that do not decode cleanly."""
        if self._ahead is not None:
            for i, why in self._ahead.take(key):
                self._record(i, why)
        for i in indices:
            if not self._checked[i]:
                self._record(int(i), self._inspect(int(i)))
        bad = np.array([int(i) in self._corrupt for i in indices], bool)
        return np.where(real & ~bad, self.reader.labels[indices], INVALID)

    def _feed(self) -> tuple[list[np.ndarray], np.ndarray]:
        """DALI's external source: the next batch's JPEGs (a decodable stand-in where a sample is not) and their
        source windows (b, 4)."""
        if not self._pending:
            raise StopIteration
        key, indices, real = self._pending.popleft()
        self._check_ahead()
        labels = self._labels(key, indices, real)
        valid = np.flatnonzero(labels != INVALID)
        if len(valid) == 0:
            raise RuntimeError(f"{self.reader.path}: no decodable sample among {indices.tolist()}")
        self._fed.append(labels)
        samples = np.where(labels != INVALID, indices, indices[valid[0]])
        r = self.reader
        windows = centre_windows(r.heights[samples], r.widths[samples], self.resize_size, self.crop_size)
        return [r[int(i)][0] for i in samples], windows

    def __iter__(self):
        """This rank's batches, in file order."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        for start in range(0, len(self.indices), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            self._pending.append((start, self.indices[chunk], self._real[chunk]))
        self._check_ahead()
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for _ in range(len(self)):
                (images,) = self._pipe.run(stream)
                dense = images.as_tensor()
                out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
                labels = to_device({"labels": self._fed.popleft()}, self.device)["labels"]
                yield feed_ndarray(dense, out, cuda_stream=stream), labels
        finally:
            self._drain()

    def _drain(self) -> None:
        """Lets DALI finish (and drops) what it was fed, so the next pass starts clean."""
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.cancel()
        drain(self._pipe)
        self._fed.clear()
