"""``vmf-head check``: does vmf-head compute the right numbers on this machine, and how fast?

Prints the versions (vmf-head, torch, Triton, CUDA, device) and then, on the device at hand (the
first CUDA device, else the CPU):

* every op and loss module with ``backend="triton"`` against ``backend="reference"``, values and
  gradients (and the updated centers), in float32 and bfloat16, on small shapes: the normaliser
  (``log_vmf_normalizer`` exact and approx, its gradient, ``vmf_mean_resultant_length``,
  ``prototype_log_normalizer`` from a matrix and from norms, forward and backward), ``DINOvMFLoss``
  (probability and logit centering, with and without prototype norms), ``iBOTvMFLoss`` and
  ``functional.multicrop_cross_entropy`` with given targets. On CUDA these are the compiled
  kernels; on the CPU the same kernels run in Triton's interpreter (the command sets
  ``TRITON_INTERPRET=1`` for itself when there is no CUDA device). Without Triton this part is
  skipped and says why;
* the reference itself against independent formulas: log C_3 in closed form, and DINO's own loss
  (:func:`dino_loss`) on the vMF logits;
* on CUDA, every step of the above under ``torch.cuda.set_sync_debug_mode("error")`` (after one
  warm-up pass that compiles the kernels), so a host synchronisation is a failure;
* on CUDA, the time of one forward + backward of the fused ``DINOvMFLoss`` (probability centering,
  vMF correction) against ``torch.compile`` of :func:`dino_loss`, at B = 64, 2 + 8 crops,
  K = 65,536, float32. Skipped on the CPU: the kernels run there only in Triton's interpreter, which
  checks values but says nothing about speed, and compiling DINO's loss for the CPU alone takes
  about 20 s (``benchmarks/loss.py`` in the source tree times the CPU path).

``--json PATH`` writes all of it. The exit status is 1 when a check fails, with a message naming
the op, the quantity, the error against its tolerance, the device and what to do. When to run it:
README, "Check your installation".

Errors are ``max |got - want| / max |want|`` for losses, gradients and centers, and
``max |got - want| / max(1, |want|)`` elementwise for the normaliser (its accuracy bound's form);
the tolerances below say why they are what they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import DINOvMFLoss, __version__, _dispatch, iBOTvMFLoss, log_vmf_normalizer, prototype_log_normalizer
from . import vmf_mean_resultant_length as mean_resultant_length
from .functional import multicrop_cross_entropy

DTYPES = (torch.float32, torch.bfloat16)
P_VALUES = (3, 256, 4096)  # a closed-form order, DINO's bottleneck, and one with a large shift
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04

# Tolerances. The normaliser computes in float64 in both backends and rounds once to the result's
# dtype: float32 results agree to the library's float32 bound, 2e-6 of max(1, |value|) (measured:
# identical). bfloat16 results go float64 -> float32 -> bfloat16 in the kernel and float64 ->
# bfloat16 in the reference, so they may be one unit in the last place apart: 2^-7 relative.
NORMALIZER_TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7}
# prototype_log_normalizer from a matrix: the reference sums the squares in float32, the kernel in
# float64, so kappa differs by ~1e-7 relative and the value by A_p(kappa) kappa 1e-7 (docs/triton.md;
# up to 4e-6 of max(1, |value|) was seen at p = 4096). Its gradient: float32 rounding of the
# per-row factor (~1e-7); in bfloat16 the reference rounds the per-row factor and then the product,
# the kernel only the product: up to three half-units of 2^-7 apart.
PROTOTYPE_TOL = 1e-5
PROTOTYPE_GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6}
# The losses compute in float32 for float32 and bfloat16 logits, in both backends, in a different
# order (an online log-sum-exp over K blocks against torch's reductions): about 1e-6 relative
# (measured 6e-7); 2e-5 is the test suite's bound. A student gradient returned in bfloat16 is
# rounded from two float32 values that differ by that much: one unit in the last place, 2^-7.
LOSS_TOL = 2e-5
STUDENT_GRAD_TOL = {torch.float32: LOSS_TOL, torch.bfloat16: 2.0**-7}
# The reference in float64 against log C_3's closed form: the library's float64 bound.
CLOSED_FORM_TOL = 1e-12

# The timed shape: DINO's ViT-S/16 recipe per GPU (B = 64, 2 global + 8 local crops, K = 65,536).
TIMED_BATCH, TIMED_CROPS, TIMED_K, TIMED_P = 64, 10, 65536, 256

KERNEL_ADVICE = "pass backend='reference' and report this, with the file `vmf-head check --json PATH` writes"
REFERENCE_ADVICE = (
    "plain PyTorch computes it wrong with this torch build on this device: try another torch release, and "
    "report this with the file `vmf-head check --json PATH` writes"
)


def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    *,
    ncrops: int,
    student_temp: float = STUDENT_TEMP,
    teacher_temp: float = TEACHER_TEMP,
    center_momentum: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's multi-crop loss in DINO's own formulation (facebookresearch/dino's ``DINOLoss``, as a
    pure function): ``(loss, new center)``.

    ``q_i = softmax((teacher_i - center) / teacher_temp)`` for the 2 global views i, and the mean
    over the pairs i != j of ``mean_b -q_i . log_softmax(student_j / student_temp)``; the new center
    is ``center_momentum * center + (1 - center_momentum) * mean_b teacher``. Shapes: student
    ``(ncrops * B, K)``, teacher ``(2 * B, K)``, center ``(1, K)``. One log-softmax per pair: the
    formulation users compile, kept here as the timing peer and as an independent check.
    """
    student = (student_output / student_temp).chunk(ncrops)
    targets = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, pairs = 0.0, 0
    for i, q in enumerate(targets):
        for j, logits in enumerate(student):
            if i != j:
                total = total + torch.sum(-q * F.log_softmax(logits, dim=-1), dim=-1).mean()
                pairs += 1
    new_center = center * center_momentum + teacher_output.detach().mean(0, keepdim=True) * (1 - center_momentum)
    return total / pairs, new_center


