"""Mugs-specific GPU kernels, each with its pure-PyTorch reference in the same file.

`MUGS_KERNELS=triton|torch` forces one implementation (debugging, tests); by default CUDA tensors take the
Triton path and everything else the PyTorch one.
"""

from kernels.info_nce import info_nce, info_nce_ref
from kernels.topk_cosine import topk_cosine, topk_cosine_ref

__all__ = ["info_nce", "info_nce_ref", "topk_cosine", "topk_cosine_ref"]
