"""Independent re-derivation of the DINO-vMF / iBOT-vMF losses for the integration tests.

Float64 throughout; the vMF normaliser comes from scipy's exponentially scaled Bessel function
(``log C_p(k) = nu log k - (p/2) log 2 pi - log ive(nu, k) - k``), its derivative from the Bessel ratio
(``d/dk log C_p = -I_{p/2}(k) / I_{p/2-1}(k)``), and the multi-crop loss is DINO's double loop over view
pairs, nothing taken from vmf_head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ive


class _LogCp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa, p):
        k = kappa.detach().cpu().numpy()
        nu = p / 2 - 1
        ctx.save_for_backward(kappa)
        ctx.p = p
        out = nu * np.log(k) - (p / 2) * math.log(2 * math.pi) - np.log(ive(nu, k)) - k
        return torch.as_tensor(out, dtype=torch.float64)

    @staticmethod
    def backward(ctx, grad):
        (kappa,) = ctx.saved_tensors
        k = kappa.detach().cpu().numpy()
        ratio = torch.as_tensor(ive(ctx.p / 2, k) / ive(ctx.p / 2 - 1, k), dtype=torch.float64)
        return -grad * ratio, None


def correction(norms: torch.Tensor, temp: float, p: int) -> torch.Tensor:
    """``log C_p(norms / temp)`` (K,), float64, differentiable in ``norms``."""
    return _LogCp.apply(norms.double() / temp, p)


def norms_of(layer) -> torch.Tensor:
    """``||w_k||`` of a weight_norm'd linear, from its effective weight (not from weight_g)."""
    weight = layer.weight_v * (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True))
    return weight.double().norm(dim=1)


def teacher_targets(teacher, norms, temp, p, center, centering):
    """``(q, stat)`` for raw teacher outputs (..., K): logit or probability centering (docs/design.md, section 2)."""
    t = teacher.double()
    corr = correction(norms, temp, p).detach()
    if centering == "logit":
        return torch.softmax((t - center.double()) / temp + corr, -1), t.reshape(-1, t.shape[-1]).mean(0)
    logits = t / temp + corr
    pbar = torch.softmax(logits, -1)
    return torch.softmax(logits - center.double().log(), -1), pbar.reshape(-1, t.shape[-1]).mean(0)


def multicrop(student_logits, q, n_views, n_global):
    """DINO's loop: mean over pairs (i teacher view, j student view, i != j) of mean_b CE(q_i, s_j)."""
    s_views, q_views = student_logits.chunk(n_views), q.chunk(n_global)
    total, terms = 0.0, 0
    for i, qi in enumerate(q_views):
        for j, sj in enumerate(s_views):
            if i != j:
                total = total + (-qi * torch.log_softmax(sj, -1)).sum(-1).mean()
                terms += 1
    return total / terms


def student_logits(student, norms, temp, p):
    return student.double() / temp + correction(norms, temp, p)


def masked_tokens(student_logits, q, mask):
    """lightly's masked-patch loss on selected tokens: rows are the masked tokens image by image (as
    ``x[mask]`` orders them); the mean over images of the mean over each image's masked tokens of
    CE(q, s), an image without masked tokens adding 0."""
    counts = [int(m.sum()) for m in mask.reshape(mask.shape[0], -1)]
    total, start = 0.0, 0
    for n in counts:
        if n:
            rows = slice(start, start + n)
            total = total + (-q[rows] * torch.log_softmax(student_logits[rows], -1)).sum(-1).mean()
        start += n
    return total / len(counts)