# ----------------------------------------------------------------------------------------------
# Checks


def _relative_to_max(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN anywhere gives NaN, which fails every tolerance)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    return float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


def _relative_to_unit(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, |want|), elementwise (the normaliser's accuracy bound)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    return float(((got - want).abs() / want.abs().clamp_min(1.0)).max())


METRICS = {
    "max": ("max|got - want| / max|want|", _relative_to_max),
    "unit": ("max|got - want| / max(1, |want|)", _relative_to_unit),
}


@dataclass
class Quantity:
    """One compared output of a check: its error against its tolerance."""

    name: str
    error: float
    tolerance: float
    metric: str

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


@dataclass
class Result:
    name: str
    dtype: str
    against: str
    quantities: list[Quantity] = field(default_factory=list)
    error: str = ""  # the exception the check raised, if any

    @property
    def passed(self) -> bool:
        return not self.error and all(q.passed for q in self.quantities)

    def worst(self) -> Quantity | None:
        return max(self.quantities, key=lambda q: q.error / q.tolerance if q.passed else math.inf, default=None)

    def as_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "against": self.against, "passed": self.passed}
        out["quantities"] = [
            {"name": q.name, "max_error": q.error, "tolerance": q.tolerance, "metric": q.metric, "passed": q.passed}
            for q in self.quantities
        ]
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Setup:
    """Where the checks run. ``strict``: steps run under ``torch.cuda.set_sync_debug_mode("error")``."""

    device: torch.device
    strict: bool = False

    @contextmanager
    def step(self) -> Iterator[None]:
        """The scope of the computation under test (not of the set-up or the comparison)."""
        if not self.strict:
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def put(self, x: torch.Tensor, dtype: torch.dtype | None = None, grad: bool = False) -> torch.Tensor:
        """A fresh leaf copy of x on the device (set-up, outside the step)."""
        return x.to(device=self.device, dtype=dtype or x.dtype, copy=True).requires_grad_(grad)


