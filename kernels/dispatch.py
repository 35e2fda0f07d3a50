"""Which implementation a kernel call takes, and the small facts about the machine that decide it.

By default CUDA tensors take the Triton kernels and everything else the PyTorch path. A mode forces one: `torch`
always takes PyTorch; `triton` always takes Triton and raises where it cannot run - on CPU tensors it needs
Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported), which is how the tests run the kernels.
Code picks the mode of the calls it makes with `with kernels.use("torch"):` (as timm's per-module fused/reference
switch: the tests and the benchmarks do so); elsewhere the user's `MUGS_KERNELS=auto|triton|torch` decides.
"""

import functools
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

MODES = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels on CPU tensors (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_gpu_ready() -> bool:
    """True when Triton can launch on a GPU: without one, `import triton` works but its driver raises."""
    try:
        triton.runtime.driver.active.get_current_device()
    except Exception:
        return False
    return True


def _patch_old_interpreter() -> None:
    """Let triton < 3.7's interpreter take loops over run-time bounds (`range(0, D, BLOCK_D)`) under numpy >= 2.4.

    That interpreter holds scalars as 1-element arrays and converts them with `int(array)`, which numpy 2.4 refuses
    for arrays of one dimension; triton 3.7 squeezes first, and this does the same. Compiled kernels are untouched.
    """
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version >= (3, 7) or not interpreting():
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_squeezing(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_squeezing


_patch_old_interpreter()


_MODE: ContextVar[str | None] = ContextVar("kernel_mode", default=None)  # set by `use`; None: MUGS_KERNELS decides


@contextmanager
def use(mode: str) -> Iterator[None]:
    """Kernel calls in the block (in this thread) take `mode` ("auto", "triton" or "torch"), whatever MUGS_KERNELS
    says; the mode before it is back after the block."""
    if mode not in MODES:
        raise ValueError(f"kernels.use({mode!r}): expected one of {', '.join(MODES)}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def kernel_mode() -> str:
    """The mode a kernel call takes here: that of the innermost `use` block, else MUGS_KERNELS (default auto)."""
    mode = _MODE.get()
    if mode is not None:
        return mode
    mode = os.environ.get("MUGS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MUGS_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def use_triton(op: str, *tensors: torch.Tensor, unsupported: str | None = None) -> bool:
    """Whether `op` runs its Triton kernel on `tensors`.

    `unsupported` is the reason the kernel cannot take these inputs (None when it can): forced Triton raises it,
    automatic dispatch warns once and takes the PyTorch path.
    """
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = (on_cuda and triton_gpu_ready()) or (interpreting() and not any(t.is_cuda for t in tensors))
    if mode == "triton":
        if not runnable:
            where = "CUDA tensors" if on_cuda else "CPU tensors without TRITON_INTERPRET=1"
            forced = "kernels.use('triton')" if _MODE.get() else "MUGS_KERNELS=triton"
            raise RuntimeError(f"{op}: {forced} but Triton cannot run on {where}")
        if unsupported is not None:
            raise ValueError(f"{op}: the Triton kernel does not support {unsupported} (the torch mode does)")
        return True
    if not (on_cuda and runnable):
        return False
    if unsupported is not None:
        _warn_fallback(op, unsupported)
        return False
    return True


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"{op}: {reason} is not supported by the Triton kernel; using the PyTorch path", stacklevel=3)


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The operand dtype of the kernels' tensor-core dots: what an eager matmul of the inputs would use.

    bf16 if any input is bf16, else fp16 if any is fp16, else the autocast dtype where CUDA autocast is on, else fp32
    (run as TF32). Under the interpreter always fp32: its bf16 `tl.dot` is wrong and its fp32 -> bf16 casts truncate.
    """
    dtypes = {t.dtype for t in tensors}
    if interpreting():
        return torch.float32
    if torch.bfloat16 in dtypes:
        return torch.bfloat16
    if torch.float16 in dtypes:
        return torch.float16
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.float32


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_precision() -> str:
    """`input_precision` of fp32 dots: TF32 on the GPU (as cuBLAS with TF32 allowed), exact when interpreting."""
    return "ieee" if interpreting() else "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in under the interpreter, to exercise the splitting)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_options() -> dict:
    """Options every launch passes: fp fusion explicit (triton 3.9 warns when it is left to its default)."""
    return {} if interpreting() else {"enable_fp_fusion": True}
