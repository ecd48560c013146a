"""One self-supervised run of the demo: DINO's training loop at toy scale, with the library's head
and loss, logging the diagnostics of ``vmf_head.diagnostics`` and the reports of its
``CollapseMonitor`` as it goes, optionally with KoLeo on the student's prototypes (``koleo_weight``).

The three methods differ only in the head's ``norm_last_layer``, whether the vMF correction
``log C_p(||w_k|| / tau)`` enters the logits, and the teacher centering (SPEC sections 2-3):

================  ===============  ==============  ===========
method            prototype norms  vMF correction  centering
================  ===============  ==============  ===========
``dino``          fixed at 1       no              logit
``dino-free``     learned          no              logit
``dino-vmf``      learned          yes             probability
================  ===============  ==============  ===========

Everything else (seed, data order, augmentations, initial weights, schedules) is identical, so
the runs are paired comparisons.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import diagnostics
from ..functional.koleo import koleo_prototype_loss
from ..normalizer import log_vmf_normalizer
from .data import Dataset, MultiCrop
from .evaluate import extract_features, knn_accuracy, knn_predict, linear_probe_accuracy
from .models import MultiCropNet, SmallConvNet


@dataclass(frozen=True)
class Method:
    """One cell of the design: prototype norms fixed (``norm_last_layer``) or learned, the vMF
    correction on or off, the teacher centering, and the normaliser's ``mode`` when it is on."""

    name: str
    label: str
    norm_last_layer: bool
    vmf: bool
    centering: str
    mode: str = "exact"


METHODS = {
    m.name: m
    for m in (
        Method("dino", "DINO", norm_last_layer=True, vmf=False, centering="logit"),
        Method("dino-free", "DINO, free norms", norm_last_layer=False, vmf=False, centering="logit"),
        Method("dino-vmf", "DINO-vMF", norm_last_layer=False, vmf=True, centering="probability"),
    )
}


@dataclass
class TrainConfig:
    """Budget and hyper-parameters of one run (the CLI's options; see ``vmf-head demo --help``)."""

    epochs: int = 60
    batch_size: int = 64
    n_local: int = 4
    out_dim: int = 1024  # K, number of prototypes
    bottleneck_dim: int = 64  # p, dimension of the sphere's ambient space
    hidden_dim: int = 256
    width: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    warmup_epochs: int = 2
    momentum_teacher: float = 0.99
    # DINO's code default (0.04, no warm-up). Tried here (docs/demo.md): 0.02 collapses DINO-vMF
    # onto near one-hot assignments (probability centering cannot lift logit gaps of ~2/0.02).
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    freeze_last_layer: int = 1
    clip_grad: float = 3.0
    # KoLeo on the student's prototype directions (Govindarajan et al., BMVC 2024), times this, added to
    # the loss; 0: off.
    koleo_weight: float = 0.0
    # vmf_head.diagnostics.CollapseMonitor checks the teacher's targets every this many steps.
    monitor_every: int = 10
    train_images: int = 0  # self-supervise on the first this many training images; 0: all
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.15, 0.4)
    log_every: int = 10
    eval_every: int = 3
    knn_k: int = 20
    knn_temperature: float = 0.07
    device: str = "cpu"


def cosine_schedule(start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> list[float]:
    """DINO's per-iteration schedule: linear warm-up from ``warmup_start`` to ``start`` over
    ``warmup`` steps, then a half cosine from ``start`` to ``end`` over the remaining steps."""
    warmup = min(warmup, total)
    values = [warmup_start + (start - warmup_start) * i / warmup for i in range(warmup)]
    rest = total - warmup
    values += [end + 0.5 * (start - end) * (1 + math.cos(math.pi * i / max(rest, 1))) for i in range(rest)]
    return values


def _param_groups(model: nn.Module) -> list[dict]:
    # As DINO: no weight decay on biases and normalisation parameters.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def teacher_logits(
    raw: torch.Tensor, norms: torch.Tensor, tau: float, method: Method, p: int, center: torch.Tensor | None
) -> torch.Tensor:
    """The centred teacher logits (N, K) at temperature ``tau``, whose softmax is the target ``q``
    the student is trained towards (SPEC section 3): ``(w^T y - c) / tau`` for logit centering,
    ``w^T y / tau + log C_p(||w_k|| / tau) - log c`` for DINO-vMF's probability centering, plus
    the vMF correction when the method has it. ``center=None``: the uncentred mixture posterior
    logits ``w^T y / tau (+ log C_p(||w_k|| / tau))``, whose argmax is the image's component."""
    logits = raw.float() / tau
    if center is not None:
        logits = logits - (center / tau if method.centering == "logit" else torch.log(center))
    if method.vmf:
        logits = logits + log_vmf_normalizer(norms.float() / tau, p, mode=method.mode)
    return logits


