"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is
imported anywhere: this file is imported by pytest before any test module.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def triton_path():
    """Force the Triton kernels (`kernels.use("triton")`): on CPU tensors they run under the interpreter set above."""
    import kernels
    from kernels import dispatch

    if not (HAS_CUDA or dispatch.interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    with kernels.use("triton"):
        yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
