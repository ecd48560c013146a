"""A collapse monitor: follows the teacher's probabilities during training and says when they collapse.

DINO-family training fails in three ways that the loss curve shows late or ambiguously (docs/collapse.md
has the measurements and the reasons for every threshold below; K prototypes, ``log K`` nats the entropy
of the uniform distribution over them):

- **uniform**: every teacher target is (nearly) uniform, the loss sits at ``log K`` and nothing is
  learnt. Judged by the mean per-sample entropy ``mean_n H(q_n)`` >= ``uniform_entropy`` x log K
  (0.99: each target spread over at least K^0.99 prototypes).
- **one-hot**: the whole batch goes to (nearly) one prototype, the loss falls towards 0. Judged by the
  entropy of the batch-mean target ``H(mean_n q_n)`` <= ``one_hot_entropy`` x log K (0.1: the batch
  uses at most K^0.1 prototypes, 3 of 65536, 2 of 1024).
- **partial**: the mixture shrinks to a fraction of its prototypes: ``H(mean_n q_n)`` <=
  ``partial_entropy`` x log K (0.5: fewer than sqrt(K) effective clusters), or, when the prototypes are
  given, fewer than ``partial_distinct`` x K (0.5: most prototypes are near-duplicates of others)
  distinct directions at cosine > ``duplicate_cosine`` (0.99, 8.1 degrees): the partial prototype
  collapse of Govindarajan et al. (BMVC 2024, arXiv 2410.14060).

Between checks the monitor only adds to O(K) accumulators on the device (the sum of the probabilities,
the argmax counts, the summed per-sample entropy), so nothing is read to the host and a GPU step is not
synchronised; every ``every`` steps it reads them once, judges the steps since the previous check, and
starts again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._validation import check_int, check_real, check_tensor
from .prototypes import count_distinct_prototypes

__all__ = ["STATUSES", "CollapseMonitor", "CollapseReport", "CollapseWarning"]

STATUSES = ("ok", "uniform", "one-hot", "partial")

# What usually cures each collapse, for the warning (docs/collapse.md says why).
_CURES = {
    "uniform": (
        "A near-uniform teacher is normal in the first checks of a run (the loss starts near log K); it is a "
        "collapse when it persists. Usual cures: sharpen the teacher (a lower teacher temperature or a shorter "
        "temperature warm-up: centering alone pushes the targets towards uniform), and a lower learning rate "
        "or a longer learning-rate warm-up (too large steps end here)."
    ),
    "one-hot": (
        "Usual cures: a higher teacher temperature (sharpening alone pushes every target onto one prototype), "
        "stronger centering (logit centering or Sinkhorn-Knopp: probability centering adds at most -log c_k to a "
        "logit, which a very sharp teacher outgrows), and a lower learning rate."
    ),
    # Partial, by the mass on few prototypes: on its way to one-hot, or stuck a few prototypes short of it.
    "few": (
        "Usual cures: as for a one-hot collapse, a higher teacher temperature, stronger centering and a lower "
        "learning rate."
    ),
    # Partial, by near-duplicate prototypes.
    "duplicates": (
        "Usual cures: KoLeo on the prototypes (koleo_weight, e.g. 0.1: vmf_head.nn.KoLeoPrototypeLoss) keeps "
        "them apart; probability centering keeps more of them in use than logit centering; a lower learning "
        "rate; and fewer prototypes if most are never used."
    ),
}


class CollapseWarning(UserWarning):
    """A check of :class:`CollapseMonitor` found the teacher collapsed: uniform, one-hot or partial."""


@dataclass(frozen=True)
class CollapseReport:
    """What one check of :class:`CollapseMonitor` saw, over the teacher rows given since the previous check.

    Entropies are in nats; ``log_k`` is the largest possible (uniform over K). Fields that need an input
    the check did not get (``prototypes=``, ``kappa=``) are None.

    Attributes:
        step: the number of ``step()`` calls so far, this one included.
        status: one of :data:`STATUSES`; ``warnings``: one message per collapse found (empty when "ok").
        samples: teacher rows judged; num_prototypes: K.
        batch_mean_entropy: ``H(pbar)``, ``pbar = mean_n q_n``; mean_sample_entropy: ``mean_n H(q_n)``.
        effective_clusters: ``exp(H(pbar))``, in [1, K]; largest_share: ``max_k pbar_k``.
        prototypes_used: prototypes that are the argmax of at least one row.
        distinct_prototypes: directions left after merging chains of pairs at cosine > the threshold,
            whose angle ``duplicate_degrees`` is stated with it.
        kappa_min, kappa_median, kappa_max, kappa_p95_p5: the spread of the given ``kappa``.
        streak: consecutive checks with this status, this one included (a collapse that persists is
            one; a near-uniform teacher in the first checks of a run often is not).
    """

    step: int
    status: str
    warnings: tuple[str, ...]
    samples: int
    num_prototypes: int
    log_k: float
    batch_mean_entropy: float
    mean_sample_entropy: float
    effective_clusters: float
    largest_share: float
    prototypes_used: int
    streak: int = 1
    distinct_prototypes: int | None = None
    duplicate_degrees: float | None = None
    kappa_min: float | None = None
    kappa_median: float | None = None
    kappa_max: float | None = None
    kappa_p95_p5: float | None = None

    @property
    def batch_mean_entropy_ratio(self) -> float:
        """``H(pbar) / log K`` in [0, 1]."""
        return self.batch_mean_entropy / self.log_k

    @property
    def mean_sample_entropy_ratio(self) -> float:
        """``mean_n H(q_n) / log K`` in [0, 1]."""
        return self.mean_sample_entropy / self.log_k

    def scalars(self) -> dict[str, float]:
        """Every figure as a float (the status as its index in :data:`STATUSES`), for a logger such as
        ``SummaryWriter.add_scalar``; figures the check could not compute are left out."""
        out = {"status": float(STATUSES.index(self.status))}
        for key, value in asdict(self).items():
            if key not in ("step", "status", "warnings") and value is not None:
                out[key] = float(value)
        out["batch_mean_entropy_ratio"] = self.batch_mean_entropy_ratio
        out["mean_sample_entropy_ratio"] = self.mean_sample_entropy_ratio
        return out

    def as_dict(self) -> dict:
        """Everything, JSON-ready: the step, the status, the warnings and :meth:`scalars`' figures."""
        figures = self.scalars()
        figures.pop("status")
        return {"step": self.step, "status": self.status, "warnings": list(self.warnings), **figures}


