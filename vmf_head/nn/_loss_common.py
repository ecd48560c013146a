"""Machinery shared by :class:`DINOvMFLoss` and :class:`iBOTvMFLoss`: the teacher-temperature
schedule, the centers and their update, the vMF corrections, the backend choice and input checks."""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from ..functional import dino_loss as _reference
from ..functional.centering import check_centering, global_batch_means
from ..functional.vmf import check_temperature, vmf_corrections
from ..normalizer import MODES

BACKENDS = ("auto", "triton", "reference")
# Where the fused Triton version of each contract function lives.
_FUSED_MODULES = {"dino_vmf_loss": "vmf_head.ops.dino_loss", "ibot_patch_vmf_loss": "vmf_head.ops.ibot_patch_loss"}
# What a fused module supports when it does not say (it lists its centerings in CENTERINGS otherwise).
_FUSED_DEFAULT_CENTERINGS = ("logit", "probability")


def temperature_schedule(
    warmup: float, final: float, warmup_epochs: int, nepochs: int, *, hold_epochs: int = 0
) -> np.ndarray:
    """Per-epoch teacher temperatures as DINO and iBOT build them (float64 numpy array, length ``nepochs``):
    ``hold_epochs`` at ``warmup``, a linear ramp ``np.linspace(warmup, final, warmup_epochs)``, then
    ``final``. DINO uses ``hold_epochs = 0``; iBOT's ``teacher_temp2`` holds until ``mim_start_epoch``."""
    check_temperature("warmup_teacher_temp", warmup)
    check_temperature("teacher_temp", final)
    for name, n in (("warmup_teacher_temp_epochs", warmup_epochs), ("nepochs", nepochs), ("mim_start_epoch", hold_epochs)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if hold_epochs + warmup_epochs > nepochs:
        raise ValueError(
            f"the warm-up (mim_start_epoch={hold_epochs} + warmup_teacher_temp_epochs={warmup_epochs}) "
            f"does not fit in nepochs={nepochs}"
        )
    return np.concatenate(
        (
            np.ones(hold_epochs) * warmup,
            np.linspace(warmup, final, warmup_epochs),
            np.ones(nepochs - warmup_epochs - hold_epochs) * final,
        )
    )


def scheduled(schedule: np.ndarray, epoch: object, name: str = "teacher_temp") -> float:
    """``schedule[epoch]`` as a float; ValueError for an epoch outside ``[0, len(schedule))``."""
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1 and not epoch.is_floating_point():
        epoch = int(epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or not 0 <= epoch < len(schedule):
        raise ValueError(
            f"epoch must be an int in [0, nepochs) = [0, {len(schedule)}) to look up the {name} schedule, got {epoch!r}"
        )
    return float(schedule[int(epoch)])


def initial_center(centering: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The center a loss starts from: ``1/K`` for probability centering (the uniform posterior), 0
    for logit centering (DINO's), and 0 for Sinkhorn (which keeps no center; the buffer stays put)."""
    k = shape[-1]
    return torch.full(shape, 1.0 / k) if centering == "probability" else torch.zeros(shape)


def check_config(p: object, mode: object, centering: object, backend: object, momentum: dict[str, object]) -> None:
    """ValueError naming the first bad constructor argument shared by the two losses."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an int >= 2 (the head's bottleneck dim), got {p!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_centering(centering)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, m in momentum.items():
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {m!r}")


def check_out_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


_imported: dict[str, ModuleType | BaseException] = {}


def _import_fused(name: str) -> ModuleType | BaseException:
    """The fused module of contract function ``name``, or the ImportError that stopped it (no Triton,
    or the op is not part of this installation); imported once, on first use."""
    if name not in _imported:
        try:
            _imported[name] = importlib.import_module(_FUSED_MODULES[name])
        except ImportError as err:
            _imported[name] = err
    return _imported[name]


def loss_function(name: str, backend: str, centering: str, device: torch.device) -> Callable:
    """The implementation of contract function ``name`` (``"dino_vmf_loss"`` or
    ``"ibot_patch_vmf_loss"``) to use for this call.

    ``reference``: :mod:`vmf_head.functional.dino_loss`. ``triton``: the fused Triton op in
    :mod:`vmf_head.ops` (RuntimeError if it does not import, ValueError if it does not support
    ``centering``). ``auto``: the fused op for CUDA inputs when it imports and supports
    ``centering``, the reference otherwise.
    """
    reference = getattr(_reference, name)
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return reference
    fused = _import_fused(name)
    if isinstance(fused, BaseException):
        if backend == "auto":
            return reference
        raise RuntimeError(
            f"backend='triton' needs the fused op {_FUSED_MODULES[name]}, which failed to import: {fused!r}"
        )
    supported = getattr(fused, "CENTERINGS", _FUSED_DEFAULT_CENTERINGS)
    if centering not in supported:
        if backend == "auto":
            return reference
        raise ValueError(
            f"backend='triton' supports centering in {tuple(supported)}, got {centering!r}; use backend='reference'"
        )
    return getattr(fused, name)


def corrections(
    student_norms: torch.Tensor | None,
    teacher_norms: torch.Tensor | None,
    k: int,
    *,
    student_temp: float,
    teacher_temp: float,
    p: int,
    mode: str,
    what: str = "",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(log C_p(||w_s|| / tau_s), log C_p(||w_t|| / tau_t))``, or ``(None, None)`` without norms
    (plain DINO/iBOT). The teacher's is detached (the teacher is an EMA copy)."""
    if (student_norms is None) != (teacher_norms is None):
        raise ValueError(f"pass both student_norms and teacher_norms{what} or neither")
    if student_norms is None:
        return None, None
    for name, norms in (("student_norms", student_norms), ("teacher_norms", teacher_norms)):
        if not isinstance(norms, torch.Tensor) or tuple(norms.shape) != (k,):
            raise ValueError(f"{name}{what} must be a tensor of shape (K,) = ({k},), got {getattr(norms, 'shape', norms)!r}")
    student, teacher = vmf_corrections([(student_norms, student_temp), (teacher_norms.detach(), teacher_temp)], p, mode=mode)
    return student, teacher.detach()


@torch.no_grad()
def update_centers_(*updates: tuple[torch.Tensor, torch.Tensor, int, float]) -> None:
    """EMA update of centers with global-batch statistics, in place: ``c <- m c + (1 - m) stat``.

    Args:
        updates: ``(center buffer, local batch statistic, local sample count, momentum)`` per center;
            all statistics travel in one all-reduce when torch.distributed is initialised.
    """
    means = global_batch_means(*((stat, n) for _, stat, n, _ in updates))
    for (center, _, _, m), mean in zip(updates, means):
        center.copy_(center * m + mean.to(center.dtype).view_as(center) * (1 - m))


def should_check_finite(check_finite: bool | None, device: torch.device) -> bool:
    """None checks where it costs no device synchronisation (CPU); True/False always/never."""
    return device.type == "cpu" if check_finite is None else bool(check_finite)


def raise_if_not_finite(loss: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> None:
    """ValueError naming the first non-finite input when ``loss`` is not finite (a non-finite output,
    norm or center makes the loss non-finite, so the scalar test is cheap; the search runs only then)."""
    if bool(torch.isfinite(loss)):
        return
    for name, tensor in inputs.items():
        if tensor is not None and not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name} has non-finite values (inf or NaN)")
    raise ValueError("the loss is not finite although all inputs are: the logits overflow float32 after division by the temperature")
