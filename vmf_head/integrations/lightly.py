"""DINO-vMF and iBOT-vMF with lightly: ``lightly.loss.DINOLoss`` (:func:`patch`) with
``DINOProjectionHead`` or ``DINOv2ProjectionHead``, and ``lightly.loss.IBOTPatchLoss`` (:func:`patch_ibot`).

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

lightly's DINOv2 recipe (``DINOv2ProjectionHead``, whose ``weight_g`` is trainable: free norms) adds
the iBOT term with one more line::

    ibot_criterion = vmf_head.integrations.lightly.patch_ibot(
        model.student_head.ibot_head, model.teacher_head.ibot_head, IBOTPatchLoss()
    )

called as lightly's ``ibot_criterion(teacher_out, student_out, mask, teacher_temp=None)`` on the
outputs of the masked tokens; the center stays where lightly's checkpoints have it (``center.center``).
One head may serve both terms (the example's ``ibot_separate_head=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_int, check_temperature, check_tensor
from ..diagnostics import CollapseMonitor
from ..functional.centering import teacher_logits
from ..functional.cross_entropy import Pairing
from ..functional.vmf import compute_dtype
from ..nn import DINOvMFLoss
from ..nn.centered_loss import CenteredLoss, scheduled
from ._common import prototype_layers, prototype_norms, prototype_shape, require_attributes, warn_if_frozen

__all__ = ["LightlyCenter", "PatchedLightlyDINOLoss", "PatchedLightlyIBOTPatchLoss", "patch", "patch_ibot"]


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
            norms=_norms(self._prototype_layers),
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
            _, teacher_correction = self._corrections(_norms(self._prototype_layers), self.out_dim, temp, _NORM_NAMES)
            teacher_out = torch.softmax(teacher_logits(teacher_out, temp, teacher_correction), dim=-1)
        stat = teacher_out.float().mean(dim=(0, 1)).expand(self.out_dim)
        self._update_centers({"center": (stat, teacher_out.shape[0] * teacher_out.shape[1])})


class LightlyCenter(nn.Module):
    """Where lightly's ``IBOTPatchLoss`` keeps its center (a ``lightly.models.modules.Center``): the
    buffer ``center``, so that checkpoints have lightly's key ``center.center`` and code that reads
    ``criterion.center.value`` keeps working. The patched loss moves it."""

    center: torch.Tensor

    @property
    def value(self) -> torch.Tensor:
        """The center, ``(1, K)``."""
        return self.center


class PatchedLightlyIBOTPatchLoss(CenteredLoss):
    """iBOT-vMF's masked-patch term (docs/design.md, section 3) adapted to lightly's ``IBOTPatchLoss``
    call, bound to lightly's prototype layers.

    lightly hands in the outputs of the masked tokens only, selected as ``x[mask]`` selects them
    (row-major over the images). Each is scored against the teacher's centered posterior of the same
    token and weighted ``1 / (masked tokens of its image) / images``: the mean over images of the mean
    over their masked tokens.

    Args:
        student_layer, teacher_layer: the heads' ``last_layer`` modules (one head may serve the DINO
            term as well).
        output_dim: K.
        teacher_temp: the teacher temperature of a call that passes none.
        student_temp, center_momentum: as lightly's.
        p, centering, mode, backend, check_finite: as :class:`vmf_head.DINOvMFLoss`.

    Buffers:
        center.center: ``(1, K)``, lightly's key and shape; 0 at the start for logit centering, ``1/K``
            for probability centering. It moves by the mean over ranks of each rank's mean over its
            masked tokens, as lightly's ``Center`` does (a rank without masked tokens adds nothing,
            where it makes lightly's center NaN).
    """

    def __init__(
        self,
        student_layer: nn.Module,
        teacher_layer: nn.Module,
        *,
        output_dim: int,
        teacher_temp: float,
        student_temp: float,
        center_momentum: float,
        p: int,
        centering: str = "probability",
        mode: str = "exact",
        backend: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            p=p, student_temp=student_temp, centering=centering, mode=mode, backend=backend, check_finite=check_finite
        )
        self.output_dim = check_int("output_dim", output_dim, minimum=1)
        self.teacher_temp = check_temperature("teacher_temp", teacher_temp)
        self.center = LightlyCenter()
        self._register_center("center.center", (1, self.output_dim), center_momentum, "center_momentum")
        # A tuple, not attributes: see vmf_head.integrations.dino.PatchedDINOLoss.
        self._prototype_layers = (student_layer, teacher_layer)

    def forward(
        self,
        teacher_out: torch.Tensor,
        student_out: torch.Tensor,
        mask: torch.Tensor,
        teacher_temp: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The masked-patch loss of one step; updates the center.

        Args:
            teacher_out: ``(R, K)`` raw teacher outputs of the R masked tokens (``tokens[mask]``).
            student_out: ``(R, K)`` raw student outputs of the same tokens, in the same order.
            mask: ``(B, H, W)`` (or ``(B, N)``) bool, True for a masked token; its R True entries are
                the rows, image by image.
            teacher_temp: this call's teacher temperature, a number or a 0-d tensor; None: the loss's
                ``teacher_temp``.

        Returns:
            The scalar loss (0 when no token is masked).
        """
        temp = check_temperature("teacher_temp", self.teacher_temp if teacher_temp is None else teacher_temp)
        for name, x in (("teacher_out", teacher_out), ("student_out", student_out)):
            check_tensor(name, x, dims=2, shape=f"(masked tokens, K = {self.output_dim})")
            if x.shape[1] != self.output_dim or x.shape != teacher_out.shape:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}; teacher_out and student_out must both be "
                    f"(masked tokens, K = {self.output_dim}), teacher_out is {tuple(teacher_out.shape)}"
                )
        check_tensor("mask", mask, dims=(2, 3), floating=None, shape="(B, H, W) or (B, N)")  # dtype: below
        if mask.dtype != torch.bool or mask.device != teacher_out.device:
            raise ValueError(
                f"mask must be a bool tensor on the outputs' device {teacher_out.device}, "
                f"got {mask.dtype} on {mask.device}"
            )
        rows = teacher_out.shape[0]
        norms = _norms(self._prototype_layers)
        loss, stat = self._term(
            "center.center",
            student_out,
            teacher_out,
            Pairing(1, 1, skip_same=False),
            teacher_temp=temp,
            corrections=self._corrections(norms, self.output_dim, temp, _NORM_NAMES),
            row_weight=_token_weights(mask, rows, compute_dtype(student_out, teacher_out)),
        )
        return self._finish(
            loss,
            # every rank's mean counts once, as lightly averages them (a rank without masked tokens not at all)
            {"center.center": (stat, min(rows, 1))},
            {"teacher_temp": temp},
            lambda: (
                {"teacher_out": teacher_out, "student_out": student_out, "center": self.center.center},
                dict(zip(_NORM_NAMES, norms)),
            ),
        )

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, p={self.p}, centering={self.centering!r}, mode={self.mode!r}, "
            f"backend={self.backend!r}"
        )