class CollapseMonitor:
    """Judges the teacher's probabilities every ``every`` steps: "ok", "uniform", "one-hot" or "partial".

    Call :meth:`step` once per training step with the teacher's probabilities (the targets the student
    is trained towards, after centering and sharpening). Between checks it only accumulates on the
    device (no host sync; O(K) memory); on every ``every``-th call it reads the accumulators, returns a
    :class:`CollapseReport` of the steps since the previous check, passes it to ``log``, and emits a
    :class:`CollapseWarning` per collapse found, with what usually cures it. The statuses and their
    thresholds are in this module's docstring; docs/collapse.md explains them.

    Args:
        every: steps per check (>= 1). The first check is the ``every``-th call.
        log: called with each report, e.g. ``lambda r: [writer.add_scalar(f"collapse/{k}", v, r.step)
            for k, v in r.scalars().items()]``, or ``print``.
        warn: emit :class:`CollapseWarning` (the report's ``warnings`` are filled either way).
        uniform_entropy: status "uniform" when ``mean_n H(q_n) >= uniform_entropy * log K``.
        one_hot_entropy: status "one-hot" when ``H(pbar) <= one_hot_entropy * log K``.
        partial_entropy: status "partial" when ``H(pbar) <= partial_entropy * log K``, or ...
        partial_distinct: ... when fewer than ``partial_distinct * K`` prototypes are distinct.
        duplicate_cosine: two prototypes whose cosine exceeds it are near-duplicates (0.99: 8.1 degrees).

    Example::

        monitor = CollapseMonitor(every=100, log=print)
        for step in ...:
            loss = dino_loss(student_out, teacher_out, epoch)
            q = torch.softmax((teacher_out - dino_loss.center) / tau_t, dim=-1)  # DINO's targets
            monitor.step(q, prototypes=student_head)  # None, or every 100 steps a CollapseReport
    """

    def __init__(
        self,
        every: int = 100,
        *,
        log: Callable[[CollapseReport], object] | None = None,
        warn: bool = True,
        uniform_entropy: float = 0.99,
        one_hot_entropy: float = 0.1,
        partial_entropy: float = 0.5,
        partial_distinct: float = 0.5,
        duplicate_cosine: float = 0.99,
    ) -> None:
        self.every = check_int("every", every, minimum=1)
        if log is not None and not callable(log):
            raise TypeError(f"log must be a callable taking a CollapseReport, got {type(log).__name__}")
        self.log = log
        self.warn = bool(warn)
        self.uniform_entropy = check_real("uniform_entropy", uniform_entropy, low=0.0, high=1.0)
        self.one_hot_entropy = check_real("one_hot_entropy", one_hot_entropy, low=0.0, high=1.0)
        self.partial_entropy = check_real("partial_entropy", partial_entropy, low=0.0, high=1.0)
        if not self.one_hot_entropy <= self.partial_entropy < self.uniform_entropy:
            raise ValueError(
                "need one_hot_entropy <= partial_entropy < uniform_entropy, got "
                f"{self.one_hot_entropy}, {self.partial_entropy}, {self.uniform_entropy}"
            )
        self.partial_distinct = check_real("partial_distinct", partial_distinct, low=0.0, high=1.0)
        self.duplicate_cosine = check_real("duplicate_cosine", duplicate_cosine, low=-1.0, high=1.0)
        if not -1.0 < self.duplicate_cosine < 1.0:
            raise ValueError(f"duplicate_cosine must be a number in (-1, 1), got {duplicate_cosine!r}")
        self.steps = 0
        self._last_status: str | None = None
        self._streak = 0
        self._num_prototypes: int | None = None
        self._samples = 0
        self._state: dict[str, torch.Tensor] = {}

    @property
    def due(self) -> bool:
        """Whether the next :meth:`step` call checks (and so needs the teacher's probabilities)."""
        return (self.steps + 1) % self.every == 0

    def step(
        self,
        teacher_probs: torch.Tensor | None = None,
        *,
        prototypes: torch.Tensor | nn.Module | None = None,
        kappa: torch.Tensor | None = None,
    ) -> CollapseReport | None:
        """Count one training step, add its teacher probabilities, and check when :attr:`due`.

        Args:
            teacher_probs: (N, K) probabilities of the teacher's targets of this step (rows sum to 1; any
                float dtype, any device; not differentiated), or None on a step whose probabilities are not
                at hand (a fused loss that materialises them only when ``monitor.due``). A check needs
                probabilities from at least one step since the previous check.
            prototypes: (K, p) prototypes, or the prototype layer or head holding them (see
                :func:`vmf_head.functional.prototype_directions`), for the distinct-prototype count. Read
                only on check steps (an O(K^2 p) search: pass it on some checks only if that is too slow).
            kappa: (K,) concentrations ``||w_k|| / tau``, for their spread; read only on check steps.

        Returns:
            None, or on a check step the :class:`CollapseReport` of the steps since the previous check.
        """
        checking = self.due
        if teacher_probs is not None:
            self._accumulate(teacher_probs)
        self.steps += 1
        if not checking:
            return None
        if self._samples == 0:
            raise ValueError(
                f"step {self.steps} is a check (every={self.every}) but no teacher_probs were given since the "
                "previous check: pass them at least when monitor.due is True"
            )
        report = self._report(prototypes, kappa)
        self._samples, self._state = 0, {}
        if self.log is not None:
            self.log(report)
        if self.warn:
            for message in report.warnings:
                warnings.warn(message, CollapseWarning, stacklevel=2)
        return report

    def _accumulate(self, teacher_probs: object) -> None:
        probs = check_tensor("teacher_probs", teacher_probs, dims=2, shape="(N, K) of probabilities").detach()
        n, k = probs.shape
        if k < 2:
            raise ValueError(f"teacher_probs must have K >= 2 columns (prototypes), got shape {tuple(probs.shape)}")
        if self._num_prototypes is not None and k != self._num_prototypes:
            raise ValueError(f"teacher_probs has K={k} columns, but earlier steps had K={self._num_prototypes}")
        self._num_prototypes = k
        if n == 0:
            return
        q = probs.to(torch.promote_types(probs.dtype, torch.float32))
        if not self._state:
            self._state = {
                "sum": torch.zeros(k, dtype=q.dtype, device=q.device),
                "count": torch.zeros(k, dtype=torch.long, device=q.device),
                "entropy": torch.zeros((), dtype=q.dtype, device=q.device),
                "min": torch.full((), math.inf, dtype=q.dtype, device=q.device),
            }
        state = self._state
        state["sum"] += q.sum(dim=0).to(state["sum"].device, state["sum"].dtype)
        winners = q.argmax(dim=1).to(state["count"].device)
        state["count"].index_add_(0, winners, torch.ones_like(winners))
        state["entropy"] += -torch.special.xlogy(q, q).sum().to(state["entropy"].device, state["entropy"].dtype)
        state["min"] = torch.minimum(state["min"], q.min().to(state["min"].device, state["min"].dtype))
        self._samples += n

    def _report(self, prototypes: torch.Tensor | nn.Module | None, kappa: torch.Tensor | None) -> CollapseReport:
        k, n = self._num_prototypes, self._samples
        state = {name: t.cpu() for name, t in self._state.items()}
        total = state["sum"].double()
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"teacher_probs had non-finite values (inf or NaN) in the steps before step {self.steps}")
        if float(state["min"]) < 0 or abs(float(total.sum()) / n - 1) > 1e-3:
            raise ValueError(
                "teacher_probs must be probabilities (non-negative rows summing to 1, e.g. a softmax), got "
                f"a minimum of {float(state['min']):.3g} and rows summing to {float(total.sum()) / n:.6g} on average "
                f"in the steps before step {self.steps}"
            )
        pbar = total / total.sum()
        batch_entropy = float(-torch.special.xlogy(pbar, pbar).sum())
        figures = {
            "step": self.steps,
            "samples": n,
            "num_prototypes": k,
            "log_k": math.log(k),
            "batch_mean_entropy": batch_entropy,
            "mean_sample_entropy": float(state["entropy"]) / n,
            "effective_clusters": math.exp(batch_entropy),
            "largest_share": float(pbar.max()),
            "prototypes_used": int((state["count"] > 0).sum()),
        }
        if prototypes is not None:
            figures.update(self._distinct(prototypes, k))
        if kappa is not None:
            figures.update(_kappa_spread(kappa, k))
        status, what, cures = self._judge(figures)
        self._streak = self._streak + 1 if status == self._last_status else 1
        self._last_status = status
        messages = ()
        if status != "ok":
            since = self.steps - (self._streak - 1) * self.every
            persisting = f" It has been {status} at every check since step {since}." if self._streak > 1 else ""
            messages = (" ".join([f"{status} collapse at {what}{persisting}", *(_CURES[c] for c in cures)]),)
        return CollapseReport(status=status, warnings=messages, streak=self._streak, **figures)

    def _distinct(self, prototypes: torch.Tensor | nn.Module, k: int) -> dict:
        from ..functional.koleo import prototype_directions

        w = prototype_directions(prototypes).detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w  # a layer sharded by FSDP2
        w = check_tensor("prototypes", w, dims=2, shape="(K, p)")
        if w.shape[0] != k:
            raise ValueError(f"prototypes has {w.shape[0]} rows but teacher_probs has K={k} columns")
        return {
            "distinct_prototypes": count_distinct_prototypes(w, self.duplicate_cosine),
            "duplicate_degrees": math.degrees(math.acos(self.duplicate_cosine)),
        }

    def _judge(self, f: dict) -> tuple[str, str, tuple[str, ...]]:
        """The status of the figures ``f`` and, for a collapse, what was seen (where and by which figure)
        and the keys of its cures."""
        k, log_k = f["num_prototypes"], f["log_k"]
        sample_ratio, batch_ratio = f["mean_sample_entropy"] / log_k, f["batch_mean_entropy"] / log_k
        where = f"step {f['step']} ({f['samples']} teacher rows since the previous check, K = {k})"
        if sample_ratio >= self.uniform_entropy:
            return (
                "uniform",
                (
                    f"{where}: the teacher's targets are near uniform, mean per-sample entropy "
                    f"{f['mean_sample_entropy']:.4g} = {sample_ratio:.2%} of log K = {log_k:.4g} (threshold "
                    f"{self.uniform_entropy:.0%}), so the loss sits at log K or above and the student is taught "
                    "nothing."
                ),
                ("uniform",),
            )
        if batch_ratio <= self.one_hot_entropy:
            return (
                "one-hot",
                (
                    f"{where}: the whole batch goes to the same few prototypes, effective clusters "
                    f"{f['effective_clusters']:.3g} (batch-mean entropy {batch_ratio:.2%} of log K, threshold "
                    f"{self.one_hot_entropy:.0%}), the largest prototype takes {f['largest_share']:.1%} of the mass; "
                    "the loss falls towards 0 while the features stop carrying information."
                ),
                ("one-hot",),
            )
        reasons, cures = [], []
        if batch_ratio <= self.partial_entropy:
            cures.append("few")
            reasons.append(
                f"the teacher spreads its mass over only {f['effective_clusters']:.4g} effective clusters "
                f"(batch-mean entropy {batch_ratio:.2%} of log K, threshold {self.partial_entropy:.0%}); "
                f"{f['prototypes_used']} prototypes are some row's argmax"
            )
        distinct = f.get("distinct_prototypes")
        if distinct is not None and distinct < self.partial_distinct * k:
            cures.append("duplicates")
            reasons.append(
                f"only {distinct} of the {k} prototypes are distinct directions (the others within "
                f"{f['duplicate_degrees']:.1f} degrees of one, threshold {self.partial_distinct:.0%} of K)"
            )
        if reasons:
            return "partial", f"{where}: {'; '.join(reasons)}.", tuple(cures)
        return "ok", "", ()


def _kappa_spread(kappa: object, k: int) -> dict[str, float | None]:
    kappa = check_tensor("kappa", kappa, dims=1, shape="(K,) of concentrations ||w_k|| / tau").detach()
    if kappa.shape[0] != k:
        raise ValueError(f"kappa has {kappa.shape[0]} entries but teacher_probs has K={k} columns")
    values = kappa.double().cpu()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("kappa must be finite and non-negative (kappa_k = ||w_k|| / tau)")
    p5, p50, p95 = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {
        "kappa_min": float(values.min()),
        "kappa_median": p50,
        "kappa_max": float(values.max()),
        "kappa_p95_p5": p95 / p5 if p5 > 0 else None,
    }