@dataclass
class Check:
    """Compares ``run(setup, backend_or_role)`` for the two sides, output by output.

    ``tolerances`` maps an output name to (tolerance, metric key of ``METRICS``)."""

    name: str
    dtype: torch.dtype
    run: Callable[[Setup, str], dict[str, torch.Tensor]]
    tolerances: dict[str, tuple[float, str]]
    sides: tuple[str, str] = ("triton", "reference")
    advice: str = KERNEL_ADVICE

    @property
    def against(self) -> str:
        got, want = self.sides
        return f"backend={got!r} against backend={want!r}" if want == "reference" else f"{got} against {want}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kappa() -> torch.Tensor:
    """0 and 299 points log-uniform over [1e-3, 1e4] (float64): small and large kappa for every p."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 4, 299, dtype=torch.float64)])


def _normalizer_check(mode: str, dtype: torch.dtype) -> Check:
    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        out = {}
        for p in P_VALUES:
            kappa = setup.put(_kappa(), dtype, grad=True)
            with setup.step():
                value = log_vmf_normalizer(kappa, p, mode=mode, backend=backend)
                value.backward(torch.ones_like(value))
            out[f"value, p = {p}"], out[f"gradient, p = {p}"] = value, kappa.grad
        return out

    tol = (NORMALIZER_TOL[dtype], "unit")
    names = [f"{what}, p = {p}" for p in P_VALUES for what in ("value", "gradient")]
    return Check(f"log_vmf_normalizer(mode={mode!r})", dtype, run, dict.fromkeys(names, tol))


def _mean_resultant_length_check(dtype: torch.dtype) -> Check:
    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        out = {}
        for p in P_VALUES:
            kappa = setup.put(_kappa(), dtype)
            with setup.step():
                out[f"A_p, p = {p}"] = mean_resultant_length(kappa, p, backend=backend)
        return out

    names = [f"A_p, p = {p}" for p in P_VALUES]
    return Check("vmf_mean_resultant_length", dtype, run, dict.fromkeys(names, (NORMALIZER_TOL[dtype], "unit")))


def _prototype_weights(k: int, p: int) -> torch.Tensor:
    """K x p prototypes whose norms span 0.01 to 10 (kappa 0.1 to 100 at tau = 0.1), one zero row."""
    w = torch.randn(k, p, generator=_gen(1), dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * torch.logspace(-2, 1, k, dtype=torch.float64)[:, None]
    w[k // 3] = 0.0
    return w


def _prototype_check(dtype: torch.dtype, from_norms: bool) -> Check:
    k, p, tau = 96, 256, 0.07

    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        w = _prototype_weights(k, p)
        weight = setup.put(w.norm(dim=1) if from_norms else w, dtype, grad=True)
        grad = setup.put(torch.randn(k, generator=_gen(2)), torch.float32)
        with setup.step():
            value = prototype_log_normalizer(weight, tau, p, backend=backend)
            value.backward(grad)
        return {"value": value, "gradient": weight.grad}

    # From norms there is no sum of squares: both sides see the same kappa. The value is float32 in
    # both cases (the correction is never rounded to 16 bits).
    value_tol = NORMALIZER_TOL[torch.float32] if from_norms else PROTOTYPE_TOL
    tolerances = {"value": (value_tol, "unit"), "gradient": (PROTOTYPE_GRAD_TOL[dtype], "max")}
    return Check(f"prototype_log_normalizer({'norms' if from_norms else 'W'})", dtype, run, tolerances)


def _dino_inputs(k: int, batch: int, ncrops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher outputs (std 0.5) and prototype norms around 1 (kappa ~ 10 at tau_s)."""
    g = _gen(seed)
    student = 0.5 * torch.randn(ncrops * batch, k, generator=g)
    teacher = 0.5 * torch.randn(2 * batch, k, generator=g)
    return student, teacher, 1.0 + 0.2 * torch.rand(k, generator=g)