def _evaluate_backbone(
    backbone: nn.Module, data: Dataset, aug: MultiCrop, cfg: TrainConfig, probe: bool, per_image: bool = False
) -> dict:
    """``knn`` (and with ``probe`` ``linear``) held-out accuracy of the frozen backbone; with
    ``per_image`` also ``knn_correct``, one bool per held-out image (for the norm analysis)."""
    device = torch.device(cfg.device)
    train_f = extract_features(backbone, aug.plain(data.train_images.to(device)))
    test_f = extract_features(backbone, aug.plain(data.test_images.to(device)))
    n_classes = len(data.class_names)
    pred = knn_predict(train_f, data.train_labels, test_f, cfg.knn_k, cfg.knn_temperature, n_classes)
    correct = pred == data.test_labels
    out: dict = {"knn": float(correct.float().mean())}
    if probe:
        out["linear"] = linear_probe_accuracy(train_f, data.train_labels, test_f, data.test_labels)
    if per_image:
        out["knn_correct"] = correct.tolist()
    return out


def _make_augmentation(data: Dataset, cfg: TrainConfig) -> MultiCrop:
    mean = data.train_images.mean(dim=(0, 2, 3))
    std = data.train_images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return MultiCrop(
        data.global_size,
        data.local_size,
        cfg.n_local,
        mean=mean,
        std=std,
        flip=data.flip,
        global_scale=cfg.global_scale,
        local_scale=cfg.local_scale,
    )


def evaluate_random_init(data: Dataset, cfg: TrainConfig, seed: int) -> dict:
    """k-NN and linear-probe accuracy of the untrained backbone (same seed and initialisation as
    the trained runs): the floor that self-supervision has to beat."""
    torch.manual_seed(seed)
    backbone = SmallConvNet(data.channels, cfg.width).to(cfg.device)
    return _evaluate_backbone(backbone, data, _make_augmentation(data, cfg), cfg, probe=True)


def evaluate_pixels(data: Dataset) -> dict:
    """k-NN and linear-probe accuracy of the raw pixels (no network): how far a plain distance
    on the images gets on this data set."""
    train_x, test_x = data.train_images.flatten(1), data.test_images.flatten(1)
    return {
        "knn": knn_accuracy(train_x, data.train_labels, test_x, data.test_labels),
        "linear": linear_probe_accuracy(train_x, data.train_labels, test_x, data.test_labels),
    }


