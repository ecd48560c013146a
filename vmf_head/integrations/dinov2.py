"""DINO-vMF and iBOT-vMF terms in facebookresearch/dinov2 with one added line in ``dinov2/train/train.py``.

After ``model = SSLMetaArch(cfg).to(torch.device("cuda"))`` in ``main``::

    vmf_head.integrations.dinov2.patch(model)

(or run the unchanged script with ``python -m vmf_head.run dinov2 dinov2/train/train.py ...``).

DINOv2 does not call its losses in one piece: ``SSLMetaArch.forward_backward`` asks ``dino_loss`` and
``ibot_patch_loss`` for the teacher targets (``softmax_center_teacher`` or ``sinkhorn_knopp_teacher``,
chosen by ``cfg.train.centering``), updates the centers (``update_center``), then calls ``dino_loss(...)``
and ``ibot_patch_loss.forward_masked(...)`` with the student outputs. :func:`patch` replaces both losses by
modules with the same methods and arguments that add the vMF correction ``log C_p(||w_k|| / tau)`` on
both sides: the teacher's with the scheduled ``teacher_temp`` passed to the centering method, the
student's with ``student_temp``.

- ``softmax_center_teacher`` applies the ``centering`` given to :func:`patch`: ``"probability"``
  (DINO-vMF's, default), ``"logit"`` (DINOv2's own subtraction) or ``"sinkhorn"``.
- ``sinkhorn_knopp_teacher`` runs Sinkhorn-Knopp on ``exp(l_t)`` with the corrected teacher logits.
- Center statistics are means over the global batch, each rank weighted by its number of rows (DINOv2
  weights every rank's mean equally; the two agree when ranks hold equally many masked patches).

The prototype norms are taken from the heads' ``last_layer`` (``student``/``teacher`` ``dino_head``, and
``ibot_head`` when ``cfg.ibot.separate_head``) by a forward hook, i.e. while the layer runs. DINOv2 wraps
the heads in FSDP; outside the head's forward a sharded parameter is only this rank's shard, inside it is
whole, and the norms taken there carry the gradient back through the same unsharded views as the head's
output. Checkpoints keep DINOv2's keys: the new losses hold ``center`` with the shapes of DINOv2's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..functional import center_teacher, global_batch_means, multicrop_cross_entropy, sinkhorn_centering, vmf_correction
from ..functional.centering import check_centering
from ..nn._loss_common import ProbabilityCenterCheck
from ._common import device_of, find_head, prototype_norms, prototype_shape, warn_if_frozen

__all__ = ["CapturedNorms", "DINOv2vMFLoss", "DINOv2iBOTPatchvMFLoss", "patch"]


class CapturedNorms:
    """The norms ``||w_k||`` (K,) of a prototype layer, taken by a forward hook each time it runs.

    ``detach=True`` for the teacher (an EMA copy: no gradient). Calling the object returns the norms of
    the layer's latest forward; before the first one it raises RuntimeError.
    """

    def __init__(self, layer: nn.Module, *, role: str, detach: bool) -> None:
        self.role = role
        self.detach = detach
        self.value: Optional[torch.Tensor] = None
        self.handle = layer.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        norms = prototype_norms(module)
        self.value = norms.detach() if self.detach else norms

    def __call__(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"the {self.role} prototype layer has not run yet: call the head before the loss")
        return self.value


class _VMFCenteredLoss(ProbabilityCenterCheck, nn.Module):
    """What DINOv2's two losses share: the teacher targets with the vMF correction and the center."""

    def __init__(
        self,
        center_shape: tuple[int, ...],
        student_norms: CapturedNorms,
        teacher_norms: CapturedNorms,
        *,
        p: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "probability",
        mode: str = "exact",
    ) -> None:
        super().__init__()
        self.centering = check_centering(centering)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.p = p
        self.mode = mode
        n_prototypes = center_shape[-1]
        # The probability center starts at the uniform distribution (SPEC 3), the logit center at 0.
        start = 1.0 / n_prototypes if centering == "probability" else 0.0
        self.register_buffer("center", torch.full(center_shape, start))
        self._student_norms, self._teacher_norms = student_norms, teacher_norms
        self._teacher_temp: Optional[float] = None
        self._pending: Optional[tuple[torch.Tensor, int]] = None

    def _teacher_correction(self, teacher_temp: float) -> torch.Tensor:
        return vmf_correction(self._teacher_norms(), teacher_temp, self.p, mode=self.mode)

    def _student_correction(self) -> torch.Tensor:
        return vmf_correction(self._student_norms(), self.student_temp, self.p, mode=self.mode)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher targets (like ``teacher_output``, float32) under this loss's ``centering``, after applying
        the center update recorded by the previous ``update_center`` (DINOv2's order)."""
        self.apply_center_update()
        self._teacher_temp = float(teacher_temp)
        q, _ = center_teacher(
            teacher_output, self.center, teacher_temp=teacher_temp,
            teacher_correction=self._teacher_correction(teacher_temp), centering=self.centering,
        )
        return q

    def _sinkhorn(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
        return sinkhorn_centering(teacher_output, teacher_temp, self._teacher_correction(teacher_temp), n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Record this batch's statistic (mean of ``teacher_output``, or of the uncentred teacher posterior
        for probability centering, at the temperature of the last ``softmax_center_teacher``)."""
        if self.centering == "sinkhorn":
            return
        if self.centering == "probability" and self._teacher_temp is None:
            raise RuntimeError("update_center needs the teacher temperature: call softmax_center_teacher first")
        _, stat = center_teacher(
            teacher_output, self.center, teacher_temp=self._teacher_temp or 1.0,
            teacher_correction=self._teacher_correction(self._teacher_temp or 1.0), centering=self.centering,
        )
        self._pending = (stat, teacher_output.reshape(-1, teacher_output.shape[-1]).shape[0])

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """``center <- m center + (1 - m) mean_global_batch(stat)`` for the recorded statistic, if any."""
        if self._pending is None:
            return
        (mean,) = global_batch_means(self._pending)
        self.center.mul_(self.center_momentum).add_(mean.view_as(self.center).to(self.center.dtype), alpha=1 - self.center_momentum)
        self._pending = None


class DINOv2vMFLoss(_VMFCenteredLoss):
    """DINO-vMF replacement of ``dinov2.loss.DINOLoss`` (same methods, same arguments, ``center`` (1, K))."""

    def __init__(self, out_dim: int, student_norms: CapturedNorms, teacher_norms: CapturedNorms, **kwargs) -> None:
        super().__init__((1, out_dim), student_norms, teacher_norms, **kwargs)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp targets on ``exp(t / teacher_temp + log C_p(||w_t|| / teacher_temp))``."""
        return self._sinkhorn(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor], teacher_out_softmaxed_centered_list) -> torch.Tensor:
        """``-sum_s sum_t mean_b [t . log_softmax(s / student_temp + log C_p(||w_s|| / student_temp))]``,
        as DINOv2's sum over every (student, teacher) pair; each student tensor (B, K), each target (B, K)."""
        correction = self._student_correction()
        targets = torch.cat([t for t in teacher_out_softmaxed_centered_list])
        total = 0
        for student in student_output_list:
            n_targets = targets.shape[0] // student.shape[0]
            total = total + n_targets * multicrop_cross_entropy(
                student, targets, n_views=1, student_temp=self.student_temp,
                student_correction=correction, skip_same_view=False,
            )
        return total


class DINOv2iBOTPatchvMFLoss(_VMFCenteredLoss):
    """iBOT-vMF replacement of ``dinov2.loss.iBOTPatchLoss`` (same methods, ``center`` (1, 1, K))."""

    def __init__(self, patch_out_dim: int, student_norms: CapturedNorms, teacher_norms: CapturedNorms, **kwargs) -> None:
        super().__init__((1, 1, patch_out_dim), student_norms, teacher_norms, **kwargs)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_masked_patches_tensor=None,
                               n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp targets for the masked patches (rows of ``teacher_output``). DINOv2 passes the
        global number of masked patches, a constant factor that cancels in the normalisation."""
        return self._sinkhorn(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
                student_masks_flat: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, K), masks (B, N): per image the mean cross-entropy over its masked tokens, then
        the mean over images (0 for an image without masked tokens)."""
        masks = student_masks_flat.to(torch.float32)
        weight = (masks / masks.sum(-1, keepdim=True).clamp(min=1.0) / masks.shape[0]).flatten()
        return multicrop_cross_entropy(
            student_patch_tokens.flatten(0, 1), teacher_patch_tokens.flatten(0, 1), n_views=1,
            student_temp=self.student_temp, student_correction=self._student_correction(), skip_same_view=False,
            row_weight=weight,
        )

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, n_masked_patches: Optional[int] = None,
                       masks_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Masked tokens only (M, K): ``sum_m w_m CE_m / n_images`` with ``w_m`` = 1 / (masked tokens of
        the token's image), DINOv2's ``masks_weight``; the first ``n_masked_patches`` rows count."""
        if masks_weight is None:
            counts = student_masks_flat.sum(-1, keepdim=True).clamp(min=1.0)
            masks_weight = (1 / counts).expand_as(student_masks_flat)[student_masks_flat]
        student, teacher = student_patch_tokens_masked, teacher_patch_tokens_masked
        if n_masked_patches is not None:
            student, teacher = student[:n_masked_patches], teacher[:n_masked_patches]
        total = multicrop_cross_entropy(
            student, teacher, n_views=1, student_temp=self.student_temp,
            student_correction=self._student_correction(), skip_same_view=False, row_weight=masks_weight,
        )
        return total / student_masks_flat.shape[0]


def _capture(layers: dict[int, CapturedNorms], layer: nn.Module, role: str, detach: bool) -> CapturedNorms:
    # One hook per layer: a head shared by the DINO and iBOT terms is read once per forward.
    if id(layer) not in layers:
        layers[id(layer)] = CapturedNorms(layer, role=role, detach=detach)
    return layers[id(layer)]


def patch(model: nn.Module, *, centering: str = "probability", mode: str = "exact") -> nn.Module:
    """Replace ``model.dino_loss`` / ``model.ibot_patch_loss`` of a DINOv2 ``SSLMetaArch`` by vMF losses.

    Args:
        model: DINOv2's ``SSLMetaArch`` (before or after ``prepare_for_distributed_training``), with
            ``student``/``teacher`` ModuleDicts holding ``dino_head`` (and ``ibot_head`` when
            ``ibot_separate_head``).
        centering: what ``softmax_center_teacher`` does, see the module docstring. DINOv2's
            ``cfg.train.centering: sinkhorn_knopp`` still selects ``sinkhorn_knopp_teacher``.
        mode: ``"exact"`` or ``"approx"`` log-normaliser.

    Returns:
        ``model``, patched in place. Student temperature and center momenta are copied from its losses;
        with ``centering="logit"`` the centers too.
    """
    check_centering(centering)
    for attr in ("student", "teacher"):
        if not isinstance(getattr(model, attr, None), nn.ModuleDict):
            raise TypeError(f"model must be DINOv2's SSLMetaArch (with ModuleDict .{attr}), got {type(model).__name__}")
    captured: dict[int, CapturedNorms] = {}
    settings = {"centering": centering, "mode": mode}

    def norms_for(head_key: str) -> tuple[CapturedNorms, CapturedNorms, int, int]:
        student_layer = find_head(model.student[head_key], role=f"student {head_key}").last_layer
        teacher_layer = find_head(model.teacher[head_key], role=f"teacher {head_key}").last_layer
        shape = prototype_shape(student_layer)
        if prototype_shape(teacher_layer) != shape:
            raise ValueError(f"{head_key}: student prototypes (K, p) = {shape}, teacher {prototype_shape(teacher_layer)}")
        warn_if_frozen(student_layer, flag="a trainable last_layer.weight_g", stacklevel=4)
        student = _capture(captured, student_layer, f"student {head_key}", detach=False)
        teacher = _capture(captured, teacher_layer, f"teacher {head_key}", detach=True)
        return student, teacher, shape[0], shape[1]

    def replace(name: str, cls: type, head_key: str) -> None:
        old = getattr(model, name)
        student, teacher, n_prototypes, p = norms_for(head_key)
        if old.center.shape[-1] != n_prototypes:
            raise ValueError(f"model.{name} has {old.center.shape[-1]} prototypes, the {head_key} has {n_prototypes}")
        new = cls(n_prototypes, student, teacher, p=p, student_temp=old.student_temp,
                  center_momentum=old.center_momentum, **settings)
        if centering == "logit":
            new.center.copy_(old.center)
        setattr(model, name, new.to(device_of(old)))

    if hasattr(model, "dino_loss"):
        replace("dino_loss", DINOv2vMFLoss, "dino_head")
    if hasattr(model, "ibot_patch_loss"):
        replace("ibot_patch_loss", DINOv2iBOTPatchvMFLoss, "ibot_head" if getattr(model, "ibot_separate_head", False) else "dino_head")
    if not captured:
        raise TypeError("model has neither dino_loss nor ibot_patch_loss: nothing to patch")
    return model