def _dino_module_check(dtype: torch.dtype, centering: str, norms: bool) -> Check:
    k, batch, ncrops = 300, 2, 4

    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        student, teacher, n = _dino_inputs(k, batch, ncrops, seed=3)
        loss_fn = DINOvMFLoss(k, ncrops, TEACHER_TEMP, 0.07, 2, 4, p=256, centering=centering, backend=backend)
        loss_fn = loss_fn.to(setup.device)
        s, t = setup.put(student, dtype, grad=True), setup.put(teacher, dtype)
        s_norms, t_norms = (setup.put(n, grad=True), setup.put(n)) if norms else (None, None)
        with setup.step():
            loss = loss_fn(s, t, 1, s_norms, t_norms)
            loss.backward()
        out = {"loss": loss, "gradient wrt student_output": s.grad, "center": loss_fn.center}
        if norms:
            out["gradient wrt student_norms"] = s_norms.grad
        return out

    tolerances = {
        "loss": (LOSS_TOL, "max"),
        "gradient wrt student_output": (STUDENT_GRAD_TOL[dtype], "max"),
        "center": (LOSS_TOL, "max"),
    }
    if norms:
        tolerances["gradient wrt student_norms"] = (LOSS_TOL, "max")
    what = "with prototype norms" if norms else "without norms (DINO)"
    return Check(f"DINOvMFLoss(centering={centering!r}) {what}", dtype, run, tolerances)


def _ibot_module_check(dtype: torch.dtype) -> Check:
    k, k2, batch, tokens = 64, 48, 2, 5

    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        g = _gen(4)
        cls_s, cls_t = torch.randn(3 * batch, k, generator=g), torch.randn(2 * batch, k, generator=g)
        patch_s = torch.randn(2 * batch, tokens, k2, generator=g)
        patch_t = torch.randn(2 * batch, tokens, k2, generator=g)
        masks = [torch.rand(batch, tokens, generator=g) < 0.5 for _ in range(2)]
        norms = (1 + 0.2 * torch.rand(k, generator=g), 1 + 0.2 * torch.rand(k2, generator=g))
        loss_fn = iBOTvMFLoss(k, k2, 2, 1, TEACHER_TEMP, 0.07, TEACHER_TEMP, 0.07, 2, 4, p=256, backend=backend)
        loss_fn = loss_fn.to(setup.device)
        s_cls, s_patch = setup.put(cls_s, dtype, grad=True), setup.put(patch_s, dtype, grad=True)
        s_norms = tuple(setup.put(n, grad=True) for n in norms)
        t_norms = tuple(setup.put(n) for n in norms)
        masks = [setup.put(m) for m in masks]
        t_cls, t_patch = setup.put(cls_t, dtype), setup.put(patch_t, dtype)
        with setup.step():
            losses = loss_fn(
                (s_cls[: 2 * batch], s_patch), (t_cls, t_patch), s_cls[2 * batch :], masks, 1, s_norms, t_norms
            )
            losses["loss"].backward()
        return {
            "loss (cls)": losses["cls"],
            "loss (patch)": losses["patch"],
            "gradient wrt the [CLS] outputs": s_cls.grad,
            "gradient wrt the patch outputs": s_patch.grad,
            "gradient wrt the [CLS] norms": s_norms[0].grad,
            "gradient wrt the patch norms": s_norms[1].grad,
            "center": loss_fn.center,
            "center2": loss_fn.center2,
        }

    grad = (STUDENT_GRAD_TOL[dtype], "max")
    tolerances = {name: (LOSS_TOL, "max") for name in ("loss (cls)", "loss (patch)", "center", "center2")}
    tolerances |= {"gradient wrt the [CLS] outputs": grad, "gradient wrt the patch outputs": grad}
    tolerances |= {"gradient wrt the [CLS] norms": (LOSS_TOL, "max"), "gradient wrt the patch norms": (LOSS_TOL, "max")}
    return Check("iBOTvMFLoss(centering='probability') with prototype norms", dtype, run, tolerances)


