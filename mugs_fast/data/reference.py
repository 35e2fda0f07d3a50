"""The Mugs release's CPU data path over a .beton: the baseline of the loader benchmark and a second opinion.

`ReleaseAugmentation` is the release's `DataAugmentation` (src/multicropdataset.py, with the prefetcher on,
its default): PIL + torchvision transforms, timm's RandAugment 'rand-m9-mstd0.5-inc1' on the full image
before the crop and timm's RandomErasing(0.25, 'pixel') on [0, 1] tensors. `ReferenceLoader` runs it in
DataLoader worker processes and returns the same batches as `MultiCropLoader` (same keys, shapes, sample
order for the same seed), normalised on the device as the release's `data_prefetcher` does.

The release pinned timm 0.4.5 and shipped its own copy of timm's RandAugment; with timm 1.0 the op list,
level mappings, magnitude noise, fill colour and random interpolation are the same, but timm 1.0 draws the
two ops *with* replacement when no weights are given while the release draws them without: uniform choice
weights restore the release's behaviour. And timm 1.0's PosterizeIncreasing at level 10 asks Pillow for 0
bits, which recent Pillow refuses (ValueError) where the release's Pillow made the image black: wrapped
here. timm's RandomErasing is unchanged (same area, aspect, tries).
A sample that does not decode cleanly (`mugs_fast.data.jpeg.check_jpeg` in the worker: PIL decodes damaged
entropy-coded data without an error) is replaced, counted and named as `MultiCropLoader` does, with the same
stand-in; the release stopped on the ones PIL refuses and trained on the others.
"""

import io
import os
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mugs_fast.data.beton import BetonReader
from mugs_fast.data.contract import MUGS_CROPS, BetonSource, CropSpec, default_device
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD
from mugs_fast.data.jpeg import BadJpeg, check_jpeg
from mugs_fast.data.params import RA_FILL, RATIO
from mugs_fast.data.replacement import Replacements, stand_in
from mugs_fast.data.sampler import EpochSampler


class GaussianBlur:
    """The release's PIL blur: radius U(0.1, 2.0), applied when random() <= p."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """The release's PIL solarisation (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def release_rand_augment(size: int):
    """timm's rand-m9-mstd0.5-inc1 with the release's hparams and op choice without replacement."""
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": int(size * 0.45), "img_mean": RA_FILL})
    ra.choice_weights = np.full(len(ra.ops), 1.0 / len(ra.ops))  # np.random.choice(..., replace=False)
    for op in ra.ops:
        if op.name == "PosterizeIncreasing":
            op.aug_fn = _posterize
    return ra


