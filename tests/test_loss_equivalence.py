"""With equal prototype norms (or none) and logit centering, the vMF losses ARE DINO's and iBOT's.

The references below re-derive DINO's ``DINOLoss`` (facebookresearch/dino, main_dino.py) and iBOT's
``iBOTLoss`` (bytedance/ibot, main_ibot.py) from their documented behaviour: a log-softmax for every
(teacher view, student view) pair, a numpy linear warm-up of the teacher temperature, and an EMA of the
mean raw teacher output as the center. float64 throughout, several steps through the warm-up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vmf_head import DINOvMFLoss, iBOTvMFLoss
from vmf_head.functional import dino_vmf_loss

F64 = torch.float64


class EagerDINO:
    """DINO's loss, pair by pair."""

    def __init__(self, k, ncrops, warm, final, warm_epochs, nepochs, student_temp=0.1, momentum=0.9):
        self.ncrops, self.student_temp, self.momentum = ncrops, student_temp, momentum
        self.center = torch.zeros(1, k, dtype=F64)
        self.schedule = np.concatenate((np.linspace(warm, final, warm_epochs), np.ones(nepochs - warm_epochs) * final))

    def __call__(self, student, teacher, epoch, student_shift=None, teacher_shift=None):
        s = student / self.student_temp
        if student_shift is not None:
            s = s + student_shift
        t = (teacher - self.center) / self.schedule[epoch]
        if teacher_shift is not None:
            t = t + teacher_shift
        views = s.chunk(self.ncrops)
        targets = F.softmax(t, dim=-1).chunk(2)
        total, terms = 0.0, 0
        for i, q in enumerate(targets):
            for j, v in enumerate(views):
                if i != j:
                    total = total + torch.sum(-q * F.log_softmax(v, dim=-1), dim=-1).mean()
                    terms += 1
        self.center = self.center * self.momentum + teacher.mean(0, keepdim=True) * (1 - self.momentum)
        return total / terms


def test_dino_loss_matches_dino_over_the_warm_up():
    torch.manual_seed(0)
    k, ncrops, b, nepochs = 40, 6, 5, 7
    ours = DINOvMFLoss(k, ncrops, 0.04, 0.07, 4, nepochs, centering="logit", backend="reference").double()
    ref = EagerDINO(k, ncrops, 0.04, 0.07, 4, nepochs)
    for epoch in range(nepochs):
        student = torch.randn(ncrops * b, k, dtype=F64, requires_grad=True)
        teacher = torch.randn(2 * b, k, dtype=F64) + 0.3 * epoch
        expected = ref(student, teacher, epoch)
        (g_expected,) = torch.autograd.grad(expected, student)
        got = ours(student, teacher, epoch)
        (g_got,) = torch.autograd.grad(got, student)
        assert abs(got.item() - expected.item()) <= 1e-6
        torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(ours.center, ref.center, rtol=0, atol=1e-9)


def test_equal_norms_give_dino_exactly():
    """Equal norms add the same constant to every logit of a branch: the loss is DINO's (through the
    temperature warm-up), and the gradient reaching the common student norm is 0 up to rounding."""
    torch.manual_seed(1)
    k, ncrops, b, nepochs = 32, 4, 3, 4
    ours = DINOvMFLoss(k, ncrops, 0.04, 0.07, 3, nepochs, centering="logit", p=16, backend="reference").double()
    ref = EagerDINO(k, ncrops, 0.04, 0.07, 3, nepochs)
    for epoch in range(nepochs):
        student = torch.randn(ncrops * b, k, dtype=F64)
        teacher = torch.randn(2 * b, k, dtype=F64)
        common_norm = torch.tensor(1.7, dtype=F64, requires_grad=True)
        norms = common_norm.expand(k)
        got = ours(student, teacher, epoch, norms, norms.detach() * 1.1)
        (g_norms,) = torch.autograd.grad(got, common_norm)
        expected = ref(student, teacher, epoch)
        assert abs(got.item() - expected.item()) <= 1e-6
        assert g_norms.abs().sum().item() <= 1e-9


@pytest.mark.parametrize("n_global, n_views", [(1, 3), (3, 5), (3, 3)])
def test_other_numbers_of_global_views(n_global, n_views):
    """The functional form pairs every teacher view i with every student view j != i."""
    torch.manual_seed(7)
    k, b = 10, 4
    student = torch.randn(n_views * b, k, dtype=F64, requires_grad=True)
    teacher = torch.randn(n_global * b, k, dtype=F64)
    center = torch.randn(1, k, dtype=F64)
    q = F.softmax((teacher - center) / 0.05, -1).chunk(n_global)
    views = (student / 0.2).chunk(n_views)
    pairs = [(i, j) for i in range(n_global) for j in range(n_views) if i != j]
    expected = sum(torch.sum(-q[i] * F.log_softmax(views[j], -1), -1).mean() for i, j in pairs) / len(pairs)
    got, stat = dino_vmf_loss(
        student,
        teacher,
        center,
        n_views=n_views,
        n_global=n_global,
        student_temp=0.2,
        teacher_temp=0.05,
        centering="logit",
    )
    assert abs(got.item() - expected.item()) <= 1e-12
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(expected, student)[0])
    torch.testing.assert_close(stat, teacher.mean(0, keepdim=True))


