"""Machinery shared by :class:`DINOvMFLoss` and :class:`iBOTvMFLoss` (and the integrations' losses built
on them): the teacher-temperature schedule, the centers and their update, the vMF corrections, the
finiteness check and the refusal of a logit-space center where a probability center is expected.

Nothing here reads device data on the host during a step: schedules live on the device and are
indexed there, center updates and the finiteness check are device operations (``docs/loss.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .._dispatch import check_backend
from .._validation import check_choice, check_int, check_real, check_tensor
from ..functional.centering import check_centering, global_batch_sums
from ..functional.vmf import vmf_corrections
from ..special.vmf import MODES


def temperature_schedule(
    warmup: float,
    final: float,
    warmup_epochs: int,
    nepochs: int,
    *,
    hold_epochs: int = 0,
    names: tuple[str, str] = ("warmup_teacher_temp", "teacher_temp"),
) -> torch.Tensor:
    """Per-epoch teacher temperatures as DINO and iBOT build them, a float64 tensor of length ``nepochs``:
    ``hold_epochs`` at ``warmup``, a linear ramp ``np.linspace(warmup, final, warmup_epochs)``, then
    ``final``. DINO uses ``hold_epochs = 0``; iBOT's ``teacher_temp2`` holds until ``mim_start_epoch``.
    ``names`` are the constructor's names of the two temperatures, for the error messages."""
    warmup = check_real(names[0], warmup, low=0.0, open_low=True)
    final = check_real(names[1], final, low=0.0, open_low=True)
    warmup_epochs = check_int("warmup_teacher_temp_epochs", warmup_epochs, minimum=0)
    nepochs = check_int("nepochs", nepochs, minimum=1)
    hold_epochs = check_int("mim_start_epoch", hold_epochs, minimum=0)
    if hold_epochs + warmup_epochs > nepochs:
        raise ValueError(
            f"the warm-up (mim_start_epoch={hold_epochs} + warmup_teacher_temp_epochs={warmup_epochs}) "
            f"does not fit in nepochs={nepochs}"
        )
    values = np.concatenate(
        (
            np.ones(hold_epochs) * warmup,
            np.linspace(warmup, final, warmup_epochs),
            np.ones(nepochs - warmup_epochs - hold_epochs) * final,
        )
    )
    return torch.from_numpy(values)


def scheduled(schedule: torch.Tensor, epoch: object, name: str = "teacher_temp") -> torch.Tensor:
    """``schedule[epoch]`` as a 0-d tensor on the schedule's device, never a Python number: a compiled
    step sees a new temperature as new data, not as a new constant.

    ``epoch`` is an int (Python or NumPy; range-checked) or a 0-d integer tensor (indexed on the
    device, so an out-of-range epoch is an IndexError on the CPU and a device-side assert on CUDA).
    """
    if isinstance(epoch, torch.Tensor):
        if epoch.dim() != 0 or epoch.is_floating_point() or epoch.is_complex() or epoch.dtype == torch.bool:
            raise TypeError(
                f"epoch must be an int or a 0-d integer tensor, got a {epoch.dtype} tensor of shape "
                f"{tuple(epoch.shape)}"
            )
        # index_select, not schedule[epoch]: indexing with a 0-d tensor reads it on the host
        return schedule.index_select(0, epoch.reshape(1).to(schedule.device)).reshape(())
    epoch = check_int("epoch", epoch, minimum=0, what=f"an index into the {name} schedule")
    if epoch >= len(schedule):
        raise ValueError(
            f"epoch must be in [0, nepochs) = [0, {len(schedule)}) to look up the {name} schedule, got {epoch}"
        )
    return schedule[epoch]