def _targets_check(dtype: torch.dtype, n_views: int, n_targets: int) -> Check:
    """DINOv2/DINOv3's path: given targets, DINO's pairing (several views) or row to row (one each)."""
    k, batch = 200, 3
    skip_same = n_views > 1

    def run(setup: Setup, backend: str) -> dict[str, torch.Tensor]:
        g = _gen(5)
        student = 0.5 * torch.randn(n_views * batch, k, generator=g)
        targets = torch.softmax(torch.randn(n_targets * batch, k, generator=g) / 0.3, dim=-1)
        correction = 340.0 + torch.randn(k, generator=g)  # log C_256 at kappa ~ 10 is about 340
        row_weight = torch.rand(batch, generator=g)
        s, corr = setup.put(student, dtype, grad=True), setup.put(correction, grad=True)
        # float32 targets, as the package's centerings return them: rounded to bfloat16, a row sums to
        # 1 +- 1e-3, and the reference's backward takes that sum as 1 where the kernels take it as it is
        q, w = setup.put(targets), setup.put(row_weight)
        with setup.step():
            loss = multicrop_cross_entropy(
                s,
                q,
                n_views=n_views,
                student_temp=STUDENT_TEMP,
                student_correction=corr,
                skip_same_view=skip_same,
                row_weight=w,
                backend=backend,
            )
            loss.backward()
        return {"loss": loss, "gradient wrt student_output": s.grad, "gradient wrt student_correction": corr.grad}

    tolerances = {
        "loss": (LOSS_TOL, "max"),
        "gradient wrt student_output": (STUDENT_GRAD_TOL[dtype], "max"),
        "gradient wrt student_correction": (LOSS_TOL, "max"),
    }
    name = f"functional.multicrop_cross_entropy(targets), {n_views} student x {n_targets} target views"
    return Check(name, dtype, run, tolerances)


def kernel_checks() -> list[Check]:
    """Every op and loss module, ``backend="triton"`` against ``backend="reference"``."""
    checks = []
    for dtype in DTYPES:
        checks += [_normalizer_check(mode, dtype) for mode in ("exact", "approx")]
        checks += [_mean_resultant_length_check(dtype)]
        checks += [_prototype_check(dtype, from_norms) for from_norms in (False, True)]
        checks += [_dino_module_check(dtype, centering, True) for centering in ("probability", "logit")]
        checks += [_dino_module_check(dtype, "logit", False), _ibot_module_check(dtype)]
        checks += [_targets_check(dtype, 4, 2), _targets_check(dtype, 1, 1)]
    return checks


def _closed_form_check() -> Check:
    """The reference against log C_3(kappa) = log(kappa / (4 pi sinh kappa)) and -A_3 = 1/kappa - coth kappa."""

    def run(setup: Setup, side: str) -> dict[str, torch.Tensor]:
        kappa = setup.put(torch.logspace(-3, 3, 300, dtype=torch.float64), grad=side == "reference")
        with setup.step():
            if side == "closed form":
                # log sinh k = k + log1p(-exp(-2k)) - log 2, without overflow
                log_sinh = kappa + torch.log1p(-torch.exp(-2 * kappa)) - math.log(2.0)
                value = torch.log(kappa) - math.log(4 * math.pi) - log_sinh
                return {"value": value, "gradient": 1 / kappa - 1 / torch.tanh(kappa)}
            value = log_vmf_normalizer(kappa, 3, backend="reference")
            value.backward(torch.ones_like(value))
        return {"value": value, "gradient": kappa.grad}

    tol = (CLOSED_FORM_TOL, "unit")
    return Check(
        "log_vmf_normalizer(p = 3) against kappa / (4 pi sinh kappa)",
        torch.float64,
        run,
        {"value": tol, "gradient": tol},
        sides=("reference", "closed form"),
        advice=REFERENCE_ADVICE,
    )


