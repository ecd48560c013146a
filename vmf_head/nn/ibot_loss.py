"""iBOTvMFLoss: iBOT's loss (DINO on [CLS] + masked patch prediction) with the vMF normaliser.

Drop-in for ``main_ibot.iBOTLoss`` of bytedance/ibot: same constructor arguments and
``forward(student_output, teacher_output, student_local_cls, student_mask, epoch)``, centers ``center``
``(1, K)`` and ``center2`` ``(1, 1, K2)``, the dict ``{"cls", "patch", "loss"}``; plus the prototype
norms of both heads (Govindarajan et al., ICLR 2023, apply the vMF correction to iBOT's two heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_int, check_real, check_tensor
from ..functional.cross_entropy import Pairing
from ..functional.dino_loss import check_dino_inputs, check_patch_outputs
from .centered_loss import CenteredLoss, scheduled, temperature_schedule


def _stack_masks(
    student_mask: Sequence[torch.Tensor] | torch.Tensor, ngcrops: int, images: int, tokens: int
) -> torch.Tensor:
    """iBOT's masks (a sequence with one ``(B, H, W)`` or ``(B, N)`` bool mask per crop, of which the
    first ``ngcrops`` belong to the global views; or one tensor for the stacked global views) as
    ``(ngcrops * B, N)``."""
    if isinstance(student_mask, torch.Tensor):
        check_tensor("student_mask", student_mask, floating=False, shape="(ngcrops * B, H, W) or (ngcrops * B, N)")
        masks = student_mask
    elif isinstance(student_mask, Sequence) and len(student_mask) >= ngcrops:
        for i, m in enumerate(student_mask[:ngcrops]):
            check_tensor(f"student_mask[{i}]", m, floating=False, shape="(B, H, W) or (B, N)")
        masks = torch.cat([m.flatten(1) if m.dim() > 1 else m[:, None] for m in student_mask[:ngcrops]])
    else:
        raise ValueError(
            f"student_mask must be a tensor or a sequence of at least ngcrops={ngcrops} per-crop masks, "
            f"got {type(student_mask).__name__}"
        )
    if masks.dim() == 0 or masks.shape[0] != images or masks.numel() != images * tokens:
        raise ValueError(
            f"student_mask must cover ngcrops * B = {images} images of {tokens} patch tokens each, got shape "
            f"{tuple(masks.shape)}"
        )
    return masks.reshape(images, tokens)


class iBOTvMFLoss(CenteredLoss):
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
        lambda1, lambda2: weights of the [CLS] and patch terms (finite numbers).
        mim_start_epoch: see above.
        p, centering, mode, backend, sinkhorn_iterations, check_finite: as :class:`DINOvMFLoss` (``p``
            is the bottleneck dim of the head both prototype layers share); the centering applies to
            both terms.

    Buffers:
        center ``(1, K)``, center2 ``(1, 1, K2)``; ``teacher_temp_schedule``,
        ``teacher_temp2_schedule`` ``(nepochs,)`` float64, not saved.
    """

    center: torch.Tensor
    center2: torch.Tensor
    teacher_temp_schedule: torch.Tensor
    teacher_temp2_schedule: torch.Tensor

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
        self.patch_out_dim = check_int("patch_out_dim", patch_out_dim, minimum=1)
        self.ngcrops = check_int("ngcrops", ngcrops, minimum=1)
        self.nlcrops = check_int("nlcrops", nlcrops, minimum=0)
        if self.ngcrops + self.nlcrops < 2:
            raise ValueError("the [CLS] term needs at least 2 crops in total (ngcrops + nlcrops >= 2)")
        self.ncrops = self.ngcrops + self.nlcrops
        self.lambda1, self.lambda2 = check_real("lambda1", lambda1), check_real("lambda2", lambda2)
        schedule = temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        schedule2 = temperature_schedule(
            warmup_teacher_temp2,
            teacher_temp2,
            warmup_teacher_temp_epochs,
            nepochs,
            hold_epochs=mim_start_epoch,
            names=("warmup_teacher_temp2", "teacher_temp2"),
        )
        self.register_buffer("teacher_temp_schedule", schedule, persistent=False)
        self.register_buffer("teacher_temp2_schedule", schedule2, persistent=False)
        self._register_center("center", (1, self.out_dim), center_momentum, "center_momentum")
        self._register_center("center2", (1, 1, self.patch_out_dim), center_momentum2, "center_momentum2")

    def forward(
        self,
        student_output: tuple[torch.Tensor, torch.Tensor],
        teacher_output: tuple[torch.Tensor, torch.Tensor],
        student_local_cls: torch.Tensor | None,
        student_mask: Sequence[torch.Tensor] | torch.Tensor,
        epoch: int | torch.Tensor,
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
            epoch: index into the schedules (an int or a 0-d integer tensor).
            student_norms, teacher_norms: ``(cls_norms (K,), patch_norms (K2,))`` or None.

        Returns:
            ``{"cls": lambda1 * L_cls, "patch": lambda2 * L_patch, "loss": their sum}``.
        """
        temp = scheduled(self.teacher_temp_schedule, epoch)
        temp2 = scheduled(self.teacher_temp2_schedule, epoch, "teacher_temp2")
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
                check_tensor(name, x, dims=2, shape=f"(crops * B, out_dim={self.out_dim})")
                if x.shape[1] != self.out_dim:
                    raise ValueError(
                        f"{name} must be a (crops * B, out_dim={self.out_dim}) tensor, got shape {tuple(x.shape)}"
                    )
            student_cls = torch.cat([student_cls, student_local_cls])
        _, k = check_dino_inputs(student_cls, teacher_cls, n_views=self.ncrops, n_global=self.ngcrops)
        images, tokens, k2 = check_patch_outputs(
            student_patch, teacher_patch, names=("student_output[1]", "teacher_output[1]")
        )
        mask = _stack_masks(student_mask, self.ngcrops, images, tokens)
        if teacher_cls.shape[0] != images:
            raise ValueError(
                f"the [CLS] outputs cover {teacher_cls.shape[0]} global images but the patch outputs {images}"
            )
        if (k, k2) != (self.out_dim, self.patch_out_dim):
            raise ValueError(
                f"the outputs have K={k}, K2={k2} prototypes but the loss was built with "
                f"out_dim={self.out_dim}, patch_out_dim={self.patch_out_dim}"
            )
        s_norms = _pair("student_norms", student_norms) if student_norms is not None else (None, None)
        t_norms = _pair("teacher_norms", teacher_norms) if teacher_norms is not None else (None, None)
        corrections = self._corrections(
            (s_norms[0], t_norms[0]), k, temp, ("student_norms[0] (cls)", "teacher_norms[0] (cls)")
        )
        corrections2 = self._corrections(
            (s_norms[1], t_norms[1]), k2, temp2, ("student_norms[1] (patch)", "teacher_norms[1] (patch)")
        )
        loss_cls, stat = self._term(
            "center",
            student_cls,
            teacher_cls,
            Pairing(self.ncrops, self.ngcrops),
            teacher_temp=temp,
            corrections=corrections,
            student_norms=s_norms[0],
        )
        loss_patch, stat2 = self._patch_term(
            "center2", student_patch, teacher_patch, mask, teacher_temp=temp2, corrections=corrections2
        )
        loss_cls, loss_patch = loss_cls * self.lambda1, loss_patch * self.lambda2
        total = self._finish(
            loss_cls + loss_patch,
            {"center": (stat, teacher_cls.shape[0]), "center2": (stat2, images * tokens)},
            {"teacher_temp": temp, "teacher_temp2": temp2},
            lambda: (
                {
                    "student_output[0] (cls)": student_cls,
                    "student_output[1] (patch)": student_patch,
                    "teacher_output[0] (cls)": teacher_cls,
                    "teacher_output[1] (patch)": teacher_patch,
                    "center": self.center,
                    "center2": self.center2,
                },
                {
                    "student_norms[0]": s_norms[0],
                    "student_norms[1]": s_norms[1],
                    "teacher_norms[0]": t_norms[0],
                    "teacher_norms[1]": t_norms[1],
                },
            ),
        )
        return {"cls": loss_cls, "patch": loss_patch, "loss": total}

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, patch_out_dim={self.patch_out_dim}, ngcrops={self.ngcrops}, "
            f"nlcrops={self.nlcrops}, p={self.p}, centering={self.centering!r}, mode={self.mode!r}, "
            f"backend={self.backend!r}"
        )


def _pair(name: str, value: object) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (cls, patch), got {type(value).__name__}")
    return tuple(value)
