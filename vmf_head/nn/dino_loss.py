"""DINOvMFLoss: DINO's multi-crop loss with the vMF normaliser and a choice of teacher centering.

Drop-in for ``main_dino.DINOLoss`` of facebookresearch/dino (same constructor arguments, same
``forward(student_output, teacher_output, epoch)``, a ``center`` buffer of shape ``(1, K)``), plus the
prototype norms that turn the logits into vMF log-posteriors (Govindarajan et al., ICLR 2023).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int, check_temperature
from ..functional.dino_loss import check_dino_inputs, dino_vmf_loss
from . import _loss_common as common


class DINOvMFLoss(common.ProbabilityCenterCheck, nn.Module):
    """DINO-vMF loss (DINO's when no prototype norms are given).

    Args:
        out_dim: K, the number of prototypes.
        ncrops: number of student views (2 global + local crops); the teacher sees the 2 global ones.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: DINO's teacher
            temperature schedule ``concat(linspace(warmup, final, warmup_epochs), final...)``.
        student_temp: ``tau_s``.
        center_momentum: EMA momentum of the center.
        p: dimension of the sphere's ambient space, the head's bottleneck dim (``head.p``; 256 in
            DINO). Required when the forward gets prototype norms: the correction log C_p depends on
            it, and no default could be right for every head.
        centering: ``"probability"`` (default; DINO-vMF), ``"logit"`` (DINO) or ``"sinkhorn"`` (DINOv2).
        mode: normaliser ``"exact"`` or ``"approx"`` (see :func:`vmf_head.log_vmf_normalizer`).
        backend: ``"auto"`` (fused Triton op for CUDA inputs when available), ``"triton"`` or ``"reference"``.
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``centering="sinkhorn"``.
        check_finite: check on the device that the loss is finite and the temperature positive,
            without a host sync (``torch._assert_async``; see ``docs/loss.md``). On the CPU a failure
            is a ValueError naming the bad input; on CUDA a device-side assert.

    Buffers:
        center: ``(1, K)`` float32; starts at 0 (logit) or ``1/K`` (probability); Sinkhorn leaves it
            alone. A probability-centred loss refuses a checkpoint whose center is not a distribution.
        teacher_temp_schedule: ``(nepochs,)`` float64, not saved (DINO's checkpoints hold ``center`` only).
    """

    center: torch.Tensor
    teacher_temp_schedule: torch.Tensor

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
        p: int | None = None,
        centering: str = "probability",
        mode: str = "exact",
        backend: str = "auto",
        sinkhorn_iterations: int = 3,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.p = common.check_config(p, mode, centering, backend, {"center_momentum": center_momentum})
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        self.ncrops = check_int("ncrops", ncrops, minimum=2, what="the 2 global crops + local crops")
        self.student_temp = check_temperature("student_temp", student_temp)
        self.center_momentum = float(center_momentum)
        self.centering, self.mode, self.backend = centering, mode, backend
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        self.check_finite = bool(check_finite)
        schedule = common.temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.register_buffer("teacher_temp_schedule", schedule, persistent=False)
        self.register_buffer("center", common.initial_center(centering, (1, self.out_dim)))

    def forward(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        epoch: int | torch.Tensor,
        student_norms: torch.Tensor | None = None,
        teacher_norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of one step; updates the center (all-reduced over torch.distributed).

        Args:
            student_output: ``(ncrops * B, K)`` raw student head outputs ``w_k^T y``, views stacked.
            teacher_output: ``(2 * B, K)`` raw teacher outputs of the 2 global views.
            epoch: index into the teacher temperature schedule: an int, or a 0-d integer tensor (then
                a compiled step never specialises on its value).
            student_norms: ``(K,)`` student prototype norms ``||w_k||`` (differentiable), or None.
            teacher_norms: ``(K,)`` teacher prototype norms, or None (both or neither).

        Returns:
            The scalar loss of the local batch (float32; float64 for float64 outputs; 0 for B = 0).
        """
        temp = common.scheduled(self.teacher_temp_schedule, epoch)
        _, k = check_dino_inputs(student_output, teacher_output, n_views=self.ncrops, n_global=2)
        if k != self.out_dim:
            raise ValueError(f"the outputs have K={k} prototypes but the loss was built with out_dim={self.out_dim}")
        student_correction, teacher_correction = common.corrections(
            student_norms, teacher_norms, k, student_temp=self.student_temp, teacher_temp=temp, p=self.p, mode=self.mode
        )
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
            backend=self.backend,
        )
        if self.check_finite:
            common.assert_finite(
                loss,
                {"teacher_temp": temp},
                lambda: common.diagnose_nonfinite(
                    {"student_output": student_output, "teacher_output": teacher_output, "center": self.center},
                    {"student_norms": student_norms, "teacher_norms": teacher_norms},
                    {"teacher_temp": temp},
                ),
            )
        common.update_centers_((self.center, stat, teacher_output.shape[0], self.center_momentum))
        return loss

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, ncrops={self.ncrops}, p={self.p}, centering={self.centering!r}, "
            f"mode={self.mode!r}, backend={self.backend!r}"
        )
