"""Samples that do not decode: the stand-in rule every loader shares, and the record of what was replaced.

A sample found not to decode (`mugs_fast.data.jpeg.check_jpeg`) is replaced in its batch by a stand-in drawn
from (seed, sample index), the same one in every loader and every run, so that the DALI loader, the release's
pipeline and a resumed run put the same samples in a batch.
"""

import os
import warnings
from collections.abc import Callable

import numpy as np

MAX_REPLACEMENT_TRIES = 100


def stand_in(seed: int, i: int, num_samples: int, decodes: Callable[[int], bool]) -> int | None:
    """The replacement for undecodable sample i, the same one every time: the first sample that `decodes` among
    MAX_REPLACEMENT_TRIES drawn from (seed, i); None if none does."""
    rng = np.random.default_rng([seed, i])
    for j in rng.integers(num_samples, size=MAX_REPLACEMENT_TRIES):
        if decodes(int(j)):
            return int(j)
    return None


class Replacements:
    """The undecodable samples of one .beton found so far (index -> reason, each named once in a warning) and how
    many batch slots yielded so far held a stand-in."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.corrupt: dict[int, str] = {}
        self.num_replaced = 0

    def mark(self, i: int, why: str) -> bool:
        """Records sample i as undecodable and warns; False (and silent) if it was known already."""
        if i in self.corrupt:
            return False
        self.corrupt[i] = why
        warnings.warn(
            f"{self.path}: sample {i} does not decode ({why}); it is replaced by another sample "
            f"({len(self.corrupt)} undecodable so far)",
            RuntimeWarning,
            stacklevel=3,
        )
        return True

    def not_found(self, i: int) -> RuntimeError:
        """The error when no stand-in for sample i decodes."""
        return RuntimeError(
            f"{self.path}: found no decodable sample in {MAX_REPLACEMENT_TRIES} tries to "
            f"replace sample {i} ({len(self.corrupt)} undecodable so far): is the file damaged?"
        )

    def load(self, corrupt: dict) -> None:
        """Adds the undecodable samples of a saved state (their keys may have become strings)."""
        self.corrupt.update({int(i): why for i, why in corrupt.items()})
