"""The step every loss module shares: :class:`CenteredLoss`.

A step of DINO-vMF, iBOT-vMF, and of every integration's loss (docs/design.md, "The data path"):

1. the teacher temperature of this epoch (:func:`scheduled`, or the codebase's own rule);
2. the vMF corrections ``log C_p(||w|| / tau)`` of both branches in one normaliser call;
3. per term, the teacher's targets under the centering and the multi-crop cross-entropy
   (``vmf_head.functional.dino_loss.centered_cross_entropy``, fused on CUDA);
4. the finiteness check, on the device;
5. the exponential moving average of every center with its global-batch statistic, one all-reduce.

:class:`CenteredLoss` holds the configuration and the centers, and implements steps 2-5 once;
``DINOvMFLoss``, ``iBOTvMFLoss`` and the integrations' losses add their call signatures. Nothing here
reads device data on the host during a step: schedules live on the device and are indexed there,
the center update and the finiteness check are device operations (docs/loss.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .._dispatch import check_backend
from .._validation import check_choice, check_int, check_real, check_temperature, check_tensor
from ..diagnostics.collapse import CollapseMonitor
from ..functional._distributed import global_batch_sums
from ..functional.centering import check_centering, initial_center, targets
from ..functional.cross_entropy import Pairing
from ..functional.dino_loss import centered_cross_entropy, patch_term
from ..functional.koleo import koleo_prototype_loss
from ..functional.vmf import corrections
from ..special.vmf import MODES

Norms = tuple[torch.Tensor | None, torch.Tensor | None]
"""The (student, teacher) prototype norms of one term, both None without the vMF correction."""
Named = dict[str, torch.Tensor | None]
"""Tensors by the names the errors give them."""


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


class CenteredLoss(nn.Module):
    """Configuration, centers and the shared step of a DINO-vMF-family loss (module docstring).

    Args:
        p: the dimension of the sphere the prototypes live on (the head's bottleneck dim), or None
            when the loss is never given prototype norms.
        student_temp: ``tau_s``.
        centering: ``"probability"`` (DINO-vMF), ``"logit"`` (DINO, iBOT) or ``"sinkhorn"`` (DINOv2).
        mode: the normaliser, ``"exact"`` or ``"approx"`` (:func:`vmf_head.log_vmf_normalizer`).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (``vmf_head._dispatch``).
        sinkhorn_iterations: Sinkhorn-Knopp iterations for ``centering="sinkhorn"``.
        check_finite: check on the device, without a host sync, that the loss is finite and the
            temperatures positive (``torch._assert_async``; docs/loss.md, "Finiteness"). On the CPU a
            failure is a ValueError naming the bad input; on CUDA a device-side assert.

    Subclasses register their centers with :meth:`_register_center`. A probability-centered loss
    refuses a checkpoint whose centers are not distributions (a plain DINO/iBOT checkpoint, or a
    ``centering="logit"`` one): loading is not a step, so that check may read the tensors.
    """

    def __init__(
        self,
        *,
        p: int | None,
        student_temp: float | torch.Tensor,
        centering: str,
        mode: str,
        backend: str,
        sinkhorn_iterations: int = 3,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.p = None if p is None else check_int("p", p, minimum=2, what="the head's bottleneck dim")
        self.student_temp = check_temperature("student_temp", student_temp)
        self.centering = check_centering(centering)
        self.mode = check_choice("mode", mode, MODES)
        self.backend = check_backend(backend)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        self.check_finite = bool(check_finite)
        self._momenta: dict[str, float] = {}
        self.koleo_weight = 0.0
        self.monitor: CollapseMonitor | None = None
        self._watched: tuple[nn.Module, ...] = ()  # a tuple: the layer is not this loss's submodule
        self._observe = self._observe_eagerly

    def _register_center(self, name: str, shape: tuple[int, ...], momentum: object, momentum_name: str) -> None:
        """A center buffer ``name`` at its initial value, moved with ``momentum`` (also set as the
        attribute ``momentum_name``, the codebase's name for it). ``name`` may be the dotted path of a
        buffer in an existing submodule, for a codebase whose checkpoints keep the center there
        (lightly's ``Center`` module: ``center.center``)."""
        momentum = check_real(momentum_name, momentum, low=0.0, high=1.0)
        owner, _, leaf = name.rpartition(".")
        self.get_submodule(owner).register_buffer(leaf, initial_center(self.centering, shape))
        self._momenta[name] = momentum
        setattr(self, momentum_name, momentum)

    def watch(
        self, student_layer: nn.Module, *, koleo_weight: float = 0.0, monitor: bool | CollapseMonitor | None = None
    ) -> None:
        """The collapse options every ``patch()`` takes (docs/collapse.md).

        Args:
            student_layer: the student's prototype layer (or head).
            koleo_weight: adds ``koleo_weight * koleo_prototype_loss(student_layer)`` (KoLeo on the
                prototype directions) to the loss this module returns; 0 leaves it out.
            monitor: a :class:`~vmf_head.diagnostics.CollapseMonitor` (True: one with its defaults) that
                gets this loss's teacher targets on its check steps, with the student's prototypes and
                their concentrations ``||w_k|| / tau_s``; on the other steps it only counts. Its reports
                go to the monitor's ``log``. The monitor runs outside ``torch.compile``'s graph.
        """
        self.koleo_weight = check_real("koleo_weight", koleo_weight, low=0.0)
        if monitor is True:
            monitor = CollapseMonitor()
        if monitor is not None and monitor is not False and not isinstance(monitor, CollapseMonitor):
            raise TypeError(f"monitor must be None, True or a CollapseMonitor, got {type(monitor).__name__}")
        self.monitor = monitor or None
        self._watched = (student_layer,)
        if self.monitor is not None:
            # (imports torch._dynamo: only for a loss that is watched)
            self._observe = torch.compiler.disable(self._observe_eagerly)

    def _observe_eagerly(self, targets: Callable[[], torch.Tensor], norms: torch.Tensor | None) -> None:
        """One step for the monitor: ``targets()`` (the teacher's probabilities, (..., K)) only on its
        check steps, so that a fused step computes them only then."""
        if self.monitor is None:
            return
        if not self.monitor.due:
            self.monitor.step(None)
            return
        q = targets()
        kappa = None if norms is None else norms.detach() / self.student_temp
        layer = self._watched[0] if self._watched else None
        self.monitor.step(q.reshape(-1, q.shape[-1]), prototypes=layer, kappa=kappa)

    def _koleo(self) -> torch.Tensor:
        """``koleo_weight`` x KoLeo on the watched student layer's prototype directions."""
        return self.koleo_weight * koleo_prototype_loss(self._watched[0])

    # -- step 2 --------------------------------------------------------------------------------

    def _corrections(self, norms: Norms, k: int, teacher_temp: float | torch.Tensor, names: tuple[str, str]) -> Norms:
        """``(log C_p(||w_s|| / tau_s), log C_p(||w_t|| / tau_t))`` in one normaliser call, the
        teacher's detached; ``(None, None)`` without norms. ``names`` name the norms in errors."""
        student_norms, teacher_norms = norms
        if (student_norms is None) != (teacher_norms is None):
            raise ValueError(f"pass both {names[0]} and {names[1]} or neither")
        if student_norms is None:
            return None, None
        if self.p is None:
            raise ValueError(
                "the loss was built without p, the dimension of the sphere the prototypes live on; it is needed "
                "with prototype norms: build the loss with p=head.p (the head's bottleneck_dim, 256 in DINO)"
            )
        for name, value in zip(names, norms):
            check_tensor(name, value, dims=1, shape=f"(K,) = ({k},)")
            if value.shape[0] != k:
                raise ValueError(f"{name} must have shape (K,) = ({k},), got {tuple(value.shape)}")
        student, teacher = corrections(
            [(student_norms, self.student_temp), (teacher_norms.detach(), teacher_temp)], self.p, mode=self.mode
        )
        return student, teacher.detach()

    # -- step 3 --------------------------------------------------------------------------------

    def _term(
        self,
        center: str,
        student: torch.Tensor,
        teacher: torch.Tensor,
        pairing: Pairing,
        *,
        teacher_temp: float | torch.Tensor,
        corrections: Norms,
        row_weight: torch.Tensor | None = None,
        student_norms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One multi-crop term against the center ``center``: ``(loss, batch statistic)``. ``row_weight``
        (B,) weighs the rows of a view (default ``1/B``), for codebases that hand in selected tokens. The
        monitor of :meth:`watch` sees this term's targets (and ``student_norms``, for the concentrations)."""
        if self.monitor is not None:
            self._observe(lambda: self._targets(center, teacher, teacher_temp, corrections[1])[0], student_norms)
        return centered_cross_entropy(
            student,
            teacher,
            pairing=pairing,
            row_weight=row_weight,
            **self._term_arguments(center, teacher_temp, corrections),
        )

    def _patch_term(
        self,
        center: str,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        mask: torch.Tensor,
        *,
        teacher_temp: float | torch.Tensor,
        corrections: Norms,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """iBOT's masked-patch term against the center ``center``: ``(loss, batch statistic)``."""
        return patch_term(student_patch, teacher_patch, mask, **self._term_arguments(center, teacher_temp, corrections))

    def _term_arguments(self, center: str, teacher_temp, corrections: Norms) -> dict:
        return dict(
            center=self.get_buffer(center),
            student_temp=self.student_temp,
            teacher_temp=teacher_temp,
            student_correction=corrections[0],
            teacher_correction=corrections[1],
            centering=self.centering,
            sinkhorn_iterations=self.sinkhorn_iterations,
            backend=self.backend,
        )

    def _targets(
        self,
        center: str,
        teacher: torch.Tensor,
        teacher_temp: float | torch.Tensor,
        teacher_correction: torch.Tensor | None,
        *,
        centering: str | None = None,
        sinkhorn_iterations: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's targets against ``center`` alone, for codebases that ask for them separately
        (``centering`` and ``sinkhorn_iterations`` default to the loss's own)."""
        return targets(
            teacher,
            self.get_buffer(center).view(-1),
            teacher_temp=teacher_temp,
            teacher_correction=teacher_correction,
            centering=centering or self.centering,
            sinkhorn_iterations=self.sinkhorn_iterations if sinkhorn_iterations is None else sinkhorn_iterations,
        )

    def _cross_entropy(
        self,
        student: torch.Tensor,
        targets: torch.Tensor,
        pairing: Pairing,
        student_correction: torch.Tensor | None,
        row_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The student's cross-entropy against given targets (codebases that form them first)."""
        return centered_cross_entropy(
            student,
            targets,
            pairing=pairing,
            student_temp=self.student_temp,
            student_correction=student_correction,
            backend=self.backend,
            row_weight=row_weight,
        )[0]

    # -- steps 4 and 5 -------------------------------------------------------------------------

    def _finish(
        self,
        total: torch.Tensor,
        statistics: dict[str, tuple[torch.Tensor | None, int]],
        temperatures: dict[str, torch.Tensor],
        diagnose: Callable[[], tuple[Named, Named]],
    ) -> torch.Tensor:
        """Check ``total`` (when ``check_finite``) and move every center by its ``(local statistic,
        local sample count)``; add the KoLeo term of :meth:`watch`. ``diagnose()`` returns the named
        inputs (outputs, centers) and prototype norms to blame after a failure on the CPU."""
        if self.check_finite:
            _assert_finite(total, temperatures, diagnose)
        self._update_centers(statistics)
        return total + self._koleo() if self.koleo_weight else total

    @torch.no_grad()
    def _update_centers(self, statistics: dict[str, tuple[torch.Tensor | None, int]]) -> None:
        """``c <- m c + (1 - m) mean`` for every center with a statistic, the means taken over the
        global batch in one all-reduce. A center whose statistic is None (Sinkhorn) is left alone, and
        so is one no rank has samples for (an empty global batch), without reading the count on the host."""
        moving = {name: value for name, value in statistics.items() if value[0] is not None}
        if not moving:
            return
        sums, counts = global_batch_sums(*moving.values())
        for (name, total), count in zip(zip(moving, sums), counts):
            center, m = self.get_buffer(name), self._momenta[name]
            mean = (total / count.clamp_min(1.0)).to(center.dtype).view_as(center)
            center.copy_(torch.where(count > 0, center * m + mean * (1 - m), center))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.centering == "probability":
            for name in self._momenta:
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


def _assert_finite(
    loss: torch.Tensor, temperatures: dict[str, torch.Tensor], diagnose: Callable[[], tuple[Named, Named]]
) -> None:
    """``torch._assert_async`` that ``loss`` is finite and the temperatures positive: no host sync.

    On the CPU a failure raises at once and is turned into a ValueError naming the cause (the inputs
    are read only then); on CUDA it is a device-side assert, reported at the next synchronisation
    (e.g. the ``loss.item()`` a training loop logs), fatal to the CUDA context like every device assert.
    """
    ok = torch.isfinite(loss.detach())
    for temp in temperatures.values():
        if isinstance(temp, torch.Tensor):
            ok = ok & (temp > 0)
    message = "vmf_head: the loss is not finite or a temperature is not positive (see docs/loss.md, 'Finiteness')"
    if torch.compiler.is_compiling() or loss.device.type != "cpu":
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        _raise_named(temperatures, *diagnose())
        raise


def _raise_named(temperatures: dict[str, torch.Tensor], inputs: Named, norms: Named) -> None:
    """Raise a ValueError naming the first bad input: a non-positive temperature, a non-finite
    output, norm or center, a negative norm; else say that the logits overflow."""
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
