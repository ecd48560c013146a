"""DINO-vMF and iBOT-vMF terms in facebookresearch/dinov3 with one added line in ``dinov3/train/train.py``.

In ``main``, after ``model = meta_arch(cfg)`` (built on the meta device) and before
``model.prepare_for_distributed_training()``::

    vmf_head.integrations.dinov3.patch(model)

(or run the unchanged script with ``python -m vmf_head.run dinov3 dinov3/train/train.py ...``).

DINOv3's ``DINOHead.last_layer`` is a plain ``nn.Linear(p, K, bias=False)``: the prototypes' norms are
free, so its softmax is a vMF mixture posterior only up to the missing normalisers ``C_p(||w_k|| / tau)``.
:func:`patch` replaces ``model.dino_loss`` and ``model.ibot_patch_loss`` by modules with the methods,
arguments, return shapes and ``center`` buffers of DINOv3's ``DINOLoss`` / ``iBOTPatchLoss`` that add
``log C_p(||w_k|| / tau)`` to the student's logits (``student_temp``) and the teacher's (the
``teacher_temp`` DINOv3 passes), ``p`` the head's bottleneck dimension, the norms the row norms of each
head's ``last_layer.weight``.

What DINOv3's code path demands, and how the losses meet it:

- ``SSLMetaArch`` asserts ``cfg.train.centering == "sinkhorn_knopp"`` and only ever calls
  ``sinkhorn_knopp_teacher``, so that method applies the patch's ``centering``: ``"sinkhorn"``
  (DINOv3's own; Sinkhorn-Knopp on ``exp(l_t)`` in log space, since ``t / tau_t`` plus a correction of
  several hundred overflows float32), ``"probability"`` (the seed's DINO-vMF) or ``"logit"``. Under the
  last two the targets use the center from before this batch, then the center moves by this batch's
  global statistic (DINO's order): DINOv3 never calls ``update_center``.
- ``center`` starts as NaN and ``init_weights`` fills it (1/K for probability centering, 0 otherwise),
  as ``main`` fills every buffer with NaN before ``init_weights``.
- The norms are read by a forward pre-hook on each ``last_layer`` while it runs: under FSDP2 the
  weights are whole there; the hook is added before ``prepare_for_distributed_training`` compiles the
  heads (dynamo does not guard on hooks added later, so :func:`patch` refuses compiled heads); the
  norms' backward runs within the head's backward, after FSDP2 has all-gathered the weight again
  (:class:`~._common.CapturedNorms`).
- The teacher's norms come from ``model.teacher`` (in distillation mode the network distilled from,
  with its own bottleneck ``p``), the student's from ``model.student``.

Gram loss, KoLeo, distillation and the checkpoint keys are DINOv3's: a patched model's state dict loads
strictly into an unpatched one and back. Multi-distillation (``MultiDistillationMetaArch``, students in
process subgroups) is refused: these losses reduce their statistics over the default process group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diagnostics import CollapseMonitor
from ..functional.centering import check_centering, initial_center
from ..functional.cross_entropy import Pairing
from .dinov2 import _MaskedPatchTerms, _rows, _VMFCenteredLoss, replace_losses

__all__ = ["DINOv3iBOTPatchvMFLoss", "DINOv3vMFLoss", "patch"]


class _DINOv3Loss(_VMFCenteredLoss):
    """How DINOv3's losses differ from DINOv2's: NaN center until ``init_weights``, and a
    ``sinkhorn_knopp_teacher`` that is the only centering DINOv3 calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.center.fill_(math.nan)

    def init_weights(self) -> None:
        """The center's start: 1/K (the uniform distribution) for probability centering, else 0 (DINOv3's)."""
        self.center.copy_(initial_center(self.centering, self.center.shape))
        self._centered = self._pending = None

    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        """DINOv3's name for ``update_center``."""
        self.update_center(teacher_output)

    @torch.no_grad()
    def _sinkhorn_knopp(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
        q, stat = self._centered_targets(teacher_output, teacher_temp, self.centering, n_iterations)
        self._update_centers({"center": (stat, _rows(teacher_output))})
        return q


class DINOv3vMFLoss(_DINOv3Loss):
    """DINO-vMF replacement of ``dinov3.loss.DINOLoss`` (same methods and arguments, ``center`` (1, K))."""

    def __init__(self, out_dim: int, student_norms, teacher_norms, **kwargs) -> None:
        super().__init__((1, out_dim), student_norms, teacher_norms, **kwargs)

    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Targets (crops * B, K), float32, under ``centering`` (see the module docstring); the center
        moves after the targets are computed."""
        return self._sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False
    ) -> torch.Tensor:
        """Mean over (student crop s, teacher crop t) pairs, ``s != t`` when ``ignore_diagonal``, of
        ``mean_b -teacher_probs[t, b] . log_softmax(l_s[s, b])``, ``l_s = student_logits / student_temp +
        log C_p(||w_s|| / student_temp)``; student_logits (S, B, K), teacher_probs (T, B, K)."""
        pairing = Pairing(student_logits.shape[0], teacher_probs.shape[0], skip_same=ignore_diagonal)
        return self._student_cross_entropy(student_logits.flatten(0, 1), teacher_probs.flatten(0, 1), pairing)


class DINOv3iBOTPatchvMFLoss(_MaskedPatchTerms, _DINOv3Loss):
    """iBOT-vMF replacement of ``dinov3.loss.iBOTPatchLoss`` (same methods, ``center`` (1, 1, K))."""

    def __init__(self, patch_out_dim: int, student_norms, teacher_norms, **kwargs) -> None:
        super().__init__((1, 1, patch_out_dim), student_norms, teacher_norms, **kwargs)

    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Targets (M, K) for the masked patches under ``centering``. DINOv3 passes the number of masked
        patches and all-reduces it in place; the log-space Sinkhorn does not need it (a constant factor),
        so it is neither used nor modified."""
        return self._sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)


