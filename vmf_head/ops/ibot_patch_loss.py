"""Fused Triton iBOT-vMF masked patch loss (the MIM term of iBOT, Zhou et al., ICLR 2022, with the
vMF logits of Govindarajan et al., ICLR 2023).

Same contract as the reference ``vmf_head.functional.dino_loss.ibot_patch_vmf_loss``. It runs the
kernels of ``ops/dino_loss.py`` with the self-pairing layout: every student token is paired with the
teacher token at the same index only, tokens are tiled ``_TOKENS_PER_TILE`` at a time, and the loss
weight of a token is ``mask / max(1, masked tokens of its image) / images``, so unmasked tokens are
never read for the loss (they still count for the centre statistic, as iBOT's ``center2``).
"""

from __future__ import annotations

import torch
import triton

from ..functional.dino_loss import check_patch_inputs
from ..functional.vmf import compute_dtype
from .dino_loss import CENTERINGS, PairLayout, check_fused_arguments, fused_cross_entropy

__all__ = ["CENTERINGS", "ibot_patch_vmf_loss"]

# Independent tokens per [tokens, BLOCK_K] tile (not tuned on a GPU yet; see docs/fused_loss.md).
_TOKENS_PER_TILE = 4


def ibot_patch_vmf_loss(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    mask: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    student_correction: torch.Tensor | None = None,
    teacher_correction: torch.Tensor | None = None,
    centering: str = "probability",
    sinkhorn_iterations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """iBOT-vMF patch loss, fused (the contract of ``vmf_head.functional.ibot_patch_vmf_loss``).

        l_s = student_patch / student_temp + student_correction
        q   = softmax of the centred teacher vMF logits (as ``ops.dino_loss.dino_vmf_loss``)
        ce[b, n] = -q[b, n] . log_softmax(l_s[b, n])
        loss = mean_b  sum_n mask[b, n] ce[b, n] / max(1, sum_n mask[b, n])

    Args:
        student_patch: (B, N, K2) raw student patch outputs (B = global views x images, stacked like
            the teacher and the mask), any float dtype.
        teacher_patch: (B, N, K2) raw teacher patch outputs; no gradient.
        mask: (B, N), True (non-zero) for the masked tokens (the only ones in the loss).
        center: (1, 1, K2) logit or probability centre (iBOT's ``center2``).
        student_temp, teacher_temp: temperatures (teacher_temp: iBOT's scheduled ``teacher_temp2``).
        student_correction: (K2,) log C_p(||w_s|| / student_temp), receives a gradient; or None.
        teacher_correction: (K2,) log C_p(||w_t|| / teacher_temp), constant; or None.
        centering: ``"logit"`` or ``"probability"`` (``"sinkhorn"``: ValueError, reference only).
        sinkhorn_iterations: accepted for the shared signature; unused (no Sinkhorn here).

    Returns:
        (loss, batch_stat): the scalar loss and the (1, 1, K2) mean over all B x N local teacher
        tokens (masked or not) of teacher_patch (logit) or of pbar (probability), both float32
        (float64 when an input is float64). Gradients flow to student_patch and student_correction.
    """
    images, tokens, K = check_patch_inputs(student_patch, teacher_patch, mask)
    check_fused_arguments(
        dict(student_patch=student_patch, teacher_patch=teacher_patch, mask=mask, center=center,
             student_correction=student_correction, teacher_correction=teacher_correction),
        K, (1, 1, K), student_temp, teacher_temp, centering)
    rows = images * tokens
    if rows == 0:
        raise ValueError("student_patch has no tokens")
    dtype = compute_dtype(student_patch, teacher_patch, student_correction, teacher_correction)
    selected = mask.to(torch.bool).to(dtype)
    weights = (selected / (selected.sum(dim=1, keepdim=True).clamp(min=1.0) * images)).reshape(-1)
    layout = PairLayout(n_groups=triton.cdiv(rows, _TOKENS_PER_TILE), n_views=_TOKENS_PER_TILE,
                        n_teacher_views=_TOKENS_PER_TILE, view_stride=1,
                        group_stride=_TOKENS_PER_TILE, pair_self=True)
    loss, stat = fused_cross_entropy(
        student_patch.reshape(rows, K), student_correction, teacher_patch.detach().reshape(rows, K),
        teacher_correction, center, weights, layout,
        student_temp=student_temp, teacher_temp=teacher_temp, centering=centering)
    return loss, stat.reshape(1, 1, K)
