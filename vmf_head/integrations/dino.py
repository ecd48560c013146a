"""DINO-vMF in facebookresearch/dino with one added line in ``main_dino.py``.

After ``dino_loss = DINOLoss(...).cuda()`` in ``train_dino``::

    dino_loss = vmf_head.integrations.dino.patch(student, teacher, dino_loss)

and train with ``--norm_last_layer false`` (or run the unchanged script with
``python -m vmf_head.run dino main_dino.py ...``, see :mod:`vmf_head.run`).

Design: the patch reads the norms from DINO's own head; it does not swap heads. DINO's ``DINOHead``
already is the vMF head's parameterisation: its last layer is ``weight_norm(Linear(p, K))``, so
``||w_k|| = |g_k|`` with ``g = last_layer.weight_g`` whether the head is DINO's or
:class:`vmf_head.VMFPrototypeHead` (which stores the same two parameters under the same names), and both
heads output the same raw logits ``w_k^T y``. Swapping would change nothing in the mathematics but break
what ``main_dino.py`` has already done when it builds the loss: the student is wrapped in
``DistributedDataParallel``, whose gradient buckets are fixed to the parameters it was built with (a new
head would train unsynchronised on each rank), and the teacher was loaded from the student. Reading the
norms keeps every parameter, its name (``utils.cancel_gradients_last_layer`` matches ``last_layer``,
``utils.get_params_groups`` sees the same tensors) and every checkpoint key exactly as in a plain DINO run,
so ``eval_knn.py`` / ``eval_linear.py`` load the checkpoints unchanged. The gradient of the correction
reaches ``weight_g`` through the same autograd graph as the head's forward, so DDP reduces it as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diagnostics import CollapseMonitor
from ..nn import DINOvMFLoss
from ._common import (
    copy_schedule,
    prototype_layers,
    prototype_norms,
    prototype_shape,
    require_attributes,
    schedule_arguments,
    warn_if_frozen,
)

__all__ = ["PatchedDINOLoss", "patch"]


class PatchedDINOLoss(DINOvMFLoss):
    """:class:`vmf_head.DINOvMFLoss` bound to DINO's prototype layers, called as DINO's ``DINOLoss``.

    ``forward(student_output, teacher_output, epoch)``: ``student_output`` (ncrops * B, K) and
    ``teacher_output`` (2 * B, K) are the raw outputs of the student and teacher ``MultiCropWrapper``;
    at every call the prototype norms are read from the layers (student with gradient, teacher without).
    The state dict is the vMF loss's (key ``center``), so DINO's checkpoint code saves and restores it.
    """

    def __init__(self, student_layer: nn.Module, teacher_layer: nn.Module, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A tuple, not attributes: registered submodules would put the heads' weights into this loss's
        # state dict and under its .cuda()/.to().
        self._prototype_layers = (student_layer, teacher_layer)

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int | torch.Tensor
    ) -> torch.Tensor:
        student_layer, teacher_layer = self._prototype_layers
        student_norms = prototype_norms(student_layer)
        with torch.no_grad():
            teacher_norms = prototype_norms(teacher_layer)
        return super().forward(
            student_output, teacher_output, epoch, student_norms=student_norms, teacher_norms=teacher_norms
        )


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
) -> PatchedDINOLoss:
    """The DINO-vMF version of ``dino_loss``, for the networks ``student`` and ``teacher``.

    Args:
        student, teacher: what ``main_dino.py`` holds when it builds the loss: ``MultiCropWrapper``\\ s
            (possibly inside ``DistributedDataParallel``), or the heads themselves. Each must contain one
            module with a prototype layer ``last_layer``.
        dino_loss: DINO's ``DINOLoss``. Its settings are copied: ``ncrops``, ``student_temp``,
            ``center_momentum``, ``teacher_temp_schedule`` (element by element) and K from ``center``.
        centering: ``"probability"`` (DINO-vMF, default), ``"logit"`` (DINO's; the center is then
            carried over from ``dino_loss``) or ``"sinkhorn"``.
        mode: ``"exact"`` or ``"approx"`` log-normaliser, see :func:`vmf_head.log_vmf_normalizer`.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``, see :class:`vmf_head.DINOvMFLoss`.
        koleo_weight, monitor: the collapse options (docs/collapse.md): KoLeo on the student's prototypes
            added to the returned loss with this weight, and a collapse monitor fed with the teacher's
            targets; see :meth:`vmf_head.nn.CenteredLoss.watch`.

    Returns:
        A :class:`PatchedDINOLoss` on the device of ``dino_loss.center``; use it in place of ``dino_loss``.

    Warns:
        FrozenNormsWarning: the student's norms are frozen (DINO's default ``--norm_last_layer true``).

    Raises:
        TypeError, ValueError: no unique head in ``student``/``teacher``, or K/p disagree between the
            heads and the loss.
    """
    require_attributes(
        "dino_loss",
        dino_loss,
        ("ncrops", "student_temp", "center_momentum", "teacher_temp_schedule", "center"),
        "facebookresearch/dino's DINOLoss",
    )
    layers = prototype_layers(student, teacher, dino_loss.center.shape[-1], loss_name="dino_loss")
    warn_if_frozen(layers[0], flag="--norm_last_layer false")
    loss = from_dino_loss(
        PatchedDINOLoss, layers, dino_loss, dino_loss.ncrops, centering=centering, mode=mode, backend=backend
    )
    loss.watch(layers[0], koleo_weight=koleo_weight, monitor=monitor)
    return loss


def from_dino_loss(
    cls: type[PatchedDINOLoss],
    layers: tuple[nn.Module, nn.Module],
    dino_loss: nn.Module,
    ncrops: int,
    *,
    centering: str,
    mode: str,
    backend: str,
) -> PatchedDINOLoss:
    """A ``cls`` bound to the (student, teacher) prototype ``layers`` with the settings of ``dino_loss``,
    a loss laid out as DINO's ``DINOLoss`` (``student_temp``, ``center_momentum``, the per-epoch
    ``teacher_temp_schedule`` copied element by element, K from ``center``; with ``centering="logit"``
    the center itself), on the device of its center. ``ncrops``: the student views of a call."""
    n_prototypes, p = prototype_shape(layers[0])
    warmup_temp, final_temp, warmup_epochs, nepochs = schedule_arguments(dino_loss.teacher_temp_schedule)
    loss = cls(
        *layers,
        n_prototypes,
        ncrops,
        warmup_temp,
        final_temp,
        warmup_epochs,
        nepochs,
        student_temp=dino_loss.student_temp,
        center_momentum=dino_loss.center_momentum,
        p=p,
        centering=centering,
        mode=mode,
        backend=backend,
    )
    copy_schedule(dino_loss, loss, "teacher_temp_schedule")
    if centering == "logit":
        loss.center.copy_(dino_loss.center.view_as(loss.center))
    return loss.to(dino_loss.center.device)