def _posterize(img, bits_to_keep, **_):
    """timm's posterize; 0 bits (level 10) gives black as the release's Pillow did (Pillow >= 11 raises)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def strong_transform(size: int, scale: tuple, erase_p: float = 0.25) -> transforms.Compose:
    """The release's `strong_transforms` (hflip 0.5, no colour aug, prefetcher: no normalise; RandomErasing
    with probability erase_p, its --re_prob)."""
    from timm.data.random_erasing import RandomErasing

    return transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            release_rand_augment(size),
            transforms.RandomResizedCrop(size, scale=scale, ratio=RATIO, interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            RandomErasing(erase_p, mode="pixel", max_count=1, num_splits=0, device="cpu"),
        ]
    )


def weak_transform(size: int, scale: tuple, blur_p: float, solarize_p: float = 0.0) -> transforms.Compose:
    """DINO's weak crop: RandomResizedCrop -> flip / colour jitter / grayscale -> blur (-> solarize)."""
    steps = [
        transforms.RandomResizedCrop(size, scale=scale, ratio=RATIO, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        GaussianBlur(blur_p),
    ]
    if solarize_p:
        steps.append(Solarization(solarize_p))
    return transforms.Compose(steps + [transforms.ToTensor()])


class ReleaseAugmentation:
    """The release's DataAugmentation: image -> (4 + L crops as [0, 1] tensors, weak flag, local strong flags)."""

    def __init__(self, crops: CropSpec = MUGS_CROPS):
        self.prob, self.local_crops_number = 1 - crops.strong_p, crops.local_crops_number
        g, lo = crops.global_scale, crops.local_scale
        self.global_transfo1 = weak_transform(crops.global_size, g, blur_p=1.0)
        self.global_transfo2 = weak_transform(crops.global_size, g, blur_p=0.1, solarize_p=0.2)
        self.global_transfo3 = strong_transform(crops.global_size, g, crops.erase_p)
        self.local_transfo = weak_transform(crops.local_size, lo, blur_p=0.5)
        self.local_transfo2 = strong_transform(crops.local_size, lo, crops.erase_p)

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        strong = self.prob < 1.0 and random.random() > self.prob  # the release's coin: P(strong) = 1 - prob
        if strong:
            crops += [self.global_transfo3(image), self.global_transfo3(image)]
        else:
            crops += [self.global_transfo1(image), self.global_transfo2(image)]
        strong_local = []
        for _ in range(self.local_crops_number):
            strong_local.append(self.prob < 1.0 and random.random() > self.prob)
            crops.append(self.local_transfo2(image) if strong_local[-1] else self.local_transfo(image))
        return crops, not strong, strong_local


class BetonMultiCropDataset(torch.utils.data.Dataset):
    """(sample index, seed key) -> the release's crops of that .beton sample, decoded with PIL.

    The Python, numpy and torch RNGs are seeded from the key before each sample, so a batch does not
    depend on which worker makes it. A sample that does not decode cleanly is replaced by its stand-in (from
    `seed`, as in `MultiCropLoader`); each worker checks a sample once.
    """

    def __init__(self, path, augmentation: ReleaseAugmentation, seed: int = 0):
        self.reader, self.augmentation, self.seed = BetonReader(path), augmentation, seed
        self._why_bad: dict[int, str | None] = {}  # this process's verdicts: sample index -> reason or None

    def __len__(self) -> int:
        return len(self.reader)

    def _decodes(self, i: int) -> bool:
        if i not in self._why_bad:
            try:
                check_jpeg(self.reader[i][0])
                self._why_bad[i] = None
            except BadJpeg as e:
                self._why_bad[i] = str(e)
        return self._why_bad[i] is None

    def _sample(self, index: int) -> int:
        """index, or its stand-in if it does not decode cleanly."""
        if self._decodes(index):
            return index
        j = stand_in(self.seed, index, len(self.reader), self._decodes)
        if j is None:
            raise RuntimeError(f"{self.reader.path}: found no decodable sample to replace sample {index}")
        return j

    def __getitem__(self, item):
        """(crops, weak, strong_local, label, sample index used, (index, reason) if it was replaced else None)."""
        index, key = item
        sample = self._sample(index)
        replaced = None if sample == index else (index, self._why_bad[index])
        jpeg, label = self.reader[sample]
        state = np.random.SeedSequence(key).generate_state(3)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        torch.manual_seed(int(state[2]))
        image = Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB")
        crops, weak, strong_local = self.augmentation(image)
        return crops, weak, strong_local, label, sample, replaced


def _collate(samples):
    """Crop-major stacks per resolution: (2B, ...) teacher, (2B, ...) student globals, (L*B, ...) locals."""
    crops = list(zip(*[s[0] for s in samples], strict=True))  # crops[k]: crop k of every image
    stack = lambda rows: torch.stack([c for row in rows for c in row]) if rows else None
    return {
        "teacher": stack(crops[:2]),
        "student_global": stack(crops[2:4]),
        "student_local": stack(crops[4:]),
        "weak": torch.tensor([s[1] for s in samples]),
        "strong_local": torch.tensor([s[2] for s in samples], dtype=torch.bool).T.reshape(-1),
        "label": torch.tensor([s[3] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s[4] for s in samples], dtype=torch.int64),
        "replaced": [s[5] for s in samples if s[5] is not None],  # (sample index, reason) per replaced slot
    }


class _Batches:
    """Batch sampler: this rank's batches from the sampler's position, each entry (sample index, seed key)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler) - self.sampler.position

    def __iter__(self):
        s = self.sampler
        for b in range(s.position, len(s)):
            yield [(int(i), [s.seed, s.epoch, s.rank, b, slot]) for slot, i in enumerate(s.batch(b))]


class ReferenceLoader(BetonSource):
    """The release's pipeline with `MultiCropLoader`'s interface and output dict (fp32 by default).

    num_workers: DataLoader worker processes (the release used 12 per GPU); 0 runs in this process. They are
    started once, with 'spawn' (forking a process that runs DALI or torch threads can deadlock), and kept.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        crops: CropSpec = MUGS_CROPS,
        device: str | torch.device | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        num_workers: int | None = None,
    ):
        self.dataset = BetonMultiCropDataset(path, ReleaseAugmentation(crops), seed)
        self.sampler = EpochSampler(len(self.dataset), batch_size, seed, rank, world_size)
        self.device = default_device(device)
        self.dtype, self.local_size = dtype, crops.local_size
        self.num_workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
        self._loader = None
        self.replacements = Replacements(self.dataset.reader.path)

    def _count_replaced(self, replaced: list[tuple[int, str]]) -> None:
        """Counts a batch's replacements and names each undecodable sample once."""
        self.replacements.num_replaced += len(replaced)
        for i, why in replaced:
            self.replacements.mark(i, why)

    def __iter__(self):
        s = self.sampler
        if s.position >= len(s):
            s.position = 0
        if self._loader is None:
            workers = self.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=_Batches(s),
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                multiprocessing_context="spawn" if workers > 0 else None,
            )
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        for batch in self._loader:
            self._count_replaced(batch.pop("replaced"))
            out = {k: v.to(self.device, non_blocking=True) if v is not None else None for k, v in batch.items()}
            for key in ("teacher", "student_global", "student_local"):  # the release's data_prefetcher
                if out[key] is None:
                    out[key] = torch.empty((0, 3, self.local_size, self.local_size), device=self.device)
                out[key] = out[key].float().sub_(mean).div_(std).to(self.dtype)
            s.position += 1
            yield out
