"""`HostFeeder`: the host side of `MultiCropLoader`, what each batch holds before DALI sees it.

The sampler picks each batch's samples, their JPEG bytes come zero-copy from the .beton, samples that do not
decode cleanly are replaced (a header check, and once per sample a strict decode in background threads:
`mugs_fast.data.jpeg`), and the augmentation plan is drawn (`mugs_fast.data.params`). The feeder knows nothing
of DALI: `next_batch` hands out one batch's inputs, the DALI driver (`loader.py`) runs them.
"""

import collections
from typing import NamedTuple

import numpy as np

from mugs_fast.data.beton import BetonReader
from mugs_fast.data.contract import CropSpec
from mugs_fast.data.finish import finish_arrays
from mugs_fast.data.jpeg import BadJpeg, check_jpeg
from mugs_fast.data.lookahead import CheckAhead
from mugs_fast.data.params import CropPlan, plan_rng, sample_plan
from mugs_fast.data.replacement import Replacements, stand_in
from mugs_fast.data.sampler import EpochSampler


class Fed(NamedTuple):
    """A batch handed to DALI: its number, samples (after replacements), plan, and how many were replaced."""

    batch: int
    indices: np.ndarray
    plan: CropPlan
    replaced: int


class HostFeeder:
    """This rank's batches of a .beton as DALI's inputs: samples (undecodable ones replaced), sizes and plan.

    verify: decode every sample once on the host before its first use (libjpeg-turbo, warnings are errors), in
        num_threads background threads ahead of the batches. False: the header check only.
    """

    def __init__(self, reader: BetonReader, sampler: EpochSampler, crops: CropSpec, verify: bool, num_threads: int):
        self.reader, self.sampler, self.crops, self.verify = reader, sampler, crops, verify
        self.replacements = Replacements(reader.path)
        self._sizes = np.full((len(reader), 2), -1, np.int64)  # (height, width) once checked, 0 if undecodable
        self._pending: collections.deque = collections.deque()  # batch numbers still to hand out
        self._ahead = CheckAhead(self._inspect, num_threads) if verify else None

    def skip_known_corrupt(self) -> None:
        """Takes the undecodable samples recorded in `replacements` (from a saved state) as checked."""
        for i in self.replacements.corrupt:
            self._sizes[i] = 0

    # --- the queue of batches to hand out -------------------------------------------------------------------

    def start(self, batches: range) -> None:
        """Queues these batches of the current epoch and starts checking their samples ahead."""
        self._pending.extend(batches)
        self._check_ahead()

    def stop(self) -> None:
        """Forgets the batches not handed out yet and cancels their checks."""
        self._pending.clear()
        if self._ahead is not None:
            self._ahead.cancel()

    def next_batch(self) -> tuple[Fed, tuple]:
        """The next queued batch: (its Fed, DALI's source inputs); StopIteration when none is left."""
        if not self._pending:
            raise StopIteration
        from mugs_fast.data.dali_pipeline import source_batch  # DALI imported only once a loader runs

        batch = self._pending.popleft()
        self._check_ahead()
        indices, replaced = self._batch_samples(batch)
        sizes = self._sizes[indices]
        s, c = self.sampler, self.crops
        rng = plan_rng(s.seed, s.epoch, s.rank, batch)
        plan = sample_plan(rng, sizes[:, 0], sizes[:, 1], c)
        source = source_batch([self.reader[int(i)][0] for i in indices], sizes, plan, batch)
        return Fed(batch, indices, plan, replaced), source

    def retry(self, failed: Fed) -> bool:
        """DALI could not decode some JPEG of a batch: find it with the strict decode, mark it, and queue the batch
        again first; False if every sample decodes (with verify, the check found the culprits before DALI did,
        unless DALI refuses what libjpeg-turbo accepts)."""
        culprits = []
        for i in failed.indices:
            try:
                check_jpeg(self.reader[int(i)][0])
            except BadJpeg as e:
                culprits.append((int(i), str(e)))
        for i, why in culprits:
            self._mark_corrupt(i, why)
        if culprits:
            self._pending.appendleft(failed.batch)
        return bool(culprits)

    def host_arrays(self, fed: Fed) -> dict[str, np.ndarray]:
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

    # --- which samples decode -----------------------------------------------------------------------------

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

    def _mark_corrupt(self, i: int, why: str) -> None:
        self._sizes[i] = 0
        self.replacements.mark(i, why)

    def _check_ahead(self) -> None:
        """Keeps the strict check of the next batches' unchecked samples running in the background threads."""
        if self._ahead is not None:
            upcoming = ((b, self.sampler.batch(b)) for b in self._pending)
            self._ahead.submit_next((b, indices[self._sizes[indices, 0] < 0]) for b, indices in upcoming)

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

    def _replacement(self, i: int) -> int:
        """A decodable stand-in for sample i, the same one every time (from the seed and i)."""
        j = stand_in(self.sampler.seed, i, len(self.reader), self._check)
        if j is None:
            raise self.replacements.not_found(i)
        return j
