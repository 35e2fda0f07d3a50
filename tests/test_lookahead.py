"""CheckAhead: per-sample checks in background threads, taken per batch."""

import threading

from mugs_fast.data.lookahead import BATCHES_AHEAD, CheckAhead


def test_verdicts_of_a_batch_come_back_in_sample_order():
    ahead = CheckAhead(lambda i: i * i, threads=2)
    ahead.submit("b0", [3, 1, 2])
    ahead.submit("b1", range(5, 8))
    assert ahead.take("b1") == [(5, 25), (6, 36), (7, 49)]
    assert ahead.take("b0") == [(3, 9), (1, 1), (2, 4)]
    assert ahead.take("b0") == []  # taken once


def test_batches_not_submitted_or_empty_have_no_verdicts():
    ahead = CheckAhead(lambda i: i, threads=1)
    ahead.submit("empty", [])
    assert ahead.take("empty") == [] and ahead.take("never") == []


def test_cancel_drops_the_batches_not_taken():
    release = threading.Event()
    seen = []

    def inspect(i):
        release.wait(5)
        seen.append(i)
        return i

    ahead = CheckAhead(inspect, threads=1)
    ahead.submit("running", [0])
    ahead.submit("queued", [1])
    ahead.cancel()
    release.set()
    assert ahead.take("running") == [] and ahead.take("queued") == []
    ahead.submit("again", [2])
    assert ahead.take("again") == [(2, 2)] and 1 not in seen  # the queued batch never ran


def test_submit_next_keeps_a_window_of_batches_and_never_resubmits():
    calls = []
    ahead = CheckAhead(lambda i: calls.append(i) or i, threads=1)
    upcoming = [(b, [b]) for b in range(BATCHES_AHEAD + 3)]
    ahead.submit_next(upcoming)
    ahead.submit_next(upcoming)  # the same window: already being checked
    assert [ahead.take(b) for b in range(BATCHES_AHEAD)] == [[(b, b)] for b in range(BATCHES_AHEAD)]
    assert sorted(calls) == list(range(BATCHES_AHEAD))  # each once, none beyond the window
    assert ahead.take(BATCHES_AHEAD) == []