class EagerIBOT:
    """iBOT's loss: DINO on [CLS] for pairs of different views, masked-token cross-entropy for the
    same global view, each image averaged over its masked tokens (at least one in the denominator)."""

    def __init__(self, k, k2, ng, nl, warm, final, warm2, final2, warm_epochs, nepochs, mim_start, l1, l2):
        self.ng, self.ncrops, self.l1, self.l2 = ng, ng + nl, l1, l2
        self.center = torch.zeros(1, k, dtype=F64)
        self.center2 = torch.zeros(1, 1, k2, dtype=F64)
        self.schedule = np.concatenate((np.linspace(warm, final, warm_epochs), np.ones(nepochs - warm_epochs) * final))
        self.schedule2 = np.concatenate(
            (
                np.ones(mim_start) * warm2,
                np.linspace(warm2, final2, warm_epochs),
                np.ones(nepochs - warm_epochs - mim_start) * final2,
            )
        )

    def __call__(self, s_cls, s_patch, t_cls, t_patch, s_local, masks, epoch):
        s_cls = torch.cat([s_cls, s_local]) / 0.1
        s_views, s_patches = s_cls.chunk(self.ncrops), (s_patch / 0.1).chunk(self.ng)
        q_cls = F.softmax((t_cls - self.center) / self.schedule[epoch], -1).chunk(self.ng)
        q_patch = F.softmax((t_patch - self.center2) / self.schedule2[epoch], -1).chunk(self.ng)
        cls, n_cls, patch, n_patch = 0.0, 0, 0.0, 0
        for i in range(self.ng):
            for j in range(self.ncrops):
                if i == j:
                    per_token = torch.sum(-q_patch[i] * F.log_softmax(s_patches[j], -1), -1)
                    m = masks[j].flatten(-2, -1).to(F64)
                    patch = patch + (torch.sum(per_token * m, -1) / m.sum(-1).clamp(min=1.0)).mean()
                    n_patch += 1
                else:
                    cls = cls + torch.sum(-q_cls[i] * F.log_softmax(s_views[j], -1), -1).mean()
                    n_cls += 1
        self.center = self.center * 0.9 + t_cls.mean(0, keepdim=True) * 0.1
        self.center2 = self.center2 * 0.9 + t_patch.mean(1).mean(0, keepdim=True)[:, None] * 0.1
        cls, patch = cls / n_cls * self.l1, patch / n_patch * self.l2
        return {"cls": cls, "patch": patch, "loss": cls + patch}


@pytest.mark.parametrize("mim_start", [0, 2])
def test_ibot_loss_matches_ibot_over_the_warm_up(mim_start):
    torch.manual_seed(2)
    k, k2, ng, nl, b, grid, nepochs = 24, 20, 2, 3, 3, (3, 2), 8
    n = grid[0] * grid[1]
    args = (k, k2, ng, nl, 0.04, 0.07, 0.03, 0.06, 3, nepochs)
    ours = iBOTvMFLoss(
        *args, lambda1=0.7, lambda2=1.3, mim_start_epoch=mim_start, centering="logit", backend="reference", p=12
    ).double()
    ref = EagerIBOT(*args, mim_start, 0.7, 1.3)
    for epoch in range(nepochs):
        s_cls = torch.randn(ng * b, k, dtype=F64, requires_grad=True)
        s_patch = torch.randn(ng * b, n, k2, dtype=F64, requires_grad=True)
        s_local = torch.randn(nl * b, k, dtype=F64, requires_grad=True)
        t_cls, t_patch = torch.randn(ng * b, k, dtype=F64), torch.randn(ng * b, n, k2, dtype=F64)
        masks = [torch.rand(b, *grid) < 0.4 for _ in range(ng + nl)]
        masks[0][0] = False  # an image without masked tokens contributes 0
        expected = ref(s_cls, s_patch, t_cls, t_patch, s_local, masks, epoch)
        # Equal norms within each head (different per head and branch) change nothing.
        s_norms = (torch.full((k,), 0.9, dtype=F64), torch.full((k2,), 1.3, dtype=F64))
        t_norms = (torch.full((k,), 1.1, dtype=F64), torch.full((k2,), 0.7, dtype=F64))
        got = ours((s_cls, s_patch), (t_cls, t_patch), s_local, masks, epoch, s_norms, t_norms)
        for key in ("cls", "patch", "loss"):
            assert abs(got[key].item() - expected[key].item()) <= 1e-6, key
        g_expected = torch.autograd.grad(expected["loss"], (s_cls, s_patch, s_local))
        g_got = torch.autograd.grad(got["loss"], (s_cls, s_patch, s_local))
        for a, e in zip(g_got, g_expected):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-9)
        torch.testing.assert_close(ours.center, ref.center, rtol=0, atol=1e-9)
        torch.testing.assert_close(ours.center2, ref.center2, rtol=0, atol=1e-9)
    assert ours.teacher_temp2_schedule.tolist() == ref.schedule2.tolist()


def test_ibot_without_masked_tokens_has_no_patch_loss():
    """Before iBOT's pred_start_epoch the masks are empty: the patch term is 0 with a zero gradient."""
    torch.manual_seed(8)
    k, k2, b, n = 8, 6, 2, 4
    loss = iBOTvMFLoss(k, k2, 2, 0, 0.04, 0.07, 0.04, 0.07, 1, 2, backend="reference")
    s_patch = torch.randn(2 * b, n, k2, requires_grad=True)
    out = loss(
        (torch.randn(2 * b, k), s_patch),
        (torch.randn(2 * b, k), torch.randn(2 * b, n, k2)),
        None,
        [torch.zeros(b, n, dtype=torch.bool)] * 2,
        0,
    )
    assert out["patch"].item() == 0.0 and torch.isfinite(out["loss"])
    (grad,) = torch.autograd.grad(out["loss"], s_patch)
    assert torch.equal(grad, torch.zeros_like(grad))
