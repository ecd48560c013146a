"""The vMF parts of the losses against independent references: scipy's von Mises-Fisher density,
step-by-step re-derivations of probability centering and of DINOv2's Sinkhorn-Knopp, and the flow
of gradients (student prototype norms only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import vonmises_fisher

from vmf_head import DINOvMFLoss, log_vmf_normalizer, vmf_logits
from vmf_head.functional import dino_vmf_loss, sinkhorn_centering

F64 = torch.float64


@pytest.mark.parametrize("p", [3, 5])
def test_softmax_of_vmf_logits_is_the_bayes_posterior(p):
    rng = np.random.default_rng(p)
    k, n, tau = 7, 11, 0.3
    w = rng.normal(size=(k, p)) * rng.uniform(0.2, 3.0, size=(k, 1))  # prototypes of unequal norms
    y = rng.normal(size=(n, p))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    norms = np.linalg.norm(w, axis=1)
    # Posterior of a uniform mixture of vMF(mu_k = w_k/||w_k||, kappa_k = ||w_k||/tau) given y.
    log_lik = np.stack([vonmises_fisher(w[j] / norms[j], norms[j] / tau).logpdf(y) for j in range(k)], axis=1)
    posterior = np.exp(log_lik - log_lik.max(1, keepdims=True))
    posterior /= posterior.sum(1, keepdims=True)
    logits = torch.from_numpy(y @ w.T)
    got = torch.softmax(vmf_logits(logits, torch.from_numpy(norms), tau, p), dim=-1)
    np.testing.assert_allclose(got.numpy(), posterior, rtol=1e-9, atol=1e-12)
    # Plain DINO logits ignore the normaliser: with unequal norms they are NOT the posterior.
    assert not np.allclose(torch.softmax(logits / tau, -1).numpy(), posterior, atol=1e-3)


def test_vmf_logits_are_float32_for_half_inputs():
    logits = torch.randn(3, 8, dtype=torch.bfloat16)
    out = vmf_logits(logits, torch.rand(8, dtype=torch.bfloat16) + 0.5, 0.1, 256)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _vmf_pair_loss(student, teacher_probs, norms, ncrops, tau_s, p):
    """DINO's pair-by-pair loop on vMF logits built directly from log C_p."""
    views = (student / tau_s + log_vmf_normalizer(norms / tau_s, p)).chunk(ncrops)
    total, terms = 0.0, 0
    for i, q in enumerate(teacher_probs.chunk(2)):
        for j, v in enumerate(views):
            if i != j:
                total = total + torch.sum(-q * F.log_softmax(v, -1), -1).mean()
                terms += 1
    return total / terms