def _dino_formulation_check() -> Check:
    """``DINOvMFLoss(centering="logit", backend="reference")`` with norms against :func:`dino_loss`
    on the vMF logits: ``student + tau_s corr_s`` and ``teacher + tau_t corr_t`` give DINO's
    softmaxes of ``l_s = student / tau_s + corr_s`` and ``q = softmax((teacher - c) / tau_t + corr_t)``."""
    k, batch, ncrops, p = 300, 2, 4, 256

    def run(setup: Setup, side: str) -> dict[str, torch.Tensor]:
        student, teacher, n = _dino_inputs(k, batch, ncrops, seed=6)
        center = 0.1 * torch.randn(1, k, generator=_gen(7))
        s, t = setup.put(student, grad=True), setup.put(teacher)
        s_norms, t_norms, c = setup.put(n, grad=True), setup.put(n), setup.put(center)
        loss_fn = DINOvMFLoss(k, ncrops, TEACHER_TEMP, TEACHER_TEMP, 0, 1, p=p, centering="logit")
        loss_fn = loss_fn.to(setup.device)
        loss_fn.center.copy_(c)
        with setup.step():
            if side == "reference":
                loss = loss_fn(s, t, 0, s_norms, t_norms)
                new_center = loss_fn.center
            else:
                s_corr = prototype_log_normalizer(s_norms, STUDENT_TEMP, p, backend="reference")
                t_corr = prototype_log_normalizer(t_norms, TEACHER_TEMP, p, backend="reference")
                loss, _ = dino_loss(s + STUDENT_TEMP * s_corr, t + TEACHER_TEMP * t_corr, c, ncrops=ncrops)
                _, new_center = dino_loss(s.detach(), t, c, ncrops=ncrops)
            loss.backward()
        return {
            "loss": loss,
            "gradient wrt student_output": s.grad,
            "gradient wrt student_norms": s_norms.grad,
            "center": new_center,
        }

    return Check(
        "DINOvMFLoss(centering='logit', backend='reference') with prototype norms against DINO's loss",
        torch.float32,
        run,
        dict.fromkeys(
            ("loss", "gradient wrt student_output", "gradient wrt student_norms", "center"), (LOSS_TOL, "max")
        ),
        sides=("reference", "DINO's formulation"),
        advice=REFERENCE_ADVICE,
    )


def reference_checks() -> list[Check]:
    """The plain PyTorch path against independent formulas (runs wherever torch does)."""
    return [_closed_form_check(), _dino_formulation_check()]


def run_check(check: Check, device: torch.device, strict: bool) -> Result:
    """Both sides of ``check``; on CUDA (``strict``) a warm-up pass first (kernel compilation and the
    normaliser's constants upload once, which may synchronise), then the pass under sync checking."""
    result = Result(check.name, str(check.dtype).removeprefix("torch."), check.against)
    try:
        outputs = []
        for side in check.sides:
            if strict:
                check.run(Setup(device), side)
            outputs.append(check.run(Setup(device, strict), side))
        got, want = outputs
        for name, (tolerance, metric) in check.tolerances.items():
            label, fn = METRICS[metric]
            result.quantities.append(Quantity(name, fn(got[name], want[name]), tolerance, label))
    except Exception as exc:  # a kernel that fails to compile or run is a failed check, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return result


# ----------------------------------------------------------------------------------------------
# Timing (CUDA)


