"""DINO-vMF in solo-learn (vturrisi/solo-learn) with one added line.

Where ``main_pretrain.py`` builds the method (``model = METHODS[cfg.method](cfg)``)::

    model = vmf_head.integrations.solo.patch(model)

and train with ``method_kwargs.norm_last_layer=False``. The patch replaces the method's
``dino_loss_func`` (solo-learn's ``solo.losses.dino.DINOLoss``) by :class:`PatchedSoloDINOLoss`, which
is called as solo-learn's, ``dino_loss_func(student_output, teacher_output)`` at the epoch set as its
attribute ``.epoch`` (``DINO.on_train_epoch_start`` does), and reads the prototype norms from the
``last_layer`` of the method's ``head`` and ``momentum_head`` at every call (student with gradient).
The heads are not replaced, for the reasons given in :mod:`vmf_head.integrations.dino`: solo-learn's
``DINOHead`` is DINO's, so parameter names, ``learnable_params``, ``momentum_pairs``, the freezing of
the last layer in ``on_after_backward`` and checkpoints stay as they were; the loss's state is its
``center`` ``(1, K)``, solo-learn's key and shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diagnostics import CollapseMonitor
from ..nn.centered_loss import scheduled
from ._common import prototype_layers, require_attributes, warn_if_frozen
from .dino import PatchedDINOLoss, from_dino_loss

__all__ = ["PatchedSoloDINOLoss", "patch"]


class PatchedSoloDINOLoss(PatchedDINOLoss):
    """:class:`vmf_head.integrations.dino.PatchedDINOLoss` called as solo-learn's ``DINOLoss``.

    ``forward(student_output, teacher_output)``: ``student_output`` ``(num_large_crops * B, K)`` holds
    the student's outputs of solo-learn's large crops, ``teacher_output`` ``(2 * B, K)`` the momentum
    head's of the first 2; view j of the student is paired with every teacher view but the
    j-th. The teacher temperature is the schedule's value at ``.epoch``: an int in ``[0, num_epochs)``
    or a 0-d integer tensor, kept on the device in the buffer ``epoch_index`` (not saved), so that a
    compiled step reads it as data and a new epoch compiles nothing.
    """

    epoch_index: torch.Tensor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("epoch_index", torch.zeros((), dtype=torch.long), persistent=False)
        self.epoch = 0

    @property
    def epoch(self) -> int | torch.Tensor:
        """The epoch of the teacher temperature, as last set."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int | torch.Tensor) -> None:
        scheduled(self.teacher_temp_schedule, value)  # its checks: an int in range or a 0-d integer tensor
        self.epoch_index.fill_(value)
        self._epoch = value

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        return super().forward(student_output, teacher_output, self.epoch_index)


def patch(
    method: nn.Module,
    *,
    centering: str = "probability",
    mode: str = "exact",
    backend: str = "auto",
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> nn.Module:
    """Turn solo-learn's ``DINO`` method into DINO-vMF: its ``dino_loss_func`` becomes a
    :class:`PatchedSoloDINOLoss` bound to the prototype layers of ``head`` and ``momentum_head``.

    Args:
        method: solo-learn's ``solo.methods.DINO`` (a LightningModule), before training starts.
        centering: ``"probability"`` (DINO-vMF, default), ``"logit"`` (solo-learn's; the center is then
            carried over) or ``"sinkhorn"``.
        mode, backend, koleo_weight, monitor: as :func:`vmf_head.integrations.dino.patch`.

    Returns:
        ``method``, patched in place. Copied from its ``DINOLoss``: ``num_large_crops``,
        ``student_temp``, ``center_momentum``, ``teacher_temp_schedule`` (element by element), ``epoch``,
        K from ``center``.

    Warns:
        FrozenNormsWarning: the student's norms are frozen (solo-learn's default
        ``method_kwargs.norm_last_layer=True``).
    """
    require_attributes("method", method, ("head", "momentum_head", "dino_loss_func"), "solo-learn's DINO method")
    dino_loss = method.dino_loss_func
    require_attributes(
        "method.dino_loss_func",
        dino_loss,
        ("num_large_crops", "student_temp", "center_momentum", "teacher_temp_schedule", "center", "epoch"),
        "solo-learn's DINOLoss",
    )
    layers = prototype_layers(
        method.head, method.momentum_head, dino_loss.center.shape[-1], loss_name="method.dino_loss_func"
    )
    warn_if_frozen(layers[0], flag="method_kwargs.norm_last_layer=False")
    loss = from_dino_loss(
        PatchedSoloDINOLoss,
        layers,
        dino_loss,
        dino_loss.num_large_crops,
        centering=centering,
        mode=mode,
        backend=backend,
    )
    loss.epoch = dino_loss.epoch
    loss.watch(layers[0], koleo_weight=koleo_weight, monitor=monitor)
    method.dino_loss_func = loss
    return method
