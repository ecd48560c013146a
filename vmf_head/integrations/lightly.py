"""DINO-vMF with lightly (``lightly.models.modules.DINOProjectionHead`` + ``lightly.loss.DINOLoss``).

Where the training code builds lightly's loss, add one line::

    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
    criterion = vmf_head.integrations.lightly.patch(model.student_head, model.teacher_head, criterion)

and build the student head with ``DINOProjectionHead(..., norm_last_layer=False)``. The returned loss is
called as lightly's: ``criterion(teacher_out, student_out, teacher_temp=None, epoch=None)`` with lists
of per-view outputs (teacher views first in the pairing; same view index skipped), the temperature
chosen by lightly's rule (the ``teacher_temp`` argument, else lightly's warm-up schedule at ``epoch``,
else the final temperature). As for DINO, the heads are not replaced: the norms are read from the
``last_layer`` (``weight_norm``'d linear) of lightly's heads at every call, student with gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import _loss_common as common
from ._common import ProbabilityCenterCheck, find_head, prototype_norms, prototype_shape, warn_if_frozen

__all__ = ["PatchedLightlyDINOLoss", "patch"]


class PatchedLightlyDINOLoss(ProbabilityCenterCheck, nn.Module):
    """DINO-vMF loss with lightly's ``DINOLoss`` call signature, bound to lightly's prototype layers.

    Args:
        student_layer, teacher_layer: the heads' ``last_layer`` modules.
        output_dim: K.
        teacher_temp: final teacher temperature; ``teacher_temp_schedule`` (tensor) the warm-up values
            used for ``epoch < warmup_teacher_temp_epochs``.
        student_temp, center_momentum: as lightly's.
        p, centering, mode, backend: as :class:`vmf_head.DINOvMFLoss`.

    Buffers:
        center: ``(1, 1, K)`` (lightly's shape); ``1/K`` at the start for probability centering.
    """

    center: torch.Tensor

    def __init__(
        self,
        student_layer: nn.Module,
        teacher_layer: nn.Module,
        *,
        output_dim: int,
        teacher_temp: float,
        teacher_temp_schedule: torch.Tensor,
        warmup_teacher_temp_epochs: int,
        student_temp: float,
        center_momentum: float,
        p: int,
        centering: str = "probability",
        mode: str = "exact",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        common.check_config(p, mode, centering, backend, {"center_momentum": center_momentum})
        self.output_dim = common.check_out_dim("output_dim", output_dim)
        self.teacher_temp = common.check_temperature("teacher_temp", teacher_temp)
        self.student_temp = common.check_temperature("student_temp", student_temp)
        self.teacher_temp_schedule = teacher_temp_schedule.clone()
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = float(center_momentum)
        self.p, self.centering, self.mode, self.backend = p, centering, mode, backend
        self.register_buffer("center", common.initial_center(centering, (1, 1, output_dim)))
        # A tuple, not attributes: see vmf_head.integrations.dino.PatchedDINOLoss.
        self._prototype_layers = (student_layer, teacher_layer)

    def temperature(self, teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> float:
        """lightly's choice: ``teacher_temp`` if given, else the warm-up value at ``epoch``, else the final."""
        if teacher_temp is not None:
            return common.check_temperature("teacher_temp", teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    def forward(
        self,
        teacher_out: Sequence[torch.Tensor],
        student_out: Sequence[torch.Tensor],
        teacher_temp: Optional[float] = None,
        epoch: Optional[int] = None,
    ) -> torch.Tensor:
        """Mean over view pairs (teacher view i, student view j, i != j) of the batch-mean cross-entropy
        between the centred teacher posterior and the student's vMF posterior; updates the center.

        Args:
            teacher_out: list of (B, K) teacher outputs, one per view.
            student_out: list of (B, K) student outputs, one per view (the first ones are the teacher's).
        """
        temp = self.temperature(teacher_temp, epoch)
        n_pairs = len(teacher_out) * len(student_out) - min(len(teacher_out), len(student_out))
        if n_pairs <= 0:
            raise ValueError(
                f"need at least two views in total with a cross-view pair, got {len(teacher_out)} teacher and "
                f"{len(student_out)} student view(s)"
            )
        student, teacher = torch.cat(list(student_out)), torch.cat(list(teacher_out))
        student_layer, teacher_layer = self._prototype_layers
        student_norms = prototype_norms(student_layer)
        with torch.no_grad():
            teacher_norms = prototype_norms(teacher_layer)
        student_correction, teacher_correction = common.corrections(
            student_norms, teacher_norms, self.output_dim, student_temp=self.student_temp, teacher_temp=temp,
            p=self.p, mode=self.mode,
        )
        # The same backend choice (fused Triton op on CUDA, reference otherwise) as vmf_head.DINOvMFLoss.
        dino_vmf_loss = common.loss_function("dino_vmf_loss", self.backend, self.centering, student.device)
        loss, stat = dino_vmf_loss(
            student,
            teacher,
            self.center.view(1, self.output_dim),
            n_views=len(student_out),
            n_global=len(teacher_out),
            student_temp=self.student_temp,
            teacher_temp=temp,
            student_correction=student_correction,
            teacher_correction=teacher_correction,
            centering=self.centering,
        )
        if stat is not None:
            common.update_centers_((self.center, stat, teacher.shape[0], self.center_momentum))
        return loss


def patch(
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: nn.Module,
    *,
    centering: str = "probability",
    mode: str = "exact",
    backend: str = "auto",
) -> PatchedLightlyDINOLoss:
    """The DINO-vMF version of lightly's ``DINOLoss`` for the given student and teacher heads.

    Args:
        student, teacher: lightly ``DINOProjectionHead``\\ s, or modules holding exactly one (e.g. a
            student backbone + head ``nn.Sequential``), possibly inside ``DistributedDataParallel``.
        dino_loss: ``lightly.loss.DINOLoss``; copied: ``teacher_temp``, ``student_temp``,
            ``center_momentum``, ``warmup_teacher_temp_epochs``, ``teacher_temp_schedule``, K from
            ``center``. With ``centering="logit"`` its center is carried over too.
        centering, mode, backend: as :func:`vmf_head.integrations.dino.patch`.

    Warns:
        FrozenNormsWarning: the student head was built with ``norm_last_layer=True`` (lightly's default).
    """
    student_layer = find_head(student, role="student").last_layer
    teacher_layer = find_head(teacher, role="teacher").last_layer
    shape = prototype_shape(student_layer)
    if prototype_shape(teacher_layer) != shape:
        raise ValueError(f"student prototypes (K, p) = {shape} but teacher prototypes {prototype_shape(teacher_layer)}")
    if dino_loss.center.shape[-1] != shape[0]:
        raise ValueError(f"dino_loss has output_dim {dino_loss.center.shape[-1]} but the heads have K = {shape[0]}")
    warn_if_frozen(student_layer, flag="DINOProjectionHead(..., norm_last_layer=False)")
    loss = PatchedLightlyDINOLoss(
        student_layer,
        teacher_layer,
        output_dim=shape[0],
        teacher_temp=float(dino_loss.teacher_temp),
        teacher_temp_schedule=torch.as_tensor(dino_loss.teacher_temp_schedule),
        warmup_teacher_temp_epochs=int(dino_loss.warmup_teacher_temp_epochs),
        student_temp=float(dino_loss.student_temp),
        center_momentum=float(dino_loss.center_momentum),
        p=shape[1],
        centering=centering,
        mode=mode,
        backend=backend,
    )
    if centering == "logit":
        loss.center.copy_(dino_loss.center.view_as(loss.center))
    return loss.to(dino_loss.center.device)
