"""DINO-vMF with lightly (``lightly.models.modules.DINOProjectionHead`` + ``lightly.loss.DINOLoss``).

Where the training code builds lightly's loss, add one line::

    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
    criterion = vmf_head.integrations.lightly.patch(model.student_head, model.teacher_head, criterion)

and build the student head with ``DINOProjectionHead(..., norm_last_layer=False)``. The line also
switches lightly's logit centering to probability centering, the seed's DINO-vMF; pass
``centering="logit"`` to keep lightly's. The returned loss is called as lightly's:
``criterion(teacher_out, student_out, teacher_temp=None, epoch=None)`` with lists of per-view outputs
(teacher views first in the pairing; same view index skipped; more teacher than student views is
fine), the temperature chosen by lightly's rule (the ``teacher_temp`` argument, a number or a 0-d
tensor, else lightly's warm-up schedule at ``epoch``, else the final temperature), and it has
lightly's ``update_center(teacher_out)``. As for DINO, the heads are not replaced: the norms are
read from the ``last_layer`` (``weight_norm``'d linear) of lightly's heads at every call, student
with gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_int, check_temperature, check_tensor
from ..functional.centering import teacher_logits
from ..nn import DINOvMFLoss
from ..nn.centered_loss import scheduled
from ._common import find_head, prototype_norms, prototype_shape, require_attributes, warn_if_frozen

__all__ = ["PatchedLightlyDINOLoss", "patch"]


class PatchedLightlyDINOLoss(DINOvMFLoss):
    """:class:`vmf_head.DINOvMFLoss` adapted to lightly's ``DINOLoss`` call, bound to lightly's prototype layers.

    Args:
        student_layer, teacher_layer: the heads' ``last_layer`` modules.
        output_dim: K.
        teacher_temp: final teacher temperature; ``teacher_temp_schedule`` (tensor) the warm-up values
            used for ``epoch < warmup_teacher_temp_epochs``.
        student_temp, center_momentum: as lightly's.
        p, centering, mode, backend, check_finite: as :class:`vmf_head.DINOvMFLoss`.

    Buffers:
        center: ``(1, 1, K)`` (lightly's shape); ``1/K`` at the start for probability centering.
        teacher_temp_schedule: lightly's warm-up values followed by the final temperature, float64, not saved.
    """

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
        check_finite: bool = True,
    ) -> None:
        warmup_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, minimum=0)
        final = check_temperature("teacher_temp", teacher_temp)
        super().__init__(
            output_dim,
            2,
            final,
            final,
            0,
            warmup_epochs + 1,
            student_temp,
            center_momentum,
            p=p,
            centering=centering,
            mode=mode,
            backend=backend,
            check_finite=check_finite,
        )
        # lightly's rule as a lookup: epoch e < W reads its warm-up value, every later epoch the final one.
        warmup = torch.as_tensor(teacher_temp_schedule, dtype=torch.float64)[:warmup_epochs]
        self.teacher_temp_schedule[: len(warmup)] = warmup
        self.warmup_teacher_temp_epochs = warmup_epochs
        self._register_center("center", (1, 1, self.out_dim), center_momentum, "center_momentum")  # lightly's shape
        # A tuple, not attributes: see vmf_head.integrations.dino.PatchedDINOLoss.
        self._prototype_layers = (student_layer, teacher_layer)

    def temperature(self, teacher_temp: float | torch.Tensor | None = None, epoch: int | None = None):
        """lightly's choice: ``teacher_temp`` if given, else the warm-up value at ``epoch``, else the
        final; a number as given, otherwise a 0-d tensor on the loss's device (no host sync)."""
        if teacher_temp is not None:
            return check_temperature("teacher_temp", teacher_temp)
        if epoch is None:
            return self.teacher_temp_schedule[-1]
        epoch = check_int("epoch", epoch, minimum=0)
        return scheduled(self.teacher_temp_schedule, min(epoch, self.warmup_teacher_temp_epochs))

    def _norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        student_layer, teacher_layer = self._prototype_layers
        student_norms = prototype_norms(student_layer)
        with torch.no_grad():
            teacher_norms = prototype_norms(teacher_layer)
        return student_norms, teacher_norms

    def forward(
        self,
        teacher_out: Sequence[torch.Tensor],
        student_out: Sequence[torch.Tensor],
        teacher_temp: float | torch.Tensor | None = None,
        epoch: int | None = None,
    ) -> torch.Tensor:
        """Mean over view pairs (teacher view i, student view j, i != j) of the batch-mean cross-entropy
        between the centered teacher posterior and the student's vMF posterior; updates the center.

        Args:
            teacher_out: list of (B, K) teacher outputs, one per view.
            student_out: list of (B, K) student outputs, one per view (the first ones are the teacher's).
        """
        temp = self.temperature(teacher_temp, epoch)
        teacher = _stack_views("teacher_out", teacher_out, self.out_dim)
        student = _stack_views("student_out", student_out, self.out_dim)
        n_teacher, n_student = len(teacher_out), len(student_out)
        if n_teacher * n_student - min(n_teacher, n_student) == 0:
            raise ValueError(
                f"need at least two views in total with a cross-view pair, got {n_teacher} teacher and "
                f"{n_student} student view(s)"
            )
        if teacher.shape[0] // n_teacher != student.shape[0] // n_student:
            raise ValueError(
                f"teacher_out and student_out views must have the same batch size, got "
                f"{teacher.shape[0] // n_teacher} and {student.shape[0] // n_student}"
            )
        return self._multicrop_step(
            student,
            teacher,
            n_views=n_student,
            n_teacher_views=n_teacher,
            teacher_temp=temp,
            norms=self._norms(),
            names=_LIGHTLY_NAMES,
        )

    @torch.no_grad()
    def update_center(
        self, teacher_out: torch.Tensor, teacher_temp: float | torch.Tensor | None = None, epoch: int | None = None
    ) -> None:
        """lightly's moving-average update of the center from ``teacher_out`` ``(views, B, K)``, averaged
        over its dims 0 and 1 as lightly does (a 2-D tensor is averaged over every entry, as lightly's
        own ``update_center`` does). Logit centering averages the raw outputs (lightly's update);
        probability centering averages the teacher's vMF posterior at the temperature of lightly's rule;
        Sinkhorn keeps no center. ``forward`` already updates the center: call this only for outputs
        it did not see."""
        teacher_out = check_tensor("teacher_out", teacher_out, dims=(2, 3), shape="(views, B, K)")
        if self.centering == "sinkhorn":
            return
        if self.centering == "probability":
            temp = self.temperature(teacher_temp, epoch)
            _, teacher_correction = self._corrections(self._norms(), self.out_dim, temp, _NORM_NAMES)
            teacher_out = torch.softmax(teacher_logits(teacher_out, temp, teacher_correction), dim=-1)
        stat = teacher_out.float().mean(dim=(0, 1)).expand(self.out_dim)
        self._update_centers({"center": (stat, teacher_out.shape[0] * teacher_out.shape[1])})


_NORM_NAMES = ("student last_layer norms", "teacher last_layer norms")
_LIGHTLY_NAMES = {
    "student_output": "student_out",
    "teacher_output": "teacher_out",
    "student_norms": _NORM_NAMES[0],
    "teacher_norms": _NORM_NAMES[1],
}


def _stack_views(name: str, views: object, k: int) -> torch.Tensor:
    """lightly's list of per-view ``(B, K)`` outputs as one ``(views * B, K)`` tensor, checked in its terms."""
    if isinstance(views, torch.Tensor) or not isinstance(views, Sequence) or not views:
        raise TypeError(f"{name} must be a non-empty list of (B, K) tensors, one per view, got {type(views).__name__}")
    for i, view in enumerate(views):
        check_tensor(f"{name}[{i}]", view, dims=2, shape=f"(B, K = {k})")
        if view.shape != views[0].shape or view.shape[1] != k:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(view.shape)}; every view must be (B, K = {k}) like "
                f"{name}[0] {tuple(views[0].shape)}"
            )
    return torch.cat(list(views))


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
        centering: ``"probability"`` (DINO-vMF, default: NOT lightly's own centering), ``"logit"``
            (lightly's) or ``"sinkhorn"``.
        mode, backend: as :func:`vmf_head.integrations.dino.patch`.

    Warns:
        FrozenNormsWarning: the student head was built with ``norm_last_layer=True`` (lightly's default).
    """
    require_attributes(
        "dino_loss",
        dino_loss,
        (
            "teacher_temp",
            "student_temp",
            "center_momentum",
            "warmup_teacher_temp_epochs",
            "teacher_temp_schedule",
            "center",
        ),
        "lightly's DINOLoss",
    )
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
