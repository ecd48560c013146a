"""DINOvMFLoss: DINO's multi-crop loss with the vMF normaliser and a choice of teacher centering.

Drop-in for ``main_dino.DINOLoss`` of facebookresearch/dino (same constructor arguments, same
``forward(student_output, teacher_output, epoch)``, a ``center`` buffer of shape ``(1, K)``), plus the
prototype norms that turn the logits into vMF log-posteriors (Govindarajan et al., ICLR 2023).
"""

from __future__ import annotations

import torch

from .._validation import check_int
from ..functional.cross_entropy import Pairing
from ..functional.dino_loss import check_dino_inputs
from .centered_loss import CenteredLoss, scheduled, temperature_schedule

_NAMES = {name: name for name in ("student_output", "teacher_output", "student_norms", "teacher_norms", "teacher_temp")}


class DINOvMFLoss(CenteredLoss):
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
        centering, mode, backend, sinkhorn_iterations, check_finite: see :class:`CenteredLoss`
            (default: probability centering, the exact normaliser, the fused kernels on CUDA).

    Buffers:
        center: ``(1, K)`` float32; starts at 0 (logit) or ``1/K`` (probability); Sinkhorn leaves it alone.
        teacher_temp_schedule: ``(nepochs,)`` float64, not saved (DINO's checkpoints hold ``center`` only).

    Example:
        >>> loss_fn = DINOvMFLoss(65536, 10, 0.04, 0.07, 30, 100, p=256)
        >>> loss = loss_fn(student_out, teacher_out, epoch, student_norms=s_head.prototype_norms(),
        ...                teacher_norms=t_head.prototype_norms())
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
        super().__init__(
            p=p,
            student_temp=student_temp,
            centering=centering,
            mode=mode,
            backend=backend,
            sinkhorn_iterations=sinkhorn_iterations,
            check_finite=check_finite,
        )
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        self.ncrops = check_int("ncrops", ncrops, minimum=2, what="the 2 global crops + local crops")
        schedule = temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.register_buffer("teacher_temp_schedule", schedule, persistent=False)
        self._register_center("center", (1, self.out_dim), center_momentum, "center_momentum")

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
        teacher_temp = scheduled(self.teacher_temp_schedule, epoch)
        return self._multicrop_step(
            student_output,
            teacher_output,
            n_views=self.ncrops,
            n_teacher_views=2,
            teacher_temp=teacher_temp,
            norms=(student_norms, teacher_norms),
        )

    def _multicrop_step(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        *,
        n_views: int,
        n_teacher_views: int,
        teacher_temp: float | torch.Tensor,
        norms: tuple[torch.Tensor | None, torch.Tensor | None],
        names: dict[str, str] | None = None,
    ) -> torch.Tensor:
        """The step on stacked views: checks, corrections, the term, finiteness, the center update.
        ``names`` renames the inputs in errors (an adapter speaks of its codebase's arguments)."""
        names = {**_NAMES, **(names or {})}
        _, k = check_dino_inputs(student_output, teacher_output, n_views=n_views, n_global=n_teacher_views)
        if k != self.out_dim:
            raise ValueError(f"the outputs have K={k} prototypes but the loss was built with out_dim={self.out_dim}")
        corrections = self._corrections(norms, k, teacher_temp, (names["student_norms"], names["teacher_norms"]))
        loss, stat = self._term(
            "center",
            student_output,
            teacher_output,
            Pairing(n_views, n_teacher_views),
            teacher_temp=teacher_temp,
            corrections=corrections,
            student_norms=norms[0],
        )
        temperatures = {names["teacher_temp"]: teacher_temp}
        return self._finish(
            loss,
            {"center": (stat, teacher_output.shape[0])},
            temperatures,
            lambda: (
                {
                    names["student_output"]: student_output,
                    names["teacher_output"]: teacher_output,
                    "center": self.center,
                },
                {names["student_norms"]: norms[0], names["teacher_norms"]: norms[1]},
            ),
        )

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, ncrops={self.ncrops}, p={self.p}, centering={self.centering!r}, "
            f"mode={self.mode!r}, backend={self.backend!r}"
        )