def _token_weights(mask: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``(rows,)``: lightly's weight of each masked token, ``1 / (masked tokens of its image) / images``,
    the rows being the True entries of ``mask`` in row-major order. The image of row r is where r
    falls among the cumulative counts, found on the device: no host sync (nor for the check that the
    counts add up to ``rows``, a device-side assert)."""
    counts = mask.flatten(1).sum(1)
    torch._assert_async(
        counts.sum() == rows,
        f"teacher_out and student_out have {rows} rows, but mask does not mark {rows} tokens: pass the outputs "
        "of the masked tokens, tokens[mask]",
    )
    image = torch.searchsorted(counts.cumsum(0), torch.arange(rows, device=mask.device), right=True)
    per_image = 1.0 / (counts.clamp(min=1).to(dtype) * counts.shape[0])
    return per_image[image.clamp(max=counts.shape[0] - 1)]


def _norms(layers: tuple[nn.Module, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (student, teacher) prototype norms, read from the layers now; the teacher's without gradient."""
    student_norms = prototype_norms(layers[0])
    with torch.no_grad():
        teacher_norms = prototype_norms(layers[1])
    return student_norms, teacher_norms


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
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
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
        mode, backend, koleo_weight, monitor: as :func:`vmf_head.integrations.dino.patch`. In lightly's
            DINOv2 recipe pass ``koleo_weight`` to one of ``patch`` and ``patch_ibot``, not both.

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
    student_layer, teacher_layer = prototype_layers(student, teacher, dino_loss.center.shape[-1], loss_name="dino_loss")
    warn_if_frozen(student_layer, flag="DINOProjectionHead(..., norm_last_layer=False)")
    n_prototypes, p = prototype_shape(student_layer)
    loss = PatchedLightlyDINOLoss(
        student_layer,
        teacher_layer,
        output_dim=n_prototypes,
        teacher_temp=float(dino_loss.teacher_temp),
        teacher_temp_schedule=torch.as_tensor(dino_loss.teacher_temp_schedule),
        warmup_teacher_temp_epochs=int(dino_loss.warmup_teacher_temp_epochs),
        student_temp=float(dino_loss.student_temp),
        center_momentum=float(dino_loss.center_momentum),
        p=p,
        centering=centering,
        mode=mode,
        backend=backend,
    )
    if centering == "logit":
        loss.center.copy_(dino_loss.center.view_as(loss.center))
    loss.watch(student_layer, koleo_weight=koleo_weight, monitor=monitor)
    return loss.to(dino_loss.center.device)


def patch_ibot(
    student: nn.Module,
    teacher: nn.Module,
    ibot_loss: nn.Module,
    *,
    centering: str = "probability",
    mode: str = "exact",
    backend: str = "auto",
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> PatchedLightlyIBOTPatchLoss:
    """The iBOT-vMF version of lightly's ``IBOTPatchLoss`` for the heads that score the patch tokens.

    Args:
        student, teacher: lightly ``DINOv2ProjectionHead``\\ s, or modules holding exactly one (as the
            ``student_head`` of lightly's DINOv2 example with ``ibot_separate_head=False``, where one head
            serves both terms), possibly inside ``DistributedDataParallel``.
        ibot_loss: ``lightly.loss.IBOTPatchLoss``; copied: ``teacher_temp``, ``student_temp``, the
            center's momentum, K from the center. With ``centering="logit"`` its center is carried over too.
        centering: ``"probability"`` (iBOT-vMF, default: NOT lightly's own centering), ``"logit"``
            (lightly's) or ``"sinkhorn"`` (balances the batch's masked tokens, no center).
        mode, backend, koleo_weight, monitor: as :func:`vmf_head.integrations.dino.patch` (the monitor sees
            the masked tokens' targets).

    Warns:
        FrozenNormsWarning: the student's ``last_layer.weight_g`` does not require grad.

    Raises:
        TypeError: ``ibot_loss`` is not lightly's ``IBOTPatchLoss``, or one of its subclasses that score
            other tokens (``IBOTPlusPlusPatchLoss`` scores the visible ones too).
    """
    from lightly.loss import IBOTPatchLoss  # here, not at import: vmf_head does not need lightly

    if not isinstance(ibot_loss, IBOTPatchLoss) or type(ibot_loss).forward is not IBOTPatchLoss.forward:
        raise TypeError(
            f"ibot_loss must be lightly's IBOTPatchLoss (its masked-token loss), got {type(ibot_loss).__name__}"
        )
    center = ibot_loss.center.value
    student_layer, teacher_layer = prototype_layers(student, teacher, center.shape[-1], loss_name="ibot_loss")
    warn_if_frozen(student_layer, flag="a trainable last_layer.weight_g (DINOv2ProjectionHead's default)")
    n_prototypes, p = prototype_shape(student_layer)
    loss = PatchedLightlyIBOTPatchLoss(
        student_layer,
        teacher_layer,
        output_dim=n_prototypes,
        teacher_temp=ibot_loss.teacher_temp,
        student_temp=ibot_loss.student_temp,
        center_momentum=ibot_loss.center.momentum,
        p=p,
        centering=centering,
        mode=mode,
        backend=backend,
    )
    if centering == "logit":
        loss.center.center.copy_(center.view_as(loss.center.center))
    loss.watch(student_layer, koleo_weight=koleo_weight, monitor=monitor)
    return loss.to(center.device)
