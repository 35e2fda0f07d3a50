"""`MultiCropLoader`: a .beton -> batches of Mugs' 14 crops per image, augmented by one DALI graph.

    loader = MultiCropLoader("train.beton", batch_size=128, crops=CropSpec(), rank=rank, world_size=world_size)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # dict of tensors on the training device
            ...
        state = loader.state_dict()  # any time: the position inside the epoch

The host side (`feeder.HostFeeder`) picks each batch's samples, replaces those that do not decode and draws the
augmentation plan; this file drives DALI: it feeds it the feeder's batches, runs the graph (`dali_pipeline`: decode
and cut the crops), recovers from a decoder failure, and finishes the crops with torch (`finish`). The DALI graph
is built once per loader.
"""

import collections
import os
import weakref

import numpy as np
import torch

from mugs_fast.data.beton import BetonReader, open_beton
from mugs_fast.data.contract import MUGS_CROPS, BetonSource, CropSpec, default_device
from mugs_fast.data.feeder import Fed, HostFeeder
from mugs_fast.data.finish import CropFinisher, to_device
from mugs_fast.data.sampler import EpochSampler
from mugs_fast.runtime import compute_dtype


class MultiCropLoader(BetonSource):
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

    crops: the number of local crops and the crop sizes (G = global_size, s = local_size, L local crops).
    device: 'cuda' (DALI decodes with nvJPEG incl. the hardware decoder, all ops on the GPU) or 'cpu'.
    seed: shuffling and all augmentation randomness; the same seed gives the same batches.
    rank, world_size: this process's shard; every rank gets len(loader) batches (drop_last).
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
        crops: CropSpec = MUGS_CROPS,
        device: str | torch.device | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        num_threads: int | None = None,
        prefetch: int = 2,
        hw_decoder_load: float = 0.75,
        verify: bool = True,
    ):
        reader = open_beton(path)
        threads = num_threads or min(16, len(os.sched_getaffinity(0)))
        sampler = EpochSampler(len(reader), batch_size, seed, rank, world_size)
        self.feeder = HostFeeder(reader, sampler, crops, verify, threads)
        self.sampler, self.replacements, self.crops = sampler, self.feeder.replacements, crops
        self.device = default_device(device)
        self.dtype = dtype or compute_dtype("bf16", self.device)
        self._finisher = CropFinisher(self.device, self.dtype)
        self._fed: collections.deque = collections.deque()  # what DALI is working on: Fed, in feed order
        self._active = None  # weak reference to the running iteration

        from mugs_fast.data.dali_pipeline import build_pipeline  # DALI imported only here

        self._pipe = build_pipeline(
            self._feed,
            batch_size=batch_size,
            crops_per_image=crops.crops_per_image,
            global_size=crops.global_size,
            device=self.device,
            num_threads=threads,
            prefetch=prefetch,
            hw_decoder_load=hw_decoder_load,
        )

    @property
    def reader(self) -> BetonReader:
        return self.feeder.reader

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.feeder.skip_known_corrupt()

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
        self.feeder.start(range(s.position, len(s)))
        ready = {}
        try:
            while s.position < len(s):
                if s.position in ready:
                    out, replaced = ready.pop(s.position)
                    s.position += 1
                    self.replacements.num_replaced += replaced  # counted once, when the batch is seen
                    yield out
                    continue
                fed, out = self._run_one()
                if fed is not None:
                    ready[fed.batch] = out, fed.replaced
        finally:
            self.feeder.stop()
            self._drain()

    def _feed(self):
        """DALI's external source: the next batch to work on (called by DALI, ahead of time)."""
        fed, source = self.feeder.next_batch()
        self._fed.append(fed)
        return source

    def _run_one(self):
        """Runs DALI for the oldest batch it was fed: (its Fed, output dict), or (None, None)."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            outputs = self._pipe.run(stream)
        except StopIteration:  # DALI's epoch ended before a re-queued batch was fed: start it again
            self._pipe.reset()
            return None, None
        except RuntimeError as e:  # a JPEG DALI could not decode: the feeder marks it and queues the batch again
            if not self.feeder.retry(self._fed.popleft()):
                raise e
            return None, None
        fed = self._fed.popleft()
        return fed, self._finish(outputs, fed)

    def _drain(self) -> None:
        """Lets DALI finish (and drops) what it was fed, so the next epoch starts clean."""
        from mugs_fast.data.dali_pipeline import drain

        drain(self._pipe)
        self._fed.clear()

    def _finish(self, outputs, fed: Fed) -> dict:
        """DALI's uint8 crops -> the output dict (normalised, crop-major, dtype) on the device, without a sync."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tags = outputs[1].as_array()
        if not (tags == fed.batch).all():
            raise RuntimeError(f"DALI returned batch {tags[0]} where {fed.batch} was expected: a loader bug")
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        dense = outputs[0].as_tensor()
        crops = feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.uint8, device=self.device), stream)
        b, s = len(fed.indices), self.crops.local_size
        crops = crops.view(self.crops.crops_per_image, b, *crops.shape[1:])  # (K, B, S, S, 3)
        on_device = to_device(self.feeder.host_arrays(fed), self.device)  # the batch's one host -> device copy
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
