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
  (DINO-vMF's, default), ``"logit"`` (DINOv2's own subtraction) or ``"sinkhorn"``. It computes the
  targets and this batch's center statistic in one pass; ``update_center``, which DINOv2 calls next on
  the same tensor, records that statistic (the update is applied at the next centering, DINOv2's order).
- ``sinkhorn_knopp_teacher`` runs Sinkhorn-Knopp on ``exp(l_t)`` with the corrected teacher logits.
- Center statistics are means over the global batch, each rank weighted by its number of rows (DINOv2
  weights every rank's mean equally; the two agree when ranks hold equally many masked patches).
- Every cross-entropy goes through :func:`vmf_head.functional.multicrop_cross_entropy` (the fused kernel
  on CUDA); no step reads a value on the host.

The prototype norms are taken from the heads' ``last_layer`` (``student``/``teacher`` ``dino_head``, and
``ibot_head`` when ``cfg.ibot.separate_head``) while the layer runs (:class:`~._common.CapturedNorms`):
under FSDP the parameters are whole there, and the norms' gradient reaches them before they are
resharded. Checkpoints keep DINOv2's keys: the new losses hold ``center`` with the shapes of DINOv2's.

The loss classes here are also the base of :mod:`vmf_head.integrations.dinov3`, whose losses are
DINOv2's with a few changes of protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..diagnostics import CollapseMonitor
from ..functional.centering import check_centering
from ..functional.cross_entropy import Pairing
from ..functional.dino_loss import masked_token_weights
from ..functional.vmf import corrections
from ..nn.centered_loss import CenteredLoss
from ._common import CapturedNorms, device_of, find_head, prototype_shape, warn_if_frozen

__all__ = ["DINOv2iBOTPatchvMFLoss", "DINOv2vMFLoss", "patch"]


def _layout(x: torch.Tensor) -> tuple:
    """What identifies a tensor's data without reading it: storage address, shape, strides, version."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x._version


def _rows(x: torch.Tensor) -> int:
    """Number of samples of a (..., K) teacher output: every leading index is one."""
    return x.numel() // x.shape[-1]


class _VMFCenteredLoss(CenteredLoss):
    """What the DINOv2 and DINOv3 losses add to :class:`~vmf_head.nn.centered_loss.CenteredLoss`:
    prototype norms captured from the heads, and DINOv2's split protocol (targets first, center
    update recorded, student terms later).

    Args:
        center_shape: shape of the ``center`` buffer, ``(1, K)`` or ``(1, 1, K)``.
        student_norms, teacher_norms: the prototype norms of the two heads' latest forwards.
        p_student, p_teacher: the heads' bottleneck dimensions (equal unless the teacher is another
            network, as in DINOv3's distillation).
        student_temp, center_momentum: as the codebase's loss.
        centering, mode: see :class:`~vmf_head.nn.centered_loss.CenteredLoss`.
    """

    def __init__(
        self,
        center_shape: tuple[int, ...],
        student_norms: CapturedNorms,
        teacher_norms: CapturedNorms,
        *,
        p_student: int,
        p_teacher: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "probability",
        mode: str = "exact",
    ) -> None:
        super().__init__(p=p_student, student_temp=student_temp, centering=centering, mode=mode, backend="auto",
                         check_finite=False)  # fmt: skip
        self.p_teacher = p_teacher
        self._register_center("center", center_shape, center_momentum, "center_momentum")
        self._student_norms, self._teacher_norms = student_norms, teacher_norms
        self._centered: tuple[tuple, torch.Tensor | None] | None = None  # (layout, stat) of the last targets
        self._pending: tuple[torch.Tensor, int] | None = None  # (stat, rows) awaiting apply_center_update
        self._koleo_due = False

    def _correction(self, norms: CapturedNorms, temperature, p: int) -> torch.Tensor:
        return corrections([(norms(), temperature)], p, mode=self.mode)[0]

    def _centered_targets(
        self, teacher_output: torch.Tensor, teacher_temp: float, centering: str, n_iterations: int = 3
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q, stat)`` with the current center; ``stat`` None for Sinkhorn. The codebases ask for the
        targets once per step, so this is where a step of :meth:`watch` begins: the monitor sees them,
        and the next student term carries the KoLeo term."""
        q, stat = self._targets(
            "center",
            teacher_output,
            teacher_temp,
            self._correction(self._teacher_norms, teacher_temp, self.p_teacher),
            centering=centering,
            sinkhorn_iterations=n_iterations,
        )
        self._koleo_due = True
        if self.monitor is not None:
            self._observe(lambda: q, None)
        return q, stat

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, update_centers: bool = True
    ) -> torch.Tensor:
        """Teacher targets (like ``teacher_output``, float32) under this loss's ``centering``, after applying
        the update recorded by the previous ``update_center`` (unless ``update_centers=False``). The
        center statistic of ``teacher_output`` comes out of the same pass, for ``update_center``."""
        if update_centers:
            self.apply_center_update()
        q, stat = self._centered_targets(teacher_output, teacher_temp, self.centering)
        self._centered = (_layout(teacher_output), stat)
        return q

    def _sinkhorn(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
        """Sinkhorn-Knopp targets on ``exp(t / teacher_temp + log C_p(||w_t|| / teacher_temp))``, in log space."""
        return self._centered_targets(teacher_output, teacher_temp, "sinkhorn", n_iterations)[0]

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Record the center statistic of ``teacher_output``, the tensor the preceding
        ``softmax_center_teacher`` centered (mean of it for logit centering, of the uncentered teacher
        posterior for probability centering); ``apply_center_update`` applies it."""
        if self.centering == "sinkhorn":
            return
        if self._centered is None or self._centered[0] != _layout(teacher_output):
            raise ValueError(
                "update_center(teacher_output) takes the tensor just passed to softmax_center_teacher (DINOv2's "
                "order), whose center statistic that call computed; call softmax_center_teacher on it first"
            )
        self._pending = (self._centered[1], _rows(teacher_output))
        self._centered = None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the statistic recorded by ``update_center``, if any."""
        if self._pending is not None:
            self._update_centers({"center": self._pending})
            self._pending = None

    def _student_cross_entropy(
        self, student: torch.Tensor, targets: torch.Tensor, pairing: Pairing, row_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The cross-entropy with ``l_s = s / student_temp + log C_p(||w_s|| / student_temp)``."""
        correction = self._correction(self._student_norms, self.student_temp, self.p)
        loss = self._cross_entropy(student, targets, pairing, correction, row_weight)
        if self.koleo_weight and self._koleo_due:  # once per step (DINOv2 calls the DINO loss twice)
            self._koleo_due = False
            loss = loss + self._koleo()
        return loss


def _masked_token_weights(masks: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The weights of the first ``n_tokens`` masked tokens of ``masks`` (B, N), in row-major order, times
    the number of images: DINOv2's ``masks_weight``, found by a fixed-size ``nonzero`` (no host sync)."""
    per_token = masked_token_weights(masks).reshape(-1) * masks.shape[0]
    return per_token[torch.nonzero_static(masks.reshape(-1), size=n_tokens).squeeze(1)]


class _MaskedPatchTerms:
    """The iBOT patch terms of DINOv2's and DINOv3's ``iBOTPatchLoss`` (same signatures in both)."""

    _student_cross_entropy: Callable[..., torch.Tensor]

    def forward(
        self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor
    ) -> torch.Tensor:
        """Tokens (B, N, K), masks (B, N): per image the mean cross-entropy over its masked tokens, then
        the mean over images (0 for an image without masked tokens)."""
        return self._student_cross_entropy(
            student_patch_tokens.flatten(0, 1),
            teacher_patch_tokens.flatten(0, 1),
            _ROW_TO_ROW,
            masked_token_weights(student_masks_flat).flatten(),
        )

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked tokens only (M, K): ``sum_m w_m CE_m / n_images`` with ``w_m`` = 1 / (masked tokens of
        the token's image), the codebase's ``masks_weight``; the first ``n_masked_patches`` rows count."""
        student, teacher = student_patch_tokens_masked, teacher_patch_tokens_masked
        if n_masked_patches is not None:
            student, teacher = student[:n_masked_patches], teacher[:n_masked_patches]
        if masks_weight is None:
            masks_weight = _masked_token_weights(student_masks_flat, student.shape[0])
        total = self._student_cross_entropy(student, teacher, _ROW_TO_ROW, masks_weight)
        return total / student_masks_flat.shape[0]


_ROW_TO_ROW = Pairing(1, 1, skip_same=False)


class DINOv2vMFLoss(_VMFCenteredLoss):
    """DINO-vMF replacement of ``dinov2.loss.DINOLoss`` (same methods, same arguments, ``center`` (1, K))."""

    def __init__(self, out_dim: int, student_norms: CapturedNorms, teacher_norms: CapturedNorms, **kwargs) -> None:
        super().__init__((1, out_dim), student_norms, teacher_norms, **kwargs)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets (B, K) on ``exp(t / teacher_temp + log C_p(||w_t|| / teacher_temp))``."""
        return self._sinkhorn(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor], teacher_out_softmaxed_centered_list) -> torch.Tensor:
        """``-sum_s sum_t mean_b [t . log_softmax(s / student_temp + log C_p(||w_s|| / student_temp))]``,
        as DINOv2's sum over every (student, teacher) pair; each student tensor (B, K), each target (B, K)."""
        targets = torch.cat(list(teacher_out_softmaxed_centered_list))
        total = 0
        for student in student_output_list:
            # the cross-entropy averages over the target views; DINOv2 sums them
            n_targets = targets.shape[0] // student.shape[0]
            pairing = Pairing(1, n_targets, skip_same=False)
            total = total + n_targets * self._student_cross_entropy(student, targets, pairing)
        return total


class DINOv2iBOTPatchvMFLoss(_MaskedPatchTerms, _VMFCenteredLoss):
    """iBOT-vMF replacement of ``dinov2.loss.iBOTPatchLoss`` (same methods, ``center`` (1, 1, K))."""

    def __init__(
        self, patch_out_dim: int, student_norms: CapturedNorms, teacher_norms: CapturedNorms, **kwargs
    ) -> None:
        super().__init__((1, 1, patch_out_dim), student_norms, teacher_norms, **kwargs)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for the masked patches (rows of ``teacher_output``). The codebase passes
        the number of masked patches, a constant factor that cancels in the normalisation: unused."""
        return self._sinkhorn(teacher_output, teacher_temp, n_iterations)


def replace_losses(
    model: nn.Module,
    losses: dict[str, tuple[type, str]],
    *,
    centering: str,
    mode: str,
    frozen_flag: str,
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> nn.Module:
    """Replace the losses of a DINOv2/DINOv3 ``SSLMetaArch`` by vMF losses reading its heads' norms.

    Args:
        model: the meta-architecture, with ``student``/``teacher`` ModuleDicts of heads.
        losses: attribute name -> (vMF loss class, key of the head it reads in ``student``/``teacher``).
        centering, mode: given to every new loss.
        frozen_flag: what makes the student's norms trainable, for :func:`warn_if_frozen`.
        koleo_weight, monitor: the collapse options, given to ``model.dino_loss`` (the [CLS] term) only.

    Returns:
        ``model``, patched in place. Student temperature and center momentum are copied from the old
        losses; with ``centering="logit"`` the centers too.
    """
    check_centering(centering)
    for attr in ("student", "teacher"):
        if not isinstance(getattr(model, attr, None), nn.ModuleDict):
            raise TypeError(f"model must be an SSLMetaArch (with ModuleDict .{attr}), got {type(model).__name__}")
    readers: dict[tuple[int, bool], CapturedNorms] = {}

    def reader(layer: nn.Module, role: str, detach: bool) -> CapturedNorms:
        # One reader per layer and gradient mode: a head shared by the DINO and iBOT terms is read once.
        return readers.setdefault((id(layer), detach), CapturedNorms(layer, role=role, detach=detach))

    built = {}
    for name, (cls, head_key) in losses.items():
        old = getattr(model, name)
        heads = {
            role: find_head(getattr(model, role)[head_key], role=f"{role} {head_key}")
            for role in ("student", "teacher")
        }
        for role, head in heads.items():
            if getattr(head, "_compiled_call_impl", None) is not None:
                raise RuntimeError(
                    f"the {role} {head_key} is already compiled: torch.compile does not see hooks added afterwards, "
                    "so its prototype norms would never be read. Patch the model before "
                    "prepare_for_distributed_training (which compiles the heads)."
                )
        student_layer, teacher_layer = heads["student"].last_layer, heads["teacher"].last_layer
        (k_student, p_student), (k_teacher, p_teacher) = prototype_shape(student_layer), prototype_shape(teacher_layer)
        if k_student != k_teacher or old.center.shape[-1] != k_student:
            raise ValueError(
                f"model.{name}: {old.center.shape[-1]} prototypes in its center, {k_student} in the student "
                f"{head_key}, {k_teacher} in the teacher's"
            )
        warn_if_frozen(student_layer, flag=frozen_flag, stacklevel=4)
        new = cls(
            k_student,
            reader(student_layer, f"student {head_key}", False),
            reader(teacher_layer, f"teacher {head_key}", True),
            p_student=p_student,
            p_teacher=p_teacher,
            student_temp=old.student_temp,
            center_momentum=old.center_momentum,
            centering=centering,
            mode=mode,
        )
        if centering == "logit":
            new.center.copy_(old.center)
        if name == "dino_loss":
            new.watch(student_layer, koleo_weight=koleo_weight, monitor=monitor)
        built[name] = new.to(device_of(old))
    for name, new in built.items():
        setattr(model, name, new)
    return model


def patch(
    model: nn.Module,
    *,
    centering: str = "probability",
    mode: str = "exact",
    koleo_weight: float = 0.0,
    monitor: bool | CollapseMonitor | None = None,
) -> nn.Module:
    """Replace ``model.dino_loss`` / ``model.ibot_patch_loss`` of a DINOv2 ``SSLMetaArch`` by vMF losses.

    Args:
        model: DINOv2's ``SSLMetaArch`` (before or after ``prepare_for_distributed_training``), with
            ``student``/``teacher`` ModuleDicts holding ``dino_head`` (and ``ibot_head`` when
            ``ibot_separate_head``).
        centering: what ``softmax_center_teacher`` does, see the module docstring. DINOv2's
            ``cfg.train.centering: sinkhorn_knopp`` still selects ``sinkhorn_knopp_teacher``.
        mode: ``"exact"`` or ``"approx"`` log-normaliser.
        koleo_weight, monitor: as :func:`vmf_head.integrations.dino.patch`, on the [CLS] term: the
            monitor sees the targets of ``softmax_center_teacher`` / ``sinkhorn_knopp_teacher``, and the
            KoLeo term is added once per step, to the first ``dino_loss`` call after them, which the
            codebase weighs by its DINO loss weight over its number of crop-pair terms: the effective
            weight of KoLeo is ``koleo_weight`` times that factor.

    Returns:
        ``model``, patched in place (see :func:`replace_losses`).
    """
    losses = {}
    if hasattr(model, "dino_loss"):
        losses["dino_loss"] = (DINOv2vMFLoss, "dino_head")
    if hasattr(model, "ibot_patch_loss"):
        patch_head = "ibot_head" if getattr(model, "ibot_separate_head", False) else "dino_head"
        losses["ibot_patch_loss"] = (DINOv2iBOTPatchvMFLoss, patch_head)
    if not losses:
        raise TypeError(
            f"model must be DINOv2's SSLMetaArch; {type(model).__name__} has neither dino_loss nor ibot_patch_loss"
        )
    return replace_losses(
        model,
        losses,
        centering=centering,
        mode=mode,
        frozen_flag="a trainable last_layer.weight_g",
        koleo_weight=koleo_weight,
        monitor=monitor,
    )