def test_probability_centering_over_several_steps():
    """Step by step: pbar = softmax(l_t); q ~ pbar / c; c <- m c + (1 - m) mean(pbar), from c = 1/K;
    with the student's vMF logits, loss and gradients (student outputs and norms) match."""
    torch.manual_seed(3)
    k, ncrops, b, p, tau_s, m = 30, 5, 4, 16, 0.1, 0.8
    loss_fn = DINOvMFLoss(k, ncrops, 0.04, 0.07, 3, 5, tau_s, m, p=p, backend="reference").double()
    schedule = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(2) * 0.07))
    # The buffer starts at 1/K in float32 (then cast by .double()); the re-derivation starts from it.
    center = loss_fn.center.clone()
    torch.testing.assert_close(center, torch.full((1, k), 1.0 / k, dtype=F64), rtol=1e-7, atol=0)
    for epoch in range(5):
        student = torch.randn(ncrops * b, k, dtype=F64, requires_grad=True)
        teacher = torch.randn(2 * b, k, dtype=F64) * (1 + epoch)
        s_norms = (torch.rand(k, dtype=F64) + 0.5).requires_grad_()
        t_norms = torch.rand(k, dtype=F64) + 0.5
        tau_t = schedule[epoch]
        l_t = teacher / tau_t + log_vmf_normalizer(t_norms / tau_t, p)
        pbar = torch.exp(l_t - torch.logsumexp(l_t, -1, keepdim=True))
        q = pbar / center
        q = q / q.sum(-1, keepdim=True)
        expected = _vmf_pair_loss(student, q, s_norms, ncrops, tau_s, p)
        center = m * center + (1 - m) * pbar.mean(0, keepdim=True)
        g_expected = torch.autograd.grad(expected, (student, s_norms))
        got = loss_fn(student, teacher, epoch, s_norms, t_norms)
        g_got = torch.autograd.grad(got, (student, s_norms))
        assert abs(got.item() - expected.item()) <= 1e-9
        for a, e in zip(g_got, g_expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(loss_fn.center, center, rtol=1e-12, atol=0)
    assert abs(loss_fn.center.sum().item() - 1) < 1e-6


def test_gradient_reaches_the_student_norms_only():
    torch.manual_seed(4)
    k, ncrops, b = 16, 4, 3
    student = torch.randn(ncrops * b, k, requires_grad=True)
    teacher = torch.randn(2 * b, k, requires_grad=True)
    s_norms = (torch.rand(k) + 0.5).requires_grad_()
    t_norms = (torch.rand(k) + 0.5).requires_grad_()
    for centering in ("logit", "probability", "sinkhorn"):
        loss = DINOvMFLoss(k, ncrops, 0.04, 0.04, 0, 1, p=32, centering=centering)(
            student, teacher, 0, s_norms, t_norms
        )
        grads = torch.autograd.grad(loss, (student, teacher, s_norms, t_norms), allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert grads[1] is None and grads[3] is None, centering
        assert grads[2] is not None and grads[2].abs().sum() > 0


def _dinov2_sinkhorn(logits, n_iterations):
    """DINOv2's sinkhorn_knopp_teacher, single process, plain exponentials (float64)."""
    q = torch.exp(logits).t()
    n_samples, n_prototypes = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


def test_sinkhorn_matches_dinov2_and_balances_prototypes():
    torch.manual_seed(5)
    b, k, tau = 64, 8, 0.5
    teacher = torch.randn(b, k, dtype=F64) + torch.linspace(0, 3, k, dtype=F64)  # unbalanced prototypes
    correction = torch.randn(k, dtype=F64)
    for n in (1, 3):
        got = sinkhorn_centering(teacher, tau, correction, n)
        torch.testing.assert_close(got, _dinov2_sinkhorn(teacher / tau + correction, n), rtol=1e-12, atol=1e-15)
    balanced = sinkhorn_centering(teacher, tau, correction, 50)
    torch.testing.assert_close(balanced.sum(1), torch.ones(b, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(balanced.sum(0), torch.full((k,), b / k, dtype=F64), rtol=1e-3, atol=0)
    unbalanced = torch.softmax(teacher / tau + correction, -1).sum(0)
    assert (unbalanced - b / k).abs().max() > 10 * (balanced.sum(0) - b / k).abs().max()


def test_sinkhorn_stays_finite_where_exponentials_overflow():
    teacher = torch.tensor([[0.0, 50.0, -50.0], [30.0, 0.0, 0.0]])
    q = sinkhorn_centering(teacher, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def test_sinkhorn_loss_uses_the_sinkhorn_targets():
    torch.manual_seed(6)
    k, ncrops, b, tau_t = 12, 4, 6, 0.05
    student = torch.randn(ncrops * b, k, dtype=F64, requires_grad=True)
    teacher = torch.randn(2 * b, k, dtype=F64)
    got, stat = dino_vmf_loss(
        student, teacher, None, n_views=ncrops, student_temp=0.1, teacher_temp=tau_t, centering="sinkhorn"
    )
    q = _dinov2_sinkhorn(teacher / tau_t, 3)
    views = (student / 0.1).chunk(ncrops)
    expected = sum(
        torch.sum(-qi * F.log_softmax(views[j], -1), -1).mean()
        for i, qi in enumerate(q.chunk(2))
        for j in range(ncrops)
        if i != j
    ) / (2 * ncrops - 2)
    assert stat is None
    assert abs(got.item() - expected.item()) <= 1e-12
