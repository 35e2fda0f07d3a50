"""Mugs-specific GPU kernels, each with its pure-PyTorch reference in the same file.

By default CUDA tensors take the Triton path and everything else the PyTorch one; `with kernels.use("triton"):`
(or "torch") forces one for the calls in the block (tests, benchmarks), and `MUGS_KERNELS=triton|torch` for the
rest (debugging).
"""

from kernels.dispatch import use
from kernels.info_nce import info_nce, info_nce_ref
from kernels.topk_cosine import topk_cosine, topk_cosine_ref

__all__ = ["info_nce", "info_nce_ref", "topk_cosine", "topk_cosine_ref", "use"]
