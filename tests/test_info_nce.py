"""kernels.info_nce: the reference against float64 maths, the Triton kernels (under the interpreter without a GPU)
against the reference - forward and every gradient - the no-grad path, dispatch and input errors. Full Mugs sizes
run on a GPU only."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA

import kernels

op = importlib.import_module("kernels.info_nce")  # the module: `kernels.info_nce` is the function

DEVICE = "cuda" if HAS_CUDA else "cpu"


def info_nce64(student, teacher, queue, tau):
    """The Mugs loss written out pair by pair in float64 (MUGS_SPEC 5.1)."""
    s, t, q = student.double(), teacher.double(), queue.double()
    batch = t.shape[0] // 2
    crops = s.shape[0] // batch
    large, small = [], []
    for i in range(2):  # teacher view
        for j in range(crops):  # student crop
            if j == i:
                continue
            sj, ti = s[j * batch : (j + 1) * batch], t[i * batch : (i + 1) * batch]
            logits = torch.cat([(sj * ti).sum(1, keepdim=True), sj @ q.T], dim=1) / tau  # (B, 1 + N)
            ce = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
            (large if j < 2 else small).append(ce)
    large = torch.stack(large).mean()
    return large if crops == 2 else 0.5 * (large + torch.stack(small).mean())


def make_inputs(batch, crops, width, n, unit=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, teacher, queue = (torch.randn(r, width, generator=g) for r in (crops * batch, 2 * batch, n))
    if unit:
        student, teacher, queue = (F.normalize(x, dim=1) for x in (student, teacher, queue))
    return student, teacher, queue


def loss_and_grads(fn, student, teacher, queue, tau, grad_s=True, grad_t=True, scale=1.0):
    s = student.detach().clone().requires_grad_(grad_s)
    t = teacher.detach().clone().requires_grad_(grad_t)
    loss = fn(s, t, queue, tau)
    (loss * scale).backward()
    return loss.detach(), s.grad, t.grad


def assert_close_to_fp64(value, ref64, ref32, atol):
    """The flash-attention rule: |kernel - ref64| <= 2 |ref32 - ref64| + atol (elementwise)."""
    value, ref64, ref32 = value.double().cpu(), ref64.double().cpu(), ref32.double().cpu()
    bound = 2 * (ref32 - ref64).abs() + atol
    excess = ((value - ref64).abs() - bound).max().item()
    assert excess <= 0, f"off by {excess:.3g} beyond the bound"


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("crops", [2, 5])
def test_reference_matches_float64(crops):
    student, teacher, queue = make_inputs(3, crops, 8, 20)
    ref64 = loss_and_grads(kernels.info_nce_ref, student.double(), teacher.double(), queue.double(), 0.2)
    exact = loss_and_grads(info_nce64, student.double(), teacher.double(), queue.double(), 0.2)
    for got, want in zip(ref64, exact, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    ref32 = loss_and_grads(kernels.info_nce_ref, student, teacher, queue, 0.2)
    assert ref32[0].dtype == torch.float32
    for got, want in zip(ref32, exact, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_reference_takes_non_contiguous_rows():
    student, teacher, queue = make_inputs(3, 4, 8, 20)
    wide = torch.cat([student, student], dim=1)[:, :8]  # same values, row stride 16
    torch.testing.assert_close(
        kernels.info_nce_ref(wide, teacher, queue, 0.2), info_nce64(student, teacher, queue, 0.2), check_dtype=False
    )


# ---------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize(
    "batch, crops, width, n",
    [
        (5, 4, 24, 100),  # 20 rows, N and E not multiples of the tiles
        (3, 2, 40, 70),  # global crops only
        (7, 12, 16, 37),  # the Mugs crop count, a queue shorter than the splits x tiles
    ],
)
@pytest.mark.parametrize("grad_s, grad_t", [(True, True), (True, False), (False, True)])
def test_triton_matches_reference(triton_path, batch, crops, width, n, grad_s, grad_t):
    inputs = make_inputs(batch, crops, width, n, seed=batch)
    got = loss_and_grads(kernels.info_nce, *(x.to(DEVICE) for x in inputs), 0.2, grad_s, grad_t)
    ref64 = loss_and_grads(info_nce64, *(x.double() for x in inputs), 0.2, grad_s, grad_t)
    ref32 = loss_and_grads(kernels.info_nce_ref, *inputs, 0.2, grad_s, grad_t)
    assert got[0].shape == () and got[0].dtype == torch.float32
    atol = 2e-3 if HAS_CUDA else 1e-6  # TF32 dots on the GPU
    for value, r64, r32, wanted in zip(got, ref64, ref32, (True, grad_s, grad_t), strict=True):
        if not wanted:
            assert value is None
            continue
        assert_close_to_fp64(value, r64, r32, atol * max(1.0, r64.abs().max().item()))


def test_triton_backward_scales_by_grad_output(triton_path):
    inputs = [x.to(DEVICE) for x in make_inputs(4, 3, 16, 50)]
    loss1, gs1, gt1 = loss_and_grads(kernels.info_nce, *inputs, 0.2)
    loss3, gs3, gt3 = loss_and_grads(kernels.info_nce, *inputs, 0.2, scale=-2.5)
    torch.testing.assert_close(loss3, loss1)
    torch.testing.assert_close(gs3, -2.5 * gs1)
    torch.testing.assert_close(gt3, -2.5 * gt1)


def test_triton_no_grad_runs_the_log_sum_exp_pass_only(triton_path, monkeypatch):
    inputs = make_inputs(5, 4, 24, 100)
    launches = []
    real_launch = op._info_nce_triton
    monkeypatch.setattr(op, "_info_nce_triton", lambda *a, **kw: launches.append(kw) or real_launch(*a, **kw))
    with torch.no_grad():
        loss = kernels.info_nce(*(x.to(DEVICE, copy=True).requires_grad_() for x in inputs), 0.2)
    loss_no_inputs_grad = kernels.info_nce(*(x.to(DEVICE) for x in inputs), 0.2)
    assert launches == [{"grad_s": False, "grad_t": False}] * 2
    assert not loss.requires_grad and not loss_no_inputs_grad.requires_grad
    expected = info_nce64(*inputs, 0.2)
    torch.testing.assert_close(loss.double().cpu(), expected, atol=2e-3 if HAS_CUDA else 1e-6, rtol=0)
    torch.testing.assert_close(loss_no_inputs_grad, loss)


@pytest.mark.parametrize("scale, tau", [(20.0, 0.05), (1.0, 0.01), (1e-3, 1.0)])
def test_triton_is_safe_for_any_input(triton_path, scale, tau):
    """Not unit vectors and tiny temperatures: logits up to +-8000 must neither overflow nor underflow."""
    student, teacher, queue = make_inputs(4, 3, 24, 90, unit=False)
    inputs = (student * scale, teacher, queue)
    got = loss_and_grads(kernels.info_nce, *(x.to(DEVICE) for x in inputs), tau)
    ref64 = loss_and_grads(info_nce64, *(x.double() for x in inputs), tau)
    rtol = 1e-2 if HAS_CUDA else 1e-5
    for value, r64 in zip(got, ref64, strict=True):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value.double().cpu(), r64, rtol=rtol, atol=rtol * r64.abs().max().item())


def test_triton_low_precision_inputs(triton_path):
    inputs = make_inputs(5, 4, 24, 100)
    low = [x.bfloat16().to(DEVICE) for x in inputs]
    loss, grad_s, grad_t = loss_and_grads(kernels.info_nce, *low, 0.2)
    assert loss.dtype == torch.float32 and grad_s.dtype == grad_t.dtype == torch.bfloat16
    ref = loss_and_grads(info_nce64, *(x.double() for x in low), 0.2)  # the same rounded inputs, exactly
    for value, r64 in zip((loss, grad_s, grad_t), ref, strict=True):
        torch.testing.assert_close(value.double().cpu(), r64, rtol=2e-2, atol=2e-2 * r64.abs().max().item())


def test_triton_queue_gets_no_gradient(triton_path):
    student, teacher, queue = (x.to(DEVICE) for x in make_inputs(3, 3, 16, 40))
    queue.requires_grad_()
    student.requires_grad_()
    kernels.info_nce(student, teacher, queue, 0.2).backward()
    assert student.grad is not None and queue.grad is None


# ---------------------------------------------------------------- dispatch and errors


def test_cpu_dispatch_takes_the_reference_without_raising(monkeypatch):
    monkeypatch.delenv("MUGS_KERNELS", raising=False)
    monkeypatch.setattr(op, "_info_nce_triton", lambda *a, **kw: pytest.fail("took the Triton path"))
    inputs = make_inputs(3, 4, 8, 20)
    loss, grad_s, grad_t = loss_and_grads(kernels.info_nce, *inputs, 0.2)
    ref = loss_and_grads(info_nce64, *(x.double() for x in inputs), 0.2)
    for value, r64 in zip((loss, grad_s, grad_t), ref, strict=True):
        torch.testing.assert_close(value.double(), r64, atol=1e-6, rtol=1e-5)


def test_forced_torch_path(monkeypatch):
    monkeypatch.setenv("MUGS_KERNELS", "torch")
    monkeypatch.setattr(op, "_info_nce_triton", lambda *a, **kw: pytest.fail("took the Triton path"))
    kernels.info_nce(*(x.to(DEVICE) for x in make_inputs(3, 4, 8, 20)), 0.2)


def test_width_above_256_is_an_error_on_the_triton_path_only(triton_path):
    inputs = [x.to(DEVICE) for x in make_inputs(2, 2, 257, 20)]
    with pytest.raises(ValueError, match="width 257 > 256"):
        kernels.info_nce(*inputs, 0.2)
    with kernels.use("torch"):
        assert torch.isfinite(kernels.info_nce(*inputs, 0.2))


@pytest.mark.parametrize(
    "shapes, tau, match",
    [
        (((8, 16), (4, 16), (20, 12)), 0.2, "widths differ"),
        (((8, 16), (5, 16), (20, 16)), 0.2, "must be 2\\*B"),
        (((9, 16), (4, 16), (20, 16)), 0.2, "must be 2\\*B"),
        (((2, 16), (4, 16), (20, 16)), 0.2, "C >= 2"),
        (((8, 16), (4, 16), (0, 16)), 0.2, "queue is empty"),
        (((8, 16, 1), (4, 16), (20, 16)), 0.2, "expected student"),
        (((8, 16), (4, 16), (20, 16)), 0.0, "temperature"),
    ],
)
def test_bad_inputs(shapes, tau, match):
    with pytest.raises(ValueError, match=match):
        kernels.info_nce(*(torch.randn(s) for s in shapes), tau)


def test_bad_dtype():
    with pytest.raises(TypeError, match="float tensors"):
        kernels.info_nce(torch.randn(8, 16), torch.randn(4, 16), torch.ones(20, 16, dtype=torch.int32), 0.2)


# ---------------------------------------------------------------- GPU, full Mugs sizes


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_mugs_sizes(monkeypatch, batch, dtype):
    """12 crops x B student rows, 2 x B teacher rows, a 65,536 x 256 queue: bf16 inputs, or fp32 inputs under bf16
    autocast (the Mugs default); loss and gradients within bf16 accuracy of the fp32 reference, and far less
    memory than one (C*B x N) logits matrix."""
    monkeypatch.delenv("MUGS_KERNELS", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    student, teacher, queue = (
        F.normalize(torch.randn(r, 256, device="cuda", generator=g), dim=1).to(dtype)
        for r in (12 * batch, 2 * batch, 65536)
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss_and_grads(kernels.info_nce, student, teacher, queue, 0.2)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 12 * batch * 65536 * 4 / 8, f"peak extra memory {peak / 2**20:.0f} MiB"
    ref = loss_and_grads(kernels.info_nce_ref, student.float(), teacher.float(), queue.float(), 0.2)
    for value, r in zip(got, ref, strict=True):
        torch.testing.assert_close(value.float(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())
