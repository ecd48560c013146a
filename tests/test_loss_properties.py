"""Symmetries of the loss (hypothesis): a softmax does not see a constant added to a row, and the
prototypes have no order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmf_head import DINOvMFLoss

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def _inputs(seed, k, ncrops, b, scale):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(ncrops * b, k, generator=g, dtype=F64) * scale
    teacher = torch.randn(2 * b, k, generator=g, dtype=F64) * scale
    s_norms = torch.rand(k, generator=g, dtype=F64) * 3 + 0.1
    t_norms = torch.rand(k, generator=g, dtype=F64) * 3 + 0.1
    return student, teacher, s_norms, t_norms


def _loss(centering, k, ncrops, center=None):
    loss = DINOvMFLoss(k, ncrops, 0.04, 0.07, 2, 4, p=8, centering=centering, backend="reference").double()
    if center is not None:
        loss.center.copy_(center)
    return loss


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 40),
    ncrops=st.integers(2, 5),
    b=st.integers(1, 4),
    scale=st.floats(0.01, 5.0),
    centering=st.sampled_from(["logit", "probability"]),
    epoch=st.integers(0, 3),
)
def test_row_constants_do_not_change_the_loss(seed, k, ncrops, b, scale, centering, epoch):
    student, teacher, s_norms, t_norms = _inputs(seed, k, ncrops, b, scale)
    g = torch.Generator().manual_seed(seed + 1)
    student_shift = torch.randn(ncrops * b, 1, generator=g, dtype=F64) * 10
    teacher_shift = torch.randn(2 * b, 1, generator=g, dtype=F64) * 10
    center = torch.softmax(torch.randn(1, k, generator=g, dtype=F64), -1)
    a, b_ = _loss(centering, k, ncrops, center), _loss(centering, k, ncrops, center)
    x = student.clone().requires_grad_()
    y = (student + student_shift).requires_grad_()
    la = a(x, teacher, epoch, s_norms, t_norms)
    lb = b_(y, teacher + teacher_shift, epoch, s_norms, t_norms)
    assert abs(la.item() - lb.item()) <= 1e-9 * max(1.0, abs(la.item()))
    torch.testing.assert_close(torch.autograd.grad(la, x)[0], torch.autograd.grad(lb, y)[0], rtol=1e-7, atol=1e-12)
    if centering == "probability":  # the statistic is a mean of probabilities: shift-free too
        torch.testing.assert_close(a.center, b_.center, rtol=1e-9, atol=1e-15)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 40),
    ncrops=st.integers(2, 5),
    b=st.integers(1, 4),
    centering=st.sampled_from(["logit", "probability", "sinkhorn"]),
)
def test_prototype_order_does_not_matter(seed, k, ncrops, b, centering):
    student, teacher, s_norms, t_norms = _inputs(seed, k, ncrops, b, 1.0)
    g = torch.Generator().manual_seed(seed + 2)
    perm = torch.randperm(k, generator=g)
    center = torch.softmax(torch.randn(1, k, generator=g, dtype=F64), -1)
    a, b_ = _loss(centering, k, ncrops, center), _loss(centering, k, ncrops, center[:, perm])
    sn, sn_perm = s_norms.clone().requires_grad_(), s_norms[perm].clone().requires_grad_()
    la = a(student, teacher, 1, sn, t_norms)
    lb = b_(student[:, perm], teacher[:, perm], 1, sn_perm, t_norms[perm])
    assert abs(la.item() - lb.item()) <= 1e-9 * max(1.0, abs(la.item()))
    torch.testing.assert_close(
        torch.autograd.grad(lb, sn_perm)[0], torch.autograd.grad(la, sn)[0][perm], rtol=1e-7, atol=1e-12
    )
    torch.testing.assert_close(b_.center, a.center[:, perm], rtol=1e-9, atol=1e-15)
