import math

import pytest
import torch
import torch.nn.functional as F

from mugs_fast.losses import GroupLoss, InfoNCELoss


def _pairs(crops: int):
    """(teacher view i, student crop j) for j != i, split into global (j < 2) and local pairs."""
    pairs = [(i, j) for i in range(2) for j in range(crops) if j != i]
    return [p for p in pairs if p[1] < 2], [p for p in pairs if p[1] >= 2]


def _combine(terms: dict, crops: int) -> torch.Tensor:
    large, small = _pairs(crops)
    large_mean = sum(terms[p] for p in large) / len(large)
    return large_mean if not small else 0.5 * (large_mean + sum(terms[p] for p in small) / len(small))


def info_nce_fp64(s, t, queue, tau):
    """The spec's formula (5.1), pair by pair, in float64."""
    s, t, queue = s.double(), t.double(), queue.double()
    b = t.shape[0] // 2
    crops = s.shape[0] // b
    terms = {}
    for i, j in _pairs(crops)[0] + _pairs(crops)[1]:
        sj, ti = s[j * b : (j + 1) * b], t[i * b : (i + 1) * b]
        logits = torch.cat([(sj * ti).sum(1, keepdim=True), sj @ queue.T], dim=1) / tau
        terms[(i, j)] = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    return _combine(terms, crops)


def group_fp64(s, t, center, student_temp, teacher_temp):
    """The spec's formula (5.3), pair by pair, in float64."""
    s, t = s.double() / student_temp, t.double()
    q = F.softmax((t - center.double()) / teacher_temp, dim=-1)
    b = t.shape[0] // 2
    crops = s.shape[0] // b
    terms = {}
    for i, j in _pairs(crops)[0] + _pairs(crops)[1]:
        qi, sj = q[i * b : (i + 1) * b], s[j * b : (j + 1) * b]
        terms[(i, j)] = (-qi * F.log_softmax(sj, dim=-1)).sum(-1).mean()
    return _combine(terms, crops)


@pytest.mark.parametrize("crops", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_info_nce_against_float64_formula(crops, dtype):
    torch.manual_seed(0)
    b, e, n = 3, 7, 11
    s = F.normalize(torch.randn(crops * b, e, dtype=dtype), dim=1).requires_grad_()
    t = F.normalize(torch.randn(2 * b, e, dtype=dtype), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(n, e, dtype=dtype), dim=1)
    loss = InfoNCELoss(0.2)(s, t, queue)
    ref = info_nce_fp64(s, t, queue, 0.2)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)
    loss.backward()
    (grad_ref,) = torch.autograd.grad(info_nce_fp64(s, t, queue, 0.2), s)
    torch.testing.assert_close(s.grad.double(), grad_ref.double(), **tol)
    assert t.grad is None  # teacher targets are detached


@pytest.mark.parametrize("crops", [2, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_loss_against_float64_formula(crops, dtype):
    torch.manual_seed(0)
    b, k = 3, 13
    loss_fn = GroupLoss(k, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, k) * 0.3)
    s = (torch.randn(crops * b, k, dtype=dtype) * 2).requires_grad_()
    t = (torch.randn(2 * b, k, dtype=dtype) * 2).requires_grad_()
    center_before = loss_fn.center.clone()
    loss = loss_fn(s, t, teacher_temp=0.05)
    torch.testing.assert_close(loss_fn.center, center_before, rtol=0, atol=0)  # the loss never writes a buffer
    ref = group_fp64(s, t, center_before, 0.1, 0.05)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)
    loss.backward()
    (grad_ref,) = torch.autograd.grad(group_fp64(s, t, center_before, 0.1, 0.05), s)
    torch.testing.assert_close(s.grad.double(), grad_ref.double(), **tol)
    assert t.grad is None  # no gradient through the teacher


def test_update_center():
    torch.manual_seed(0)
    loss_fn = GroupLoss(9)
    loss_fn.center.copy_(torch.randn(1, 9))
    t = torch.randn(6, 9)
    expected = 0.9 * loss_fn.center + 0.1 * t.mean(0, keepdim=True)
    loss_fn.update_center(t)
    torch.testing.assert_close(loss_fn.center, expected)


def test_uniform_student_gives_log_k():
    # a student with constant logits predicts the uniform distribution: the loss is log K whatever the teacher
    loss = GroupLoss(37)(torch.zeros(12, 37), torch.randn(4, 37), teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(37), rel=1e-6)
