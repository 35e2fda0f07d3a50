import pytest
import torch
import torch.nn.functional as F

from mugs_fast.memory import FeatureMemory, FeatureQueue


def _release_write(features: torch.Tensor, ptr: int, rows: torch.Tensor) -> int:
    """The release's Block_mem._dequeue_and_enqueue on already gathered, already filtered rows (spec 4.3)."""
    size, n = features.shape[0], rows.shape[0]
    if n == 0:
        return ptr
    remaining = ptr + n - size
    if remaining <= 0:
        features[ptr : ptr + n] = rows
        return (ptr + 2 * n) % size  # ptr = ptr + n, then queue_ptr = (ptr + n) % K
    features[ptr:] = rows[: size - ptr]
    features[:remaining] = rows[size - ptr :]
    return remaining


def _fifo_write(features: torch.Tensor, ptr: int, rows: torch.Tensor) -> int:
    for row in rows:
        features[ptr] = row
        ptr = (ptr + 1) % features.shape[0]
    return ptr


@pytest.mark.parametrize("official", [False, True])
def test_pointer_and_contents_with_wrap_around(official):
    torch.manual_seed(0)
    size, dim = 11, 5
    mem = FeatureMemory(size, dim, official_pointer=official)
    expected, ptr = mem.features.clone(), 0
    simulate = _release_write if official else _fifo_write
    for n in (4, 3, 4, 4, 1, 6, 11, 2):
        rows = torch.randn(n, dim)
        mem.write(rows)
        ptr = simulate(expected, ptr, rows)
        assert int(mem.ptr) == ptr
        torch.testing.assert_close(mem.features, expected, rtol=0, atol=0)
    if official:  # 4 rows from 0: the release stores the pointer at 8 (spec 4.3)
        m = FeatureMemory(size, dim, official_pointer=True)
        m.write(torch.randn(4, dim))
        assert int(m.ptr) == 8


@pytest.mark.parametrize("official", [False, True])
def test_weak_only_writes(official):
    torch.manual_seed(0)
    size, dim = 13, 4
    mem = FeatureMemory(size, dim, official_pointer=official)
    expected, ptr = mem.features.clone(), 0
    simulate = _release_write if official else _fifo_write
    for step in range(6):
        rows = torch.randn(5, dim)
        keep = torch.rand(5) < 0.5
        if step == 2:
            keep[:] = False  # nothing weak: nothing written, pointer unchanged
        mem.write(rows, keep=keep)
        ptr = simulate(expected, ptr, rows[keep])
        assert int(mem.ptr) == ptr
        torch.testing.assert_close(mem.features, expected, rtol=0, atol=0)


def test_shadow_is_normalised_and_follows_writes():
    torch.manual_seed(0)
    mem = FeatureMemory(17, 6)
    torch.testing.assert_close(mem.shadow(), F.normalize(mem.features, dim=1))
    mem.write(torch.randn(5, 6) * 3, keep=torch.tensor([True, False, True, True, False]))
    mem.write(torch.randn(4, 6))
    torch.testing.assert_close(mem.shadow(), F.normalize(mem.features, dim=1))
    fresh = FeatureMemory(17, 6)
    fresh.shadow()
    fresh.load_state_dict(mem.state_dict())
    torch.testing.assert_close(fresh.shadow(), F.normalize(mem.features, dim=1))


def test_retrieve_returns_stored_rows_of_cosine_top_k():
    torch.manual_seed(0)
    mem = FeatureMemory(23, 6)
    mem.features.mul_(torch.rand(23, 1) * 5)  # unnormalised rows: cosine, not dot product, decides
    mem.refresh_shadow()
    queries = torch.randn(4, 6, requires_grad=True)
    out = mem.retrieve(queries, 3)
    assert out.shape == (4, 3, 6) and not out.requires_grad
    cos = F.normalize(queries.double(), dim=1) @ F.normalize(mem.features.double(), dim=1).T
    idx = cos.topk(3, dim=1).indices
    torch.testing.assert_close(out, mem.features[idx])


def test_write_too_large_is_an_error():
    with pytest.raises(ValueError, match="ring of 4"):
        FeatureMemory(4, 3).write(torch.randn(5, 3))


def test_queue_enqueue_order_and_wrap():
    torch.manual_seed(0)
    q = FeatureQueue(7, 3)
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(7))
    expected, ptr = q.queue.clone(), 0
    for _ in range(4):
        views = torch.randn(2, 2, 3)  # (V, B, E)
        q.enqueue(views)
        ptr = _fifo_write(expected, ptr, views.reshape(4, 3))  # view 0 rows, then view 1 rows
        assert int(q.ptr) == ptr
        torch.testing.assert_close(q.queue, expected, rtol=0, atol=0)
