"""`CheckAhead`: a per-sample check run in background threads for the batches to come, in their order."""

import itertools
import weakref
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# batches checked ahead of the one being fed: enough to hide the checks' latency, few enough that an exit (whose
# thread shutdown runs what is queued) or an abandoned iteration leaves little work behind
BATCHES_AHEAD = 4


class CheckAhead:
    """Runs `inspect(i)` for the samples of submitted batches in `threads` background threads, oldest batch first,
    so that a loader finds the verdicts ready when it feeds the batch.

    inspect: thread-safe (it only reads), returns the sample's verdict; the loader applies the verdicts on its own
    thread (`take`). libjpeg-turbo releases the GIL, so the threads decode in parallel.
    """

    def __init__(self, inspect: Callable[[int], Any], threads: int):
        self._inspect = inspect
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sample-check")
        self._futures: dict[Hashable, Future] = {}
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def submit(self, key: Hashable, indices: Iterable[int]) -> None:
        """Starts checking these samples for the batch `key` (nothing if that batch is being checked already)."""
        indices = [int(i) for i in indices]
        if indices and key not in self._futures:
            self._futures[key] = self._pool.submit(self._run, indices)

    def submit_next(self, batches: Iterable[tuple[Hashable, Iterable[int]]]) -> None:
        """`submit` for the first BATCHES_AHEAD of the upcoming (key, unchecked sample indices) batches."""
        for key, indices in itertools.islice(batches, BATCHES_AHEAD):
            self.submit(key, indices)

    def _run(self, indices: list[int]) -> list[tuple[int, Any]]:
        return [(i, self._inspect(i)) for i in indices]

    def take(self, key: Hashable) -> list[tuple[int, Any]]:
        """[(sample index, verdict)] of batch `key`, once computed; [] for a batch not submitted (or taken)."""
        future = self._futures.pop(key, None)
        return [] if future is None else future.result()

    def cancel(self) -> None:
        """Drops the batches not taken yet (a check already running finishes, unseen)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