def time_fused_against_compiled_dino(device: torch.device, repeats: int = 10, warmup: int = 3) -> dict:
    """Medians of one forward + backward of the fused DINOvMFLoss (probability centering + vMF) and
    of ``torch.compile(dino_loss)`` at B = 64, 2 + 8 crops, K = 65,536, float32, round-robin, timed
    with CUDA events (under sync checking after the warm-up, which compiles)."""
    g = torch.Generator(device=device).manual_seed(0)
    student = 0.3 * torch.randn(TIMED_CROPS * TIMED_BATCH, TIMED_K, device=device, generator=g)
    teacher = 0.3 * torch.randn(2 * TIMED_BATCH, TIMED_K, device=device, generator=g)
    norms = 1.0 + 0.2 * torch.rand(TIMED_K, device=device, generator=g)
    center = torch.zeros(1, TIMED_K, device=device)
    fused_loss = DINOvMFLoss(TIMED_K, TIMED_CROPS, TEACHER_TEMP, 0.07, 30, 100, p=TIMED_P, backend="triton")
    fused_loss = fused_loss.to(device)
    compiled_dino = torch.compile(dino_loss)

    def fused() -> None:
        fused_loss(student.detach().requires_grad_(), teacher, 0, norms.detach().requires_grad_(), norms).backward()

    def dino() -> None:
        loss, new_center = compiled_dino(student.detach().requires_grad_(), teacher, center, ncrops=TIMED_CROPS)
        loss.backward()
        center.copy_(new_center)

    steps = {"fused DINOvMFLoss (probability + vMF)": fused, "torch.compile(DINO's loss)": dino}
    for _ in range(warmup):
        for step in steps.values():
            step()
    torch.cuda.synchronize(device)
    events = {name: [] for name in steps}
    with Setup(device, strict=True).step():
        for _ in range(repeats):
            for name, step in steps.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events[name].append((start, end))
    torch.cuda.synchronize(device)
    ms = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}
    fused_ms, dino_ms = (statistics.median(ms[name]) for name in steps)
    return {
        "shape": {"batch": TIMED_BATCH, "crops": TIMED_CROPS, "K": TIMED_K, "p": TIMED_P, "dtype": "float32"},
        "repeats": repeats,
        "median_ms": {"fused DINOvMFLoss (probability + vMF)": fused_ms, "torch.compile(DINO's loss)": dino_ms},
        "times_ms": ms,
        "fused_over_compiled_dino": fused_ms / dino_ms,
    }


# ----------------------------------------------------------------------------------------------
# Command


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    except Exception as exc:  # an installed Triton that fails to import
        return f"broken ({type(exc).__name__}: {exc})"
    return triton.__version__


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "vmf_head": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "rocm": torch.version.hip,
        "python": platform.python_version(),
        "device": name,
    }


def _accelerator(env: dict) -> str:
    if env["cuda"]:
        return f"CUDA {env['cuda']}"
    return f"ROCm {env['rocm']}" if env["rocm"] else "CUDA: none (a CPU build of torch)"


def kernel_status(device: torch.device) -> tuple[bool, str]:
    """(whether the Triton kernels of every op can run on ``device``, how or why not)."""
    ops = ("log_normalizer", "cross_entropy")
    reasons = sorted({why for why in (_dispatch.problem(op, device) for op in ops) if why})
    if reasons:
        return False, "; ".join(reasons)
    if device.type == "cpu":
        return True, "in Triton's interpreter on CPU tensors (no CUDA device here), on tiny shapes"
    if any(_dispatch.kernels(op).INTERPRETED for op in ops):
        return True, "in Triton's interpreter (TRITON_INTERPRET=1 is set: unset it to check the compiled kernels)"
    return True, "compiled for this GPU"


def _failure_message(check: Check, result: Result, device_name: str) -> str:
    """One line per failed check: what, by how much against what, where, and what to do."""
    where = f"{result.name}, {result.dtype}"
    if result.error:
        return f"{where}: backend={check.sides[0]!r} raised {result.error} on {device_name}: {check.advice}"
    worst = result.worst()
    others = [q.name for q in result.quantities if not q.passed and q is not worst]
    also = f"; also {', '.join(others)}" if others else ""
    want = "the reference" if check.sides[1] == "reference" else check.sides[1]
    return (
        f"{where}: {worst.name} differs from {want} by {worst.error:.1e} (tolerance {worst.tolerance:.1e}{also}) "
        f"on {device_name}: {check.advice}"
    )


