"""iBOT-vMF in bytedance/ibot with one added line in ``main_ibot.py``.

After ``ibot_loss = iBOTLoss(...).cuda()`` in ``train_ibot``::

    ibot_loss = vmf_head.integrations.ibot.patch(student, teacher, ibot_loss)

and train with ``--norm_last_layer false`` (or run the unchanged script with
``python -m vmf_head.run ibot main_ibot.py ...``).

As for DINO (see :mod:`vmf_head.integrations.dino` for why the heads are not swapped), the patch reads
the prototype norms from iBOT's own ``iBOTHead`` at every call: ``last_layer`` for the [CLS] term and
``last_layer2`` for the masked-patch term. ``last_layer2`` is ``last_layer`` itself when the head is
shared, which iBOT does by default for the teacher (``--shared_head_teacher true``) but not for the
student (``--shared_head false``); reading ``last_layer2`` gives the right norms in every combination.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diagnostics import CollapseMonitor
from ..nn import iBOTvMFLoss
from ._common import (
    copy_schedule,
    find_head,
    prototype_norms,
    prototype_shape,
    require_attributes,
    schedule_arguments,
    warn_if_frozen,
)

__all__ = ["PatchediBOTLoss", "patch"]


def _layers(model: nn.Module, role: str) -> tuple[nn.Module, nn.Module]:
    head = find_head(model, ("last_layer", "last_layer2"), role=role)
    for name in ("last_norm", "last_norm2"):
        if getattr(head, name, None) is not None:
            raise ValueError(
                f"{role}: the head has {name} = {type(getattr(head, name)).__name__}; a norm after the prototype "
                "layer makes the logits something other than w_k^T y, which the vMF correction assumes"
            )
    return head.last_layer, head.last_layer2


class PatchediBOTLoss(iBOTvMFLoss):
    """:class:`vmf_head.iBOTvMFLoss` bound to iBOT's prototype layers, called as iBOT's ``iBOTLoss``.

    ``forward(student_output, teacher_output, student_local_cls, student_mask, epoch)`` with iBOT's
    arguments: ``(cls (2B, K), patch (2B, N, K2))`` tuples from the student and teacher
    ``MultiCropWrapper``, the local crops' [CLS] outputs (or None), the list of per-view masks
    (B, H, W). Returns iBOT's dict (``cls``, ``patch``, ``loss``). State dict keys ``center``/``center2``.
    """

    def __init__(
        self, student_layers: tuple[nn.Module, nn.Module], teacher_layers: tuple[nn.Module, nn.Module], *args, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        # A tuple, not attributes: see PatchedDINOLoss.
        self._prototype_layers = (student_layers, teacher_layers)

    def forward(self, student_output, teacher_output, student_local_cls: torch.Tensor | None, student_mask, epoch: int):
        (student_cls, student_patch), (teacher_cls, teacher_patch) = self._prototype_layers
        student_norms = (prototype_norms(student_cls), prototype_norms(student_patch))
        with torch.no_grad():
            teacher_norms = (prototype_norms(teacher_cls), prototype_norms(teacher_patch))
        return super().forward(
            student_output,
            teacher_output,
            student_local_cls,
            student_mask,
            epoch,
            student_norms=student_norms,
            teacher_norms=teacher_norms,
        )


def patch(
    student: nn.Module,
    teacher: nn.Module,
    ibot_loss: nn.Module,
    *,
    centering: str = "probability",
    mode: str = "exact",
    backend: str = "auto",
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> PatchediBOTLoss:
    """The iBOT-vMF version of ``ibot_loss``, for the networks ``student`` and ``teacher``.

    Args:
        student, teacher: iBOT's ``MultiCropWrapper``\\ s (possibly inside ``DistributedDataParallel``) or
            the heads; each must contain one module with ``last_layer`` and ``last_layer2``.
        ibot_loss: iBOT's ``iBOTLoss``. Copied: ``ngcrops``, ``nlcrops``, ``student_temp``,
            ``center_momentum(2)``, ``lambda1/2``, both temperature schedules element by element (so
            ``mim_start_epoch`` carries over), K and K2 from ``center``/``center2``.
        centering, mode, backend: as :func:`vmf_head.integrations.dino.patch`; with ``"logit"`` both
            centers are carried over from ``ibot_loss``.
        koleo_weight, monitor: as :func:`vmf_head.integrations.dino.patch` (KoLeo on the [CLS] prototypes,
            the monitor on the [CLS] targets).

    Returns:
        A :class:`PatchediBOTLoss` on the device of ``ibot_loss.center``.

    Warns:
        FrozenNormsWarning: the student's [CLS] or patch norms are frozen (``--norm_last_layer true``).
    """
    require_attributes(
        "ibot_loss",
        ibot_loss,
        (
            "ngcrops",
            "nlcrops",
            "student_temp",
            "center_momentum",
            "center_momentum2",
            "lambda1",
            "lambda2",
            "teacher_temp_schedule",
            "teacher_temp2_schedule",
            "center",
            "center2",
        ),
        "bytedance/ibot's iBOTLoss",
    )
    student_layers = _layers(student, "student")
    teacher_layers = _layers(teacher, "teacher")
    n_cls, n_patch = ibot_loss.center.shape[-1], ibot_loss.center2.shape[-1]
    p = None
    for role, layers in (("student", student_layers), ("teacher", teacher_layers)):
        for name, layer, expected in (("last_layer", layers[0], n_cls), ("last_layer2", layers[1], n_patch)):
            k, p_layer = prototype_shape(layer)
            if k != expected:
                raise ValueError(f"{role} {name} has {k} prototypes but ibot_loss expects {expected}")
            if p is not None and p_layer != p:
                raise ValueError(f"{role} {name} has prototypes of dimension {p_layer}, others have {p}")
            p = p_layer
    frozen = warn_if_frozen(student_layers[0], flag="--norm_last_layer false")
    if not frozen and student_layers[1] is not student_layers[0]:
        warn_if_frozen(student_layers[1], flag="--norm_last_layer false")
    warm, final, warmup_epochs, nepochs = schedule_arguments(ibot_loss.teacher_temp_schedule)
    warm2, final2, _, nepochs2 = schedule_arguments(ibot_loss.teacher_temp2_schedule)
    if nepochs2 != nepochs:
        raise ValueError(f"ibot_loss's schedules have {nepochs} and {nepochs2} epochs")
    loss = PatchediBOTLoss(
        student_layers,
        teacher_layers,
        n_cls,
        n_patch,
        ibot_loss.ngcrops,
        ibot_loss.nlcrops,
        warm,
        final,
        warm2,
        final2,
        warmup_epochs,
        nepochs,
        student_temp=ibot_loss.student_temp,
        center_momentum=ibot_loss.center_momentum,
        center_momentum2=ibot_loss.center_momentum2,
        lambda1=ibot_loss.lambda1,
        lambda2=ibot_loss.lambda2,
        p=p,
        centering=centering,
        mode=mode,
        backend=backend,
    )
    copy_schedule(ibot_loss, loss, "teacher_temp_schedule")
    copy_schedule(ibot_loss, loss, "teacher_temp2_schedule")
    if centering == "logit":
        loss.center.copy_(ibot_loss.center)
        loss.center2.copy_(ibot_loss.center2)
    loss.watch(student_layers[0], koleo_weight=koleo_weight, monitor=monitor)
    return loss.to(ibot_loss.center.device)