def train_one(method: Method, data: Dataset, cfg: TrainConfig, seed: int, progress: bool = True) -> dict:
    """Train one model and evaluate its teacher backbone.

    Returns a JSON-ready dict: ``method``, ``seed``, ``knn`` and ``linear`` (test accuracies in
    [0, 1]), ``diverged`` (a non-finite loss stopped the run), ``seconds`` (wall) and ``cpu_seconds``, the final
    ``diagnostics`` on the whole training split, the final teacher ``kappa`` of every prototype,
    ``prototype_koleo`` (KoLeo of the teacher's prototype directions: lower is more spread out),
    ``heldout`` (per held-out image: its assigned prototype, that prototype's norm, whether
    k-NN classified it correctly), and ``history`` (per-step ``loss``, the DINO loss without the
    KoLeo term, and with ``koleo_weight`` > 0 per-step ``koleo``; per-``log_every`` step
    diagnostics; per-``monitor_every`` step ``monitor`` reports, ``CollapseReport.as_dict()`` of
    the teacher's targets; per-``eval_every`` epoch k-NN accuracy).
    """
    from vmf_head import DINOvMFLoss, VMFPrototypeHead

    start_time, start_cpu = time.perf_counter(), time.process_time()
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    # Same seed => same backbone and head initialisation for every method.
    backbone = SmallConvNet(data.channels, cfg.width)
    head = VMFPrototypeHead(
        backbone.out_dim,
        cfg.out_dim,
        norm_last_layer=method.norm_last_layer,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
    )
    student = MultiCropNet(backbone, head).to(device)
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    criterion = DINOvMFLoss(
        cfg.out_dim,
        2 + cfg.n_local,
        cfg.warmup_teacher_temp,
        cfg.teacher_temp,
        cfg.warmup_teacher_temp_epochs,
        cfg.epochs,
        student_temp=cfg.student_temp,
        p=cfg.bottleneck_dim,
        centering=method.centering,
        mode=method.mode,
        check_finite=False,  # a diverged run is reported in the results, not raised
    ).to(device)
    optimizer = torch.optim.AdamW(_param_groups(student), lr=cfg.lr, weight_decay=cfg.weight_decay)

    aug = _make_augmentation(data, cfg)
    gen = torch.Generator().manual_seed(seed)
    n_train = data.train_images.shape[0]
    if cfg.train_images > 0:
        n_train = min(n_train, cfg.train_images)
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    total = cfg.epochs * steps_per_epoch
    lr_schedule = cosine_schedule(cfg.lr, cfg.min_lr, total, cfg.warmup_epochs * steps_per_epoch)
    wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, total)
    train_images = data.train_images.to(device)
    last_layer_params = [p for n, p in student.named_parameters() if n.startswith("head.last_layer.")]

    history: dict[str, list] = {"loss": [], "diag_step": [], "diag": [], "knn_epoch": [], "knn": [], "monitor": []}
    if cfg.koleo_weight > 0:
        history["koleo"] = []
    # Reports go into the history; the figures say what happened, so no warnings on the terminal.
    monitor = diagnostics.CollapseMonitor(
        cfg.monitor_every, log=lambda r: history["monitor"].append(r.as_dict()), warn=False
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{method.label} (seed {seed})", unit="step", leave=False, dynamic_ncols=True)
    diverged = False
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n_train, generator=gen)
        tau_t = float(criterion.teacher_temp_schedule[epoch])
        for b in range(steps_per_epoch):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = lr_schedule[step]
                if i == 0:
                    group["weight_decay"] = wd_schedule[step]
            crops = aug(train_images[order[b * batch_size : (b + 1) * batch_size].to(device)], gen)
            with torch.no_grad():
                teacher_out = teacher(crops[:2])
            student_out = student(crops)
            with torch.no_grad():
                # The targets of this step: the center before the loss updates it.
                norms_t = teacher.head.prototype_norms()
                targets = teacher_logits(teacher_out, norms_t, tau_t, method, cfg.bottleneck_dim, criterion.center)
                monitor.step(torch.softmax(targets, dim=1), prototypes=teacher.head, kappa=norms_t / tau_t)
            if method.vmf:
                loss = criterion(
                    student_out,
                    teacher_out,
                    epoch,
                    student_norms=student.head.prototype_norms(),
                    teacher_norms=teacher.head.prototype_norms(),
                )
            else:
                loss = criterion(student_out, teacher_out, epoch)
            loss_value = float(loss.detach())
            history["loss"].append(loss_value)
            if not math.isfinite(loss_value):
                diverged = True
                break
            if cfg.koleo_weight > 0:
                koleo = koleo_prototype_loss(student.head)
                history["koleo"].append(float(koleo.detach()))
                loss = loss + cfg.koleo_weight * koleo
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            if epoch < cfg.freeze_last_layer:
                # As DINO: the prototypes stay at their initialisation during the first epoch(s),
                # which keeps the early, noisy assignments from scattering them.
                for param in last_layer_params:
                    param.grad = None
            optimizer.step()
            with torch.no_grad():
                m = momentum_schedule[step]
                for p_s, p_t in zip(student.parameters(), teacher.parameters()):
                    p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
            if step % cfg.log_every == 0:
                with torch.no_grad():
                    norms_t = teacher.head.prototype_norms().detach()
                    logits = teacher_logits(teacher_out, norms_t, tau_t, method, cfg.bottleneck_dim, criterion.center)
                    diag = diagnostics.head_diagnostics(
                        logits, teacher.head.last_layer.weight.detach(), tau_t, loss=loss_value, with_duplicates=False
                    )
                history["diag_step"].append(step)
                history["diag"].append(diag)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch + 1)
        if diverged:
            break
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            history["knn_epoch"].append(epoch + 1)
            history["knn"].append(_evaluate_backbone(teacher.backbone, data, aug, cfg, probe=False)["knn"])
    if bar is not None:
        bar.close()

    result: dict = {"method": method.name, "label": method.label, "seed": seed, "diverged": diverged}
    final = _evaluate_backbone(teacher.backbone, data, aug, cfg, probe=True, per_image=True)
    knn_correct = final.pop("knn_correct")
    result.update(final)
    with torch.no_grad():
        tau_t = float(criterion.teacher_temp_schedule[-1])
        was_training = teacher.training
        teacher.eval()
        raw = torch.cat([teacher([aug.plain(x)]) for x in train_images.split(512)])
        raw_test = teacher([aug.plain(data.test_images.to(device))])
        teacher.train(was_training)
        norms_t = teacher.head.prototype_norms().detach()
        logits = teacher_logits(raw, norms_t, tau_t, method, cfg.bottleneck_dim, criterion.center)
        result["diagnostics"] = diagnostics.head_diagnostics(logits, teacher.head.last_layer.weight.detach(), tau_t)
        result["kappa"] = (norms_t.float() / tau_t).cpu().tolist()
        # How spread out the teacher's prototype directions are: -mean_k log(distance to the nearest other).
        result["prototype_koleo"] = float(koleo_prototype_loss(teacher.head))
        # Each held-out image's mixture component: the argmax of the uncentred posterior (centering
        # is a training device, not part of the model).
        assigned = teacher_logits(raw_test, norms_t, tau_t, method, cfg.bottleneck_dim, None).argmax(dim=1)
        result["heldout"] = {
            "assigned": assigned.cpu().tolist(),
            "assigned_norm": norms_t.float()[assigned].cpu().tolist(),
            "knn_correct": knn_correct,
        }
    result["seconds"] = time.perf_counter() - start_time
    # CPU time of all threads: on a shared machine the wall time says more about the neighbours.
    result["cpu_seconds"] = time.process_time() - start_cpu
    result["history"] = history
    return result