def _row(result: Result) -> str:
    """One line: status, dtype, what, and its worst quantity (or the exception)."""
    status = "ok" if result.passed else "FAILED"
    worst = result.worst()
    detail = result.error or f"{worst.error:.1e} (tolerance {worst.tolerance:.1e}, {worst.name})"
    return f"  {status:<6} {result.dtype:<8} {result.name}: {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmf-head check",
        description="Check vmf-head on this machine: its Triton kernels against the reference (values and "
        "gradients, float32 and bfloat16), the reference against independent formulas, no host sync on "
        "CUDA, and the fused loss's time against torch.compile of DINO's loss on CUDA.",
    )
    parser.add_argument("--json", metavar="PATH", help="write versions, every check and the timing as JSON")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing on CUDA (it compiles DINO's loss)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        # Triton reads this when a kernel module is imported (vmf_head._dispatch imports on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment(device)
    print(
        f"vmf-head {env['vmf_head']} | torch {env['torch']} | Triton {env['triton']} | "
        f"{_accelerator(env)} | Python {env['python']} | device: {env['device']}"
    )
    kernels_run, how = kernel_status(device)
    print(f"Triton kernels: {'checked ' + how if kernels_run else 'not checked: ' + how}")
    print(
        "host syncs: every checked step runs under torch.cuda.set_sync_debug_mode('error')"
        if cuda
        else "host syncs: not checked (torch.cuda.set_sync_debug_mode needs CUDA)"
    )

    groups = {"the reference against independent formulas (worst error):": reference_checks()}
    if kernels_run:
        groups["backend='triton' against backend='reference' (worst error):"] = kernel_checks()
    results: list[tuple[Check, Result]] = []
    for title, checks in groups.items():
        print(title)
        for check in checks:
            result = run_check(check, device, strict=cuda)
            print(_row(result), flush=True)
            results.append((check, result))
    notes = [
        "centering='sinkhorn' (DINOvMFLoss, iBOTvMFLoss) is not compared: it has no fused kernel (each Sinkhorn "
        "iteration needs whole-batch column sums), and backend='auto' runs the reference for it"
    ]
    if not kernels_run:
        notes.append(f"the Triton kernels were not checked ({how}); backend='auto' runs the reference here")
    for note in notes:
        print(f"  note: {note}")

    if not cuda:
        timing = {
            "skipped": "on the CPU: the kernels run there only in Triton's interpreter (values, not speed), and "
            "compiling DINO's loss for the CPU takes about 20 s; benchmarks/loss.py times the CPU path"
        }
        print(f"timing: skipped {timing['skipped']}")
    elif args.no_timing:
        timing = {"skipped": "--no-timing"}
        print("timing: skipped (--no-timing)")
    elif not kernels_run:
        timing = {"skipped": f"the fused kernels cannot run: {how}"}
        print(f"timing: skipped: {timing['skipped']}")
    else:
        try:
            timing = time_fused_against_compiled_dino(device)
        except Exception as exc:  # the timing informs; the checks above decide the exit status
            timing = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"timing: failed: {timing['error']}")
        else:
            (fused_name, fused_ms), (dino_name, dino_ms) = timing["median_ms"].items()
            print(
                f"timing (B = {TIMED_BATCH}, 2 + {TIMED_CROPS - 2} crops, K = {TIMED_K}, float32, forward + backward, "
                f"median of {timing['repeats']}): {fused_name} {fused_ms:.3f} ms, {dino_name} {dino_ms:.3f} ms: "
                f"ratio {timing['fused_over_compiled_dino']:.2f} (below 1: the fused loss is faster)"
            )

    failed = [(c, r) for c, r in results if not r.passed]
    seconds = time.perf_counter() - start
    if args.json:
        report = {
            "environment": env,
            "kernels": {"checked": kernels_run, "how": how},
            "sync_debug_mode_error": cuda,
            "checks": [r.as_json() for _, r in results],
            "notes": notes,
            "timing": timing,
            "passed": not failed,
            "seconds": seconds,
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if failed:
        print(f"\nvmf-head check FAILED: {len(failed)} of {len(results)} checks on {env['device']}", file=sys.stderr)
        for check, result in failed:
            print(_failure_message(check, result, env["device"]), file=sys.stderr)
        return 1
    print(f"vmf-head check: all {len(results)} checks passed on {env['device']} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
