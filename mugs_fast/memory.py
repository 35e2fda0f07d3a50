"""Ring buffers of Mugs: the InfoNCE negative queues and the local-group feature memories.

Both are fp32 `register_buffer` rings with a device-side pointer, so a write never syncs with the host; both
gather their rows from every rank first, so every rank holds the same buffer. Writes are `@torch.no_grad()`.
"""

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from mugs_fast.distributed import all_gather_cat
from mugs_fast.runtime import compute_dtype


def _ring_positions(ptr: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """Rows ptr, ptr+1, ..., ptr+n-1 of a ring of `size` rows (n,), wrapping around."""
    if n > size:
        raise ValueError(f"cannot write {n} rows at once into a ring of {size}: make the queue/memory larger")
    return (ptr + torch.arange(n, device=ptr.device)) % size


class FeatureQueue(nn.Module):
    """InfoNCE negatives: `size` rows of width `dim` (random unit vectors at first), FIFO with a correct pointer.

    Rows, not the release's columns: `queue` is (size, dim), the layout `kernels.info_nce` takes (checkpoint.py
    converts to and from the release's (dim, size) checkpoint entry).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, views: torch.Tensor) -> None:
        """Append teacher targets (V, B, E) of every rank: view 0 of all ranks, then view 1, ...

        This is the order of the release's one enqueue per teacher view; rows are stored in fp32.
        """
        rows = all_gather_cat(views.float(), dim=1)  # (V, W*B, E)
        rows = rows.reshape(-1, rows.shape[-1])  # (V*W*B, E), view-major
        size = self.queue.shape[0]
        self.queue.index_copy_(0, _ring_positions(self.ptr, rows.shape[0], size), rows)
        self.ptr.copy_((self.ptr + rows.shape[0]) % size)


class FeatureMemory(nn.Module):
    """A local-group memory: `size` stored features (size, dim) fp32, searched by cosine top-k.

    Starts as unnormalised randn noise, as in the release, which also stores one set of rows where the release
    keeps three copies (queue_q/k/v, equal after any write; only their initial noise differs; checkpoint.py
    writes and reads that layout). Beside the fp32 rows lives a derived, L2-normalised shadow that `retrieve`
    searches, in the `precision` policy's dtype (`runtime.compute_dtype`: bf16 on CUDA for "bf16", else fp32);
    writes update the shadow rows they write, so no search re-normalises the memory.

    The pointer advances by the number of rows written (a correct FIFO), or, with `official_pointer`, by twice
    that unless the write wraps around (the release's behaviour, spec 4.3).
    """

    def __init__(self, size: int, dim: int, *, official_pointer: bool = False, precision: str = "bf16") -> None:
        super().__init__()
        self.official_pointer = official_pointer
        self.precision = precision
        self.register_buffer("features", torch.randn(size, dim))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self._shadow: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def shadow(self) -> torch.Tensor:
        """The normalised search copy (size, dim), rebuilt if missing or on another device."""
        f = self.features
        dtype = compute_dtype(self.precision, f.device)
        if self._shadow is None or self._shadow.device != f.device or self._shadow.dtype != dtype:
            self._shadow = F.normalize(f.float(), dim=1).to(dtype)
        return self._shadow

    def refresh_shadow(self) -> None:
        """Call after changing `features` by hand (loading a state dict does it already)."""
        self._shadow = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_shadow()

    @torch.no_grad()
    def retrieve(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Queries (N, D) -> the stored fp32 rows of their k most cosine-similar entries (N, k, D)."""
        _, idx = kernels.topk_cosine(queries.detach(), self.shadow(), k)  # (N, k)
        return self.features[idx]

    @torch.no_grad()
    def write(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Append features (B, D) of every rank; with `keep` (B,) bool, only the kept rows (in order).

        No host sync: ranks send fixed-size rows plus their mask, kept rows are moved to the front
        (a stable sort), and the rows past the kept count are written back with their old contents.
        """
        x = x.float()
        if keep is None:
            rows = all_gather_cat(x)  # (W*B, D)
            count: torch.Tensor | int = rows.shape[0]
        else:
            packed = all_gather_cat(torch.cat([x, keep.to(x.dtype).unsqueeze(1)], dim=1))  # (W*B, D+1)
            rows, kept = packed[:, :-1], packed[:, -1] > 0.5
            count = kept.sum()  # device scalar: stays on the GPU
        n = rows.shape[0]
        pos = _ring_positions(self.ptr, n, self.size)  # (n,)
        if keep is not None:
            order = torch.argsort((~kept).to(torch.uint8), stable=True)  # kept rows first, in order
            real = torch.arange(n, device=rows.device) < count  # (n,)
            rows = torch.where(real.unsqueeze(1), rows[order], self.features[pos])
        shadow = self.shadow()
        self.features.index_copy_(0, pos, rows)
        shadow.index_copy_(0, pos, F.normalize(rows, dim=1).to(shadow.dtype))
        self.ptr.copy_(self._advance(self.ptr, count))

    def _advance(self, ptr: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        end = ptr + count
        if not self.official_pointer:
            return end % self.size
        # The release: ptr + 2n when the write does not wrap, else the correct ptr + n - size.
        return torch.where(end > self.size, end - self.size, (end + count) % self.size)