def initial_center(centering: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The center a loss starts from: ``1/K`` for probability centering (the uniform posterior), 0
    for logit centering (DINO's), and 0 for Sinkhorn (which keeps no center; the buffer stays put)."""
    k = shape[-1]
    return torch.full(shape, 1.0 / k) if centering == "probability" else torch.zeros(shape)


def check_config(
    p: object, mode: object, centering: object, backend: object, momentum: dict[str, object]
) -> int | None:
    """Check the constructor arguments shared by the losses; ``p`` (None or an int >= 2) returned."""
    if p is not None:
        p = check_int("p", p, minimum=2, what="the head's bottleneck dim")
    check_choice("mode", mode, MODES)
    check_centering(centering)
    check_backend(backend)
    for name, m in momentum.items():
        check_real(name, m, low=0.0, high=1.0)
    return p


def corrections(
    student_norms: torch.Tensor | None,
    teacher_norms: torch.Tensor | None,
    k: int,
    *,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    p: int | None,
    mode: str,
    what: str = "",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(log C_p(||w_s|| / tau_s), log C_p(||w_t|| / tau_t))``, or ``(None, None)`` without norms
    (plain DINO/iBOT). The teacher's is detached (the teacher is an EMA copy)."""
    if (student_norms is None) != (teacher_norms is None):
        raise ValueError(f"pass both student_norms and teacher_norms{what} or neither")
    if student_norms is None:
        return None, None
    if p is None:
        raise ValueError(
            "the loss was built without p, the dimension of the sphere the prototypes live on; it is needed with "
            "prototype norms: build the loss with p=head.p (the head's bottleneck_dim, 256 in DINO)"
        )
    for name, norms in (("student_norms", student_norms), ("teacher_norms", teacher_norms)):
        check_tensor(f"{name}{what}", norms, dims=1, shape=f"(K,) = ({k},)")
        if norms.shape[0] != k:
            raise ValueError(f"{name}{what} must have shape (K,) = ({k},), got {tuple(norms.shape)}")
    student, teacher = vmf_corrections(
        [(student_norms, student_temp), (teacher_norms.detach(), teacher_temp)], p, mode=mode
    )
    return student, teacher.detach()


@torch.no_grad()
def update_centers_(*updates: tuple[torch.Tensor, torch.Tensor | None, int, float]) -> None:
    """EMA update of centers with global-batch statistics, in place: ``c <- m c + (1 - m) stat``.

    Args:
        updates: ``(center buffer, local batch statistic, local sample count, momentum)`` per center;
            all statistics travel in one all-reduce when torch.distributed is initialised. A center
            whose statistic is None (Sinkhorn) is left alone, and so is one no rank has samples for
            (an empty global batch), without reading the count on the host.
    """
    updates = tuple(u for u in updates if u[1] is not None)
    if not updates:
        return
    sums, counts = global_batch_sums(*((stat, n) for _, stat, n, _ in updates))
    for i, ((center, _, _, m), total) in enumerate(zip(updates, sums)):
        count = counts[i]
        mean = (total / count.clamp_min(1.0)).to(center.dtype).view_as(center)
        center.copy_(torch.where(count > 0, center * m + mean * (1 - m), center))


def assert_finite(loss: torch.Tensor, temperatures: dict[str, torch.Tensor], diagnose: Callable[[], None]) -> None:
    """Check on the device that ``loss`` is finite and the temperatures positive, without a host sync.

    ``torch._assert_async``: on the CPU a failure raises at once, and ``diagnose`` (which may read
    the inputs: it runs only after a failure) turns it into a ValueError naming the cause; on CUDA it
    is a device-side assert, reported at the next synchronisation (e.g. the ``loss.item()`` a training
    loop logs), fatal to the CUDA context like every device assert.
    """
    ok = torch.isfinite(loss.detach())
    for temp in temperatures.values():
        ok = ok & (temp > 0)
    message = "vmf_head: the loss is not finite or a temperature is not positive (see docs/loss.md, 'Finiteness')"
    if torch.compiler.is_compiling() or loss.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        diagnose()
        raise


def diagnose_nonfinite(
    inputs: dict[str, torch.Tensor | None], norms: dict[str, torch.Tensor | None], temperatures: dict[str, torch.Tensor]
) -> None:
    """Raise a ValueError naming the first bad input: a non-finite output, norm or center, a negative
    norm, a non-positive temperature; else say that the logits overflow. Reads the data: for the
    failure path only."""
    for name, temp in temperatures.items():
        if not bool(temp > 0):
            raise ValueError(f"{name} must be positive, got {float(temp)}")
    for name, tensor in {**inputs, **norms}.items():
        if tensor is not None and not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name} has non-finite values (inf or NaN)")
    for name, tensor in norms.items():
        if tensor is not None and bool((tensor.detach() < 0).any()):
            raise ValueError(f"{name} has negative values: a prototype norm ||w_k|| is >= 0")
    raise ValueError(
        "the loss is not finite although all inputs are: the logits overflow float32 after division by the temperature"
    )


class ProbabilityCenterCheck:
    """Mixin for the losses: refuse a checkpoint whose center cannot be a probability center.

    Resuming a plain DINO/iBOT checkpoint (or a ``centering="logit"`` one) into a loss with probability
    centering would load a logit-space center (zeros at the start, raw output means later) into a
    buffer read as a distribution over prototypes. Training scripts restore the loss's state dict
    themselves (DINO: ``utils.restart_from_checkpoint``), so the check sits in
    ``_load_from_state_dict``: a ValueError names the problem instead of a run that trains with a
    meaningless center. The check reads the checkpoint's tensor on the host: loading is not a step.
    """

    _CENTERS = ("center", "center2")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if getattr(self, "centering", None) == "probability":
            for name in self._CENTERS:
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and value.numel() and not _is_distribution(value):
                    raise ValueError(
                        f"the checkpoint's {prefix + name} is not a probability vector (min {float(value.min()):.3g}, "
                        f"sum {float(value.double().sum()):.6g}): it was written by a run without probability "
                        "centering (plain DINO/iBOT, or centering='logit'). Start the vMF run from scratch, or build "
                        "the loss with centering='logit'."
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _is_distribution(center: torch.Tensor) -> bool:
    return bool((center >= 0).all()) and abs(float(center.double().sum()) - 1.0) < 1e-3
