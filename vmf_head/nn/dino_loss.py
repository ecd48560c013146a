"""DINOvMFLoss: DINO's multi-crop loss with the vMF normaliser and a choice of teacher centering.

Drop-in for ``main_dino.DINOLoss`` of facebookresearch/dino (same constructor arguments, same
``forward(student_output, teacher_output, epoch)``, a ``center`` buffer of shape ``(1, K)``), plus the
prototype norms that turn the logits into vMF log-posteriors (Govindarajan et al., ICLR 2023).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional.dino_loss import check_dino_inputs
from . import _loss_common as common


class DINOvMFLoss(nn.Module):
    """DINO-vMF loss (DINO's when no prototype norms are given).

    Args:
        out_dim: K, the number of prototypes.
        ncrops: number of student views (2 global + local crops); the teacher sees the 2 global ones.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: DINO's teacher
            temperature schedule ``concat(linspace(warmup, final, warmup_epochs), final...)``.
        student_temp: ``tau_s``.
        center_momentum: EMA momentum of the center.
        p: dimension of the sphere's ambient space (the head's bottleneck dim).
        centering: ``"probability"`` (default; DINO-vMF), ``"logit"`` (DINO) or ``"sinkhorn"`` (DINOv2).
        mode: normaliser ``"exact"`` or ``"approx"`` (see :func:`vmf_head.log_vmf_normalizer`).
        backend: ``"auto"`` (fused Triton op for CUDA inputs when available), ``"triton"`` or ``"reference"``.
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``centering="sinkhorn"``.
        check_finite: raise a ValueError naming a non-finite input when the loss is not finite:
            True always, False never, None (default) only where it needs no device sync (CPU).

    Buffers:
        center: ``(1, K)`` float32; starts at 0 (logit) or ``1/K`` (probability); Sinkhorn leaves it alone.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        p: int = 256,
        centering: str = "probability",
        mode: str = "exact",
        backend: str = "auto",
        sinkhorn_iterations: int = 3,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        common.check_config(p, mode, centering, backend, {"center_momentum": center_momentum})
        self.out_dim = common.check_out_dim("out_dim", out_dim)
        if isinstance(ncrops, bool) or not isinstance(ncrops, int) or ncrops < 2:
            raise ValueError(f"ncrops must be an int >= 2 (the 2 global crops + local crops), got {ncrops!r}")
        self.ncrops = ncrops
        self.student_temp = common.check_temperature("student_temp", student_temp)
        self.center_momentum = float(center_momentum)
        self.p, self.centering, self.mode, self.backend = p, centering, mode, backend
        self.sinkhorn_iterations = sinkhorn_iterations
        self.check_finite = check_finite
        self.teacher_temp_schedule = common.temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.register_buffer("center", common.initial_center(centering, (1, out_dim)))

    def forward(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        epoch: int,
        student_norms: torch.Tensor | None = None,
        teacher_norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of one step; updates the center (all-reduced over torch.distributed).

        Args:
            student_output: ``(ncrops * B, K)`` raw student head outputs ``w_k^T y``, views stacked.
            teacher_output: ``(2 * B, K)`` raw teacher outputs of the 2 global views.
            epoch: index into the teacher temperature schedule.
            student_norms: ``(K,)`` student prototype norms ``||w_k||`` (differentiable), or None.
            teacher_norms: ``(K,)`` teacher prototype norms, or None (both or neither).

        Returns:
            The scalar loss of the local batch (float32; float64 for float64 inputs).
        """
        temp = common.scheduled(self.teacher_temp_schedule, epoch)
        _, k = check_dino_inputs(student_output, teacher_output, n_views=self.ncrops, n_global=2)
        if k != self.out_dim:
            raise ValueError(f"the outputs have K={k} prototypes but the loss was built with out_dim={self.out_dim}")
        student_correction, teacher_correction = common.corrections(
            student_norms, teacher_norms, k, student_temp=self.student_temp, teacher_temp=temp, p=self.p, mode=self.mode
        )
        dino_vmf_loss = common.loss_function("dino_vmf_loss", self.backend, self.centering, student_output.device)
        loss, stat = dino_vmf_loss(
            student_output,
            teacher_output,
            self.center,
            n_views=self.ncrops,
            n_global=2,
            student_temp=self.student_temp,
            teacher_temp=temp,
            student_correction=student_correction,
            teacher_correction=teacher_correction,
            centering=self.centering,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )
        if common.should_check_finite(self.check_finite, loss.device):
            common.raise_if_not_finite(
                loss,
                {
                    "student_output": student_output,
                    "teacher_output": teacher_output,
                    "student_norms": student_norms,
                    "teacher_norms": teacher_norms,
                    "center": self.center,
                },
            )
        if stat is not None:
            common.update_centers_((self.center, stat, teacher_output.shape[0], self.center_momentum))
        return loss

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, ncrops={self.ncrops}, p={self.p}, centering={self.centering!r}, "
            f"mode={self.mode!r}, backend={self.backend!r}"
        )


