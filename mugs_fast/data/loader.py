"""`MultiCropLoader`: a .beton -> batches of Mugs' 14 crops per image, augmented by one DALI graph.

    loader = MultiCropLoader("train.beton", batch_size=128, rank=rank, world_size=world_size)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # dict of tensors on the training device
            ...
        state = loader.state_dict()  # any time: the position inside the epoch

Host side (this file): the sampler picks each batch's samples, their JPEG bytes come zero-copy from the
.beton, samples that do not decode cleanly are replaced (a header check, and once per sample a strict decode
in background threads: `mugs_fast.data.jpeg`), and the augmentation plan is drawn (`mugs_fast.data.params`);
DALI decodes and cuts the crops (`dali_pipeline`), torch finishes them (`finish`). The DALI graph is built once
per loader.
"""

import collections
import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mugs_fast.data.beton import BetonReader
from mugs_fast.data.finish import CropFinisher, finish_arrays, to_device
from mugs_fast.data.jpeg import BadJpeg, check_jpeg
from mugs_fast.data.lookahead import CheckAhead
from mugs_fast.data.params import CropPlan, plan_rng, sample_plan
from mugs_fast.data.sampler import EpochSampler

MAX_REPLACEMENT_TRIES = 100


def default_device(device) -> torch.device:
    """torch.device of `device`, default cuda when available; 'cuda' gets the current device's index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def stand_in(seed: int, i: int, num_samples: int, decodes: Callable[[int], bool]) -> int | None:
    """The replacement for undecodable sample i, the same one every time: the first sample that `decodes` among
    MAX_REPLACEMENT_TRIES drawn from (seed, i); None if none does."""
    rng = np.random.default_rng([seed, i])
    for j in rng.integers(num_samples, size=MAX_REPLACEMENT_TRIES):
        if decodes(int(j)):
            return int(j)
    return None


class MultiCropLoader:
    """Batches of multi-crop views from a .beton (JPEG images + labels, written by data_prep).

    Each batch is a dict on `device`:
        teacher         (2B, 3, G, G)  crops 0 and 1 (weak-1, weak-2), crop-major rows: [crop 0 of all B, crop 1]
        student_global  (2B, 3, G, G)  crops 2 and 3: both strong, or fresh weak-1 / weak-2 (one coin per image)
        student_local   (L*B, 3, s, s) crop-major; each strong with p=0.5, else weak-local
        weak            (B,) bool      the image's student global crops are weak
        label           (B,) int64
        index           (B,) int64     sample indices in the .beton (after replacing undecodable ones)
        strong_local    (L*B,) bool    which local crops are strong (rows of student_local)
    Crops are ImageNet-normalised, in `dtype` (default bf16 on GPU, fp32 on CPU).

    device: 'cuda' (DALI decodes with nvJPEG incl. the hardware decoder, all ops on the GPU) or 'cpu'.
    seed: shuffling and all augmentation randomness; the same seed gives the same batches.
    rank, world_size: this process's shard; every rank gets len(loader) batches (drop_last).
    global_size, local_size: crop sizes (224 / 96 in Mugs; smaller ones for tests and demos).
    num_threads: DALI's CPU threads (default: the cores this process may use, at most 16).
    hw_decoder_load: share of JPEGs for the GPU's hardware decoder (A100/H100), the rest go to nvJPEG CUDA.
    verify: decode every sample once on the host before its first use (libjpeg-turbo, warnings are errors), in
        num_threads background threads ahead of the batches: the only way to find damage inside the
        entropy-coded data, which DALI's decoders pass on as pixels. False: the header check only.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        local_crops_number: int = 10,
        device: str | torch.device | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        global_size: int = 224,
        local_size: int = 96,
        num_threads: int | None = None,
        prefetch: int = 2,
        hw_decoder_load: float = 0.75,
        verify: bool = True,
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no .beton file at {path}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.reader = BetonReader(path)
        self.sampler = EpochSampler(len(self.reader), batch_size, seed, rank, world_size)
        self.device = default_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.local_crops_number, self.global_size, self.local_size = local_crops_number, global_size, local_size
        self._finisher = CropFinisher(self.device, self.dtype)
        self._sizes = np.full((len(self.reader), 2), -1, np.int64)  # (height, width) once checked
        self._corrupt: dict[int, str] = {}  # sample index -> why it does not decode
        self.verify = verify
        self._num_replaced = 0  # in the batches yielded so far
        self._pending: collections.deque = collections.deque()  # batch numbers still to feed to DALI
        self._fed: collections.deque = collections.deque()  # what DALI is working on: _Fed, in feed order
        self._active = None  # weak reference to the running iteration

        from mugs_fast.data.dali_pipeline import build_pipeline  # DALI imported only here

        threads = num_threads or min(16, len(os.sched_getaffinity(0)))
        self._ahead = CheckAhead(self._inspect, threads) if verify else None
        self._pipe = build_pipeline(
            self._feed,
            batch_size=batch_size,
            crops_per_image=4 + local_crops_number,
            global_size=global_size,
            device=self.device,
            num_threads=threads,
            prefetch=prefetch,
            hw_decoder_load=hw_decoder_load,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Epoch and position inside it (the next batch to yield), and the undecodable samples found so far."""
        return {"sampler": self.sampler.state_dict(), "corrupt": dict(self._corrupt)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._corrupt.update({int(i): why for i, why in state.get("corrupt", {}).items()})
        for i in self._corrupt:
            self._sizes[i] = 0

    @property
    def corrupt_samples(self) -> dict[int, str]:
        """Sample index -> reason, for every sample found not to decode (each replaced by another sample)."""
        return dict(self._corrupt)

    @property
    def num_replaced(self) -> int:
        """How many slots of the batches yielded so far held a replacement for an undecodable sample."""
        return self._num_replaced

    # --- host side: what each batch holds ---------------------------------------------------------------

    def _check(self, i: int) -> bool:
        """Whether sample i decodes cleanly; finds its size on first sight."""
        if self._sizes[i, 0] < 0:
            self._record(i, self._inspect(i))
        return self._sizes[i, 0] > 0

    def _inspect(self, i: int) -> tuple[int, int] | str:
        """Sample i's (height, width), or why it does not decode. Only reads: runs in the checking threads."""
        try:
            return check_jpeg(self.reader[i][0], decode=self.verify)
        except BadJpeg as e:
            return str(e)

    def _record(self, i: int, verdict: tuple[int, int] | str) -> None:
        if self._sizes[i, 0] >= 0:  # known already (checked here while the threads were at it)
            return
        if isinstance(verdict, str):
            self._mark_corrupt(i, verdict)
        else:
            self._sizes[i] = verdict

    def _check_ahead(self) -> None:
        """Keeps the strict check of the next batches' unchecked samples running in the background threads."""
        if self._ahead is not None:
            upcoming = ((b, self.sampler.batch(b)) for b in self._pending)
            self._ahead.submit_next((b, indices[self._sizes[indices, 0] < 0]) for b, indices in upcoming)

    def _mark_corrupt(self, i: int, why: str) -> None:
        self._sizes[i] = 0
        self._corrupt[i] = why
        warnings.warn(
            f"{self.reader.path}: sample {i} does not decode ({why}); it is replaced by another sample "
            f"({len(self._corrupt)} undecodable so far)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _replacement(self, i: int) -> int:
        """A decodable stand-in for sample i, the same one every time (from the seed and i)."""
        j = stand_in(self.sampler.seed, i, len(self.reader), self._check)
        if j is not None:
            return j
        raise RuntimeError(
            f"{self.reader.path}: found no decodable sample in {MAX_REPLACEMENT_TRIES} tries to "
            f"replace sample {i} ({len(self._corrupt)} undecodable so far): is the file damaged?"
        )

    def _batch_samples(self, batch: int) -> tuple[np.ndarray, int]:
        """The sample indices of a batch, undecodable ones replaced, and how many were replaced."""
        indices = self.sampler.batch(batch).copy()
        if self._ahead is not None:
            for i, verdict in self._ahead.take(batch):
                self._record(i, verdict)
        replaced = 0
        for slot, i in enumerate(indices):
            if not self._check(int(i)):
                indices[slot] = self._replacement(int(i))
                replaced += 1
        return indices, replaced

    def _feed(self):
        """DALI's external source: the next batch to work on (called by DALI, ahead of time)."""
        if not self._pending:
            raise StopIteration
        from mugs_fast.data.dali_pipeline import source_batch

        batch = self._pending.popleft()
        self._check_ahead()
        indices, replaced = self._batch_samples(batch)
        sizes = self._sizes[indices]
        s = self.sampler
        plan = sample_plan(
            plan_rng(s.seed, s.epoch, s.rank, batch),
            sizes[:, 0],
            sizes[:, 1],
            self.local_crops_number,
            self.global_size,
            self.local_size,
        )
        self._fed.append(_Fed(batch, indices, plan, replaced))
        return source_batch([self.reader[int(i)][0] for i in indices], sizes, plan, batch)

    # --- iteration ----------------------------------------------------------------------------------------

    def __iter__(self):
        """The batches of the current epoch from the current position (a finished epoch starts over).

        One iteration at a time: starting a new one abandons (closes) an unfinished earlier one.
        """
        active = self._active and self._active()
        if active is not None:
            active.close()
        batches = self._iterate()
        self._active = weakref.ref(batches)
        return batches

    def _iterate(self):
        s = self.sampler
        if s.position >= len(s):
            s.position = 0
        self._pending.extend(range(s.position, len(s)))
        self._check_ahead()
        ready = {}
        try:
            while s.position < len(s):
                if s.position in ready:
                    out, replaced = ready.pop(s.position)
                    s.position += 1
                    self._num_replaced += replaced  # counted once, when the batch is seen
                    yield out
                    continue
                fed, out = self._run_one()
                if fed is not None:
                    ready[fed.batch] = out, fed.replaced
        finally:
            self._pending.clear()
            if self._ahead is not None:
                self._ahead.cancel()
            self._drain()

    def _run_one(self):
        """Runs DALI for the oldest batch it was fed: (its _Fed, output dict), or (None, None)."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            outputs = self._pipe.run(stream)
        except StopIteration:  # DALI's epoch ended before a re-queued batch was fed: start it again
            self._pipe.reset()
            return None, None
        except RuntimeError as e:
            self._recover(self._fed.popleft(), e)
            return None, None
        fed = self._fed.popleft()
        return fed, self._finish(outputs, fed)

    def _recover(self, failed, error: RuntimeError) -> None:
        """DALI could not decode some JPEG of a batch: find it with the strict decode, mark it, and feed the batch
        again (with verify, the check found it before DALI did, unless DALI refuses what libjpeg-turbo accepts)."""
        culprits = []
        for i in failed.indices:
            try:
                check_jpeg(self.reader[int(i)][0])
            except BadJpeg as e:
                culprits.append((int(i), str(e)))
        if not culprits:
            raise error
        for i, why in culprits:
            self._mark_corrupt(i, why)
        self._pending.appendleft(failed.batch)

    def _drain(self) -> None:
        """Lets DALI finish (and drops) what it was fed, so the next epoch starts clean."""
        while True:
            try:
                self._pipe.run()
            except StopIteration:
                break
            except RuntimeError:
                pass
        self._fed.clear()
        self._pipe.reset()

    def _finish(self, outputs, fed: "_Fed") -> dict:
        """DALI's uint8 crops -> the output dict (normalised, crop-major, dtype) on the device, without a sync."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tags = outputs[1].as_array()
        if not (tags == fed.batch).all():
            raise RuntimeError(f"DALI returned batch {tags[0]} where {fed.batch} was expected: a loader bug")
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        dense = outputs[0].as_tensor()
        crops = feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.uint8, device=self.device), stream)
        b, s = len(fed.indices), self.local_size
        crops = crops.view(4 + self.local_crops_number, b, *crops.shape[1:])  # (K, B, S, S, 3)
        on_device = to_device(self._host_arrays(fed), self.device)  # the batch's one host -> device copy
        params = lambda part: {k.split(".", 1)[1]: v for k, v in on_device.items() if k.startswith(part + ".")}

        sd = self.sampler
        noise_seed = np.random.SeedSequence([sd.seed, sd.epoch, sd.rank, fed.batch, 1]).generate_state(1)[0]
        generator = torch.Generator(self.device).manual_seed(int(noise_seed))
        globals_ = self._finisher(crops[:4], params("global"), generator)
        local = self._finisher(crops[4:, :, :s, :s], params("local"), generator)
        return {
            "teacher": globals_[: 2 * b],
            "student_global": globals_[2 * b :],
            "student_local": local,
            # own storage: views of one buffer as several dtypes could not be saved with torch.save
            **{key: on_device[key].clone() for key in ("weak", "label", "index", "strong_local")},
        }

    def _host_arrays(self, fed: "_Fed") -> dict[str, np.ndarray]:
        """The batch's small host arrays: output fields and the finishing parameters of both resolutions."""
        host = {
            "weak": fed.plan.weak,
            "label": self.reader.labels[fed.indices].astype(np.int64),
            "index": fed.indices.astype(np.int64),
            "strong_local": fed.plan.strong[4:].reshape(-1),
        }
        for part, rows in (("global", slice(0, 4)), ("local", slice(4, None))):
            host |= {f"{part}.{name}": a for name, a in finish_arrays(fed.plan, rows).items()}
        return host


class _Fed(NamedTuple):
    """A batch handed to DALI: its number, samples (after replacements), plan, and how many were replaced."""

    batch: int
    indices: np.ndarray
    plan: CropPlan
    replaced: int
