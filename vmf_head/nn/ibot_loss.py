"""iBOTvMFLoss: iBOT's loss (DINO on [CLS] + masked patch prediction) with the vMF normaliser.

Drop-in for ``main_ibot.iBOTLoss`` of bytedance/ibot: same constructor arguments and
``forward(student_output, teacher_output, student_local_cls, student_mask, epoch)``, centers ``center``
``(1, K)`` and ``center2`` ``(1, 1, K2)``, the dict ``{"cls", "patch", "loss"}``; plus the prototype
norms of both heads (Govindarajan et al., ICLR 2023, apply the vMF correction to iBOT's two heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..functional.dino_loss import check_dino_inputs, check_patch_inputs
from . import _loss_common as common


def _stack_masks(student_mask: Sequence[torch.Tensor] | torch.Tensor, ngcrops: int, images: int) -> torch.Tensor:
    """iBOT's masks (a sequence with one ``(B, H, W)`` or ``(B, N)`` bool mask per crop, of which the
    first ``ngcrops`` belong to the global views; or one tensor for the stacked global views) as
    ``(ngcrops * B, N)``."""
    if isinstance(student_mask, torch.Tensor):
        masks = student_mask
    elif isinstance(student_mask, Sequence) and len(student_mask) >= ngcrops:
        masks = torch.cat([m.flatten(1) if m.dim() > 1 else m[:, None] for m in student_mask[:ngcrops]])
    else:
        raise ValueError(
            f"student_mask must be a tensor or a sequence of at least ngcrops={ngcrops} per-crop masks, "
            f"got {type(student_mask).__name__}"
        )
    if masks.shape[0] != images:
        raise ValueError(f"student_mask covers {masks.shape[0]} images, expected ngcrops * B = {images}")
    return masks.reshape(images, -1)


class iBOTvMFLoss(nn.Module):
    """iBOT-vMF loss (iBOT's when no prototype norms are given).

    Args:
        out_dim, patch_out_dim: K and K2, prototypes of the [CLS] and the patch head.
        ngcrops, nlcrops: global and local crops.
        warmup_teacher_temp, teacher_temp: [CLS] teacher temperature schedule (as DINO's).
        warmup_teacher_temp2, teacher_temp2: patch teacher temperature schedule; it holds
            ``warmup_teacher_temp2`` for ``mim_start_epoch`` epochs before the linear warm-up.
        warmup_teacher_temp_epochs, nepochs: schedule lengths.
        student_temp: ``tau_s`` for both terms.
        center_momentum, center_momentum2: EMA momenta of ``center`` and ``center2``.
        lambda1, lambda2: weights of the [CLS] and patch terms.
        mim_start_epoch: see above.
        p, centering, mode, backend, sinkhorn_iterations, check_finite: as :class:`DINOvMFLoss`; the
            centering applies to both terms.
    """

    center: torch.Tensor
    center2: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        ngcrops: int,
        nlcrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp2: float,
        teacher_temp2: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        mim_start_epoch: int = 0,
        *,
        p: int = 256,
        centering: str = "probability",
        mode: str = "exact",
        backend: str = "auto",
        sinkhorn_iterations: int = 3,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        common.check_config(
            p, mode, centering, backend, {"center_momentum": center_momentum, "center_momentum2": center_momentum2}
        )
        self.out_dim = common.check_out_dim("out_dim", out_dim)
        self.patch_out_dim = common.check_out_dim("patch_out_dim", patch_out_dim)
        if isinstance(ngcrops, bool) or not isinstance(ngcrops, int) or ngcrops < 1:
            raise ValueError(f"ngcrops must be an int >= 1, got {ngcrops!r}")
        if isinstance(nlcrops, bool) or not isinstance(nlcrops, int) or nlcrops < 0:
            raise ValueError(f"nlcrops must be an int >= 0, got {nlcrops!r}")
        if ngcrops + nlcrops < 2:
            raise ValueError("the [CLS] term needs at least 2 crops in total (ngcrops + nlcrops >= 2)")
        self.ngcrops, self.nlcrops, self.ncrops = ngcrops, nlcrops, ngcrops + nlcrops
        self.student_temp = common.check_temperature("student_temp", student_temp)
        self.center_momentum, self.center_momentum2 = float(center_momentum), float(center_momentum2)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.p, self.centering, self.mode, self.backend = p, centering, mode, backend
        self.sinkhorn_iterations = sinkhorn_iterations
        self.check_finite = check_finite
        self.teacher_temp_schedule = common.temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.teacher_temp2_schedule = common.temperature_schedule(
            warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs, hold_epochs=mim_start_epoch
        )
        self.register_buffer("center", common.initial_center(centering, (1, out_dim)))
        self.register_buffer("center2", common.initial_center(centering, (1, 1, patch_out_dim)))

    def forward(
        self,
        student_output: tuple[torch.Tensor, torch.Tensor],
        teacher_output: tuple[torch.Tensor, torch.Tensor],
        student_local_cls: torch.Tensor | None,
        student_mask: Sequence[torch.Tensor] | torch.Tensor,
        epoch: int,
        student_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
        teacher_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss of one step; updates ``center`` and ``center2`` (one all-reduce).

        Args:
            student_output: ``(cls, patch)``: ``(ngcrops * B, K)`` and ``(ngcrops * B, N, K2)`` raw
                outputs of the student on the (masked) global crops.
            teacher_output: ``(cls, patch)`` of the teacher on the same global crops.
            student_local_cls: ``(nlcrops * B, K)`` student [CLS] outputs of the local crops, or None
                when ``nlcrops == 0``.
            student_mask: iBOT's masks: a sequence of per-crop ``(B, H, W)`` (or ``(B, N)``) bool masks,
                the first ``ngcrops`` used; or one ``(ngcrops * B, N)`` tensor. True = masked.
            epoch: index into the schedules.
            student_norms, teacher_norms: ``(cls_norms (K,), patch_norms (K2,))`` or None.

        Returns:
            ``{"cls": lambda1 * L_cls, "patch": lambda2 * L_patch, "loss": their sum}``.
        """
        temp = common.scheduled(self.teacher_temp_schedule, epoch)
        temp2 = common.scheduled(self.teacher_temp2_schedule, epoch, "teacher_temp2")
        student_cls, student_patch = _pair("student_output", student_output)
        teacher_cls, teacher_patch = _pair("teacher_output", teacher_output)
        if (student_local_cls is None) != (self.nlcrops == 0):
            raise ValueError(
                f"student_local_cls must hold the {self.nlcrops} local crops' [CLS] outputs"
                if self.nlcrops
                else "student_local_cls must be None when nlcrops == 0"
            )
        if student_local_cls is not None:
            for name, x in (("student_output[0]", student_cls), ("student_local_cls", student_local_cls)):
                if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.out_dim:
                    raise ValueError(f"{name} must be a (crops * B, out_dim={self.out_dim}) tensor, got {getattr(x, 'shape', x)!r}")
            student_cls = torch.cat([student_cls, student_local_cls])
        _, k = check_dino_inputs(student_cls, teacher_cls, n_views=self.ncrops, n_global=self.ngcrops)
        if not isinstance(student_patch, torch.Tensor) or student_patch.dim() != 3:
            raise ValueError(f"student_output[1] must be a (ngcrops * B, N, K2) tensor, got {getattr(student_patch, 'shape', student_patch)!r}")
        mask = _stack_masks(student_mask, self.ngcrops, student_patch.shape[0])
        images, _, k2 = check_patch_inputs(student_patch, teacher_patch, mask)
        if teacher_cls.shape[0] != images:
            raise ValueError(f"the [CLS] outputs cover {teacher_cls.shape[0]} global images but the patch outputs {images}")
        if (k, k2) != (self.out_dim, self.patch_out_dim):
            raise ValueError(
                f"the outputs have K={k}, K2={k2} prototypes but the loss was built with "
                f"out_dim={self.out_dim}, patch_out_dim={self.patch_out_dim}"
            )
        s_norms = _pair("student_norms", student_norms) if student_norms is not None else (None, None)
        t_norms = _pair("teacher_norms", teacher_norms) if teacher_norms is not None else (None, None)
        corr = common.corrections(
            s_norms[0], t_norms[0], k, student_temp=self.student_temp, teacher_temp=temp, p=self.p, mode=self.mode, what="[0] (cls)"
        )
        corr2 = common.corrections(
            s_norms[1], t_norms[1], k2, student_temp=self.student_temp, teacher_temp=temp2, p=self.p, mode=self.mode, what="[1] (patch)"
        )
        device = student_cls.device
        dino_vmf_loss = common.loss_function("dino_vmf_loss", self.backend, self.centering, device)
        ibot_patch_vmf_loss = common.loss_function("ibot_patch_vmf_loss", self.backend, self.centering, device)
        # Only the reference does Sinkhorn, and only it takes the iteration count of the patch term.
        sinkhorn = {"sinkhorn_iterations": self.sinkhorn_iterations} if self.centering == "sinkhorn" else {}
        loss_cls, stat = dino_vmf_loss(
            student_cls,
            teacher_cls,
            self.center,
            n_views=self.ncrops,
            n_global=self.ngcrops,
            student_temp=self.student_temp,
            teacher_temp=temp,
            student_correction=corr[0],
            teacher_correction=corr[1],
            centering=self.centering,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )
        loss_patch, stat2 = ibot_patch_vmf_loss(
            student_patch,
            teacher_patch,
            mask,
            self.center2,
            student_temp=self.student_temp,
            teacher_temp=temp2,
            student_correction=corr2[0],
            teacher_correction=corr2[1],
            centering=self.centering,
            **sinkhorn,
        )
        loss_cls, loss_patch = loss_cls * self.lambda1, loss_patch * self.lambda2
        total = loss_cls + loss_patch
        if common.should_check_finite(self.check_finite, total.device):
            common.raise_if_not_finite(
                total,
                {
                    "student_output[0] (cls)": student_cls,
                    "student_output[1] (patch)": student_patch,
                    "teacher_output[0] (cls)": teacher_cls,
                    "teacher_output[1] (patch)": teacher_patch,
                    "student_norms[0]": s_norms[0],
                    "student_norms[1]": s_norms[1],
                    "teacher_norms[0]": t_norms[0],
                    "teacher_norms[1]": t_norms[1],
                    "center": self.center,
                    "center2": self.center2,
                },
            )
        if stat is not None:
            common.update_centers_(
                (self.center, stat, teacher_cls.shape[0], self.center_momentum),
                (self.center2, stat2, teacher_patch.shape[0] * teacher_patch.shape[1], self.center_momentum2),
            )
        return {"cls": loss_cls, "patch": loss_patch, "loss": total}

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, patch_out_dim={self.patch_out_dim}, ngcrops={self.ngcrops}, "
            f"nlcrops={self.nlcrops}, p={self.p}, centering={self.centering!r}, mode={self.mode!r}, backend={self.backend!r}"
        )


def _pair(name: str, value: object) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (cls, patch), got {type(value).__name__}")
    return tuple(value)