def _initialised(center: torch.Tensor) -> bool:
    # Host read at patch time, not in a step: a center filled by init_weights or a checkpoint.
    return not center.is_meta and not bool(torch.isnan(center).all())


def patch(
    model: nn.Module,
    *,
    centering: str = "sinkhorn",
    mode: str = "exact",
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> nn.Module:
    """Replace ``model.dino_loss`` / ``model.ibot_patch_loss`` of a DINOv3 ``SSLMetaArch`` by vMF losses.

    Args:
        model: DINOv3's ``SSLMetaArch(cfg)``, before ``prepare_for_distributed_training``, with
            ``student``/``teacher`` ModuleDicts holding ``dino_head`` and ``ibot_head``.
        centering: what ``sinkhorn_knopp_teacher`` does: ``"sinkhorn"`` (default, DINOv3's),
            ``"probability"`` or ``"logit"``.
        mode: ``"exact"`` or ``"approx"`` log-normaliser.
        koleo_weight, monitor: as :func:`vmf_head.integrations.dinov2.patch`.

    Returns:
        ``model``, patched in place. Student temperature and center momentum are copied from its
        losses; the centers are NaN until ``model.init_weights()`` (with ``centering="logit"``, copies of
        the old ones), or initialised now if the model's were already.

    Raises:
        TypeError: not an SSLMetaArch. NotImplementedError: multi-distillation. RuntimeError: the
        heads are already compiled.
    """
    check_centering(centering)
    multidistillation = getattr(getattr(model, "cfg", None), "multidistillation", None)
    if getattr(multidistillation, "enabled", False):
        raise NotImplementedError(
            "DINOv3 multi-distillation trains its students in process subgroups, and the vMF losses reduce their "
            "statistics over the default process group; patch a plain SSLMetaArch run"
        )
    for name in ("dino_loss", "ibot_patch_loss"):
        if not isinstance(getattr(model, name, None), nn.Module):
            raise TypeError(f"model must be DINOv3's SSLMetaArch (with .{name}), got {type(model).__name__}")
    old_centers = {name: getattr(model, name).center for name in ("dino_loss", "ibot_patch_loss")}
    replace_losses(
        model,
        {"dino_loss": (DINOv3vMFLoss, "dino_head"), "ibot_patch_loss": (DINOv3iBOTPatchvMFLoss, "ibot_head")},
        centering=centering,
        mode=mode,
        frozen_flag="a trainable last_layer.weight",
        koleo_weight=koleo_weight,
        monitor=monitor,
    )
    if centering != "logit":
        for name, center in old_centers.items():
            if _initialised(center):
                getattr(model, name).init_weights()
    return model
