"""Stand-in for solo-learn: ``solo.losses.dino.DINOLoss``, ``solo.methods.dino.DINOHead`` and the ``DINO``
method on a minimal ``solo.methods.base.BaseMomentumMethod`` (see the package docstring).

What the patch relies on: the method holds ``head``, ``momentum_head`` (DINO's head: a
``weight_norm``'d ``last_layer``, ``weight_g`` frozen unless ``norm_last_layer`` is False) and
``dino_loss_func``; ``on_train_epoch_start`` sets ``dino_loss_func.epoch``; ``training_step`` calls
``dino_loss_func(cat(z of the large crops), cat(momentum z of the large crops))``; the loss chunks
the student's output into ``num_large_crops`` views and the teacher's into 2, reads its temperature
from a numpy schedule at ``epoch`` and moves a ``(1, K)`` logit center by the all-reduced batch mean.
The base class here does what solo-learn's Lightning base does for one step, without Lightning:
backbones, ``current_epoch``, the momentum update of ``momentum_pairs``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from . import dino as D


class DINOLoss(D.DINOLoss):
    """solo-learn's ``DINOLoss``: constructor, ``epoch`` attribute, ``forward(student_output, teacher_output)``."""

    def __init__(
        self,
        num_prototypes,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        num_epochs,
        student_temp=0.1,
        num_large_crops=2,
        center_momentum=0.9,
    ):
        super().__init__(
            num_prototypes,
            num_large_crops,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            num_epochs,
            student_temp,
            center_momentum,
        )
        self.num_large_crops = num_large_crops
        self.epoch = 0

    def forward(self, student_output, teacher_output):
        return super().forward(student_output, teacher_output, self.epoch)


class DINOHead(D.DINOHead):
    """solo-learn's ``DINOHead``: DINO's head (``mlp``, ``last_layer``) under solo-learn's argument names."""

    def __init__(
        self,
        in_dim,
        num_prototypes,
        use_bn=True,
        norm_last_layer=True,
        num_layers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
    ):
        super().__init__(in_dim, num_prototypes, use_bn, norm_last_layer, num_layers, hidden_dim, bottleneck_dim)


class BaseMomentumMethod(nn.Module):
    """The part of solo-learn's ``BaseMomentumMethod`` a method's step uses: ``backbone`` and
    ``momentum_backbone`` (features of ``features_dim``), ``max_epochs``, ``num_large_crops``,
    ``current_epoch``, ``training_step`` returning the outputs of every large crop under ``z`` and
    ``momentum_z``, ``momentum_pairs`` and their EMA update."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = D.TinyBackbone(cfg.features_dim)
        self.backbone.fc = nn.Identity()
        self.features_dim = cfg.features_dim
        self.momentum_backbone = copy.deepcopy(self.backbone)
        for param in self.momentum_backbone.parameters():
            param.requires_grad = False
        self.max_epochs = cfg.max_epochs
        self.num_large_crops = cfg.data.num_large_crops
        self.current_epoch = 0

    @staticmethod
    def add_and_assert_specific_cfg(cfg):
        return cfg

    @property
    def learnable_params(self):
        return [{"name": "backbone", "params": self.backbone.parameters()}]

    @property
    def momentum_pairs(self):
        return [(self.backbone, self.momentum_backbone)]

    def log(self, name, value, **kwargs):
        """Lightning's logging, which the step calls; nothing to record here."""

    def forward(self, X):
        return {"feats": self.backbone(X)}

    @torch.no_grad()
    def momentum_forward(self, X):
        return {"feats": self.momentum_backbone(X)}

    def training_step(self, batch, batch_idx):
        _, X, _ = batch
        large = X[: self.num_large_crops]
        outs = {"z": [self(x)["z"] for x in large], "momentum_z": [self.momentum_forward(x)["z"] for x in large]}
        outs["loss"] = torch.zeros(())
        return outs

    @torch.no_grad()
    def momentum_update(self, tau):
        for online, momentum in self.momentum_pairs:
            for p, q in zip(online.parameters(), momentum.parameters()):
                q.mul_(tau).add_(p.detach() * (1 - tau))


def _freeze(module):
    for param in module.parameters():
        param.requires_grad = False
    return module


class DINO(BaseMomentumMethod):
    """solo-learn's ``DINO`` method: heads, loss, the epoch handed to the loss, the step, and the last
    layer's gradient dropped while ``current_epoch < freeze_last_layer``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        kw = cfg.method_kwargs
        self.freeze_last_layer = kw.freeze_last_layer

        def head():
            return DINOHead(
                self.features_dim,
                kw.num_prototypes,
                use_bn=kw.use_bn_in_head,
                norm_last_layer=kw.norm_last_layer,
                hidden_dim=kw.proj_hidden_dim,
                bottleneck_dim=kw.proj_output_dim,
            )

        self.head = head()
        self.momentum_head = _freeze(head())
        self.momentum_head.load_state_dict(self.head.state_dict())
        self.dino_loss_func = DINOLoss(
            num_prototypes=kw.num_prototypes,
            student_temp=kw.student_temperature,
            warmup_teacher_temp=kw.warmup_teacher_temperature,
            teacher_temp=kw.teacher_temperature,
            warmup_teacher_temp_epochs=kw.warmup_teacher_temperature_epochs,
            num_epochs=self.max_epochs,
        )

    @property
    def learnable_params(self):
        return [*super().learnable_params, {"name": "head", "params": self.head.parameters()}]

    @property
    def momentum_pairs(self):
        return [*super().momentum_pairs, (self.head, self.momentum_head)]

    def on_train_epoch_start(self):
        self.dino_loss_func.epoch = self.current_epoch

    def forward(self, X):
        out = super().forward(X)
        out["z"] = self.head(out["feats"])
        return out

    @torch.no_grad()
    def momentum_forward(self, X):
        out = super().momentum_forward(X)
        out["z"] = self.momentum_head(out["feats"])
        return out

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        dino_loss = self.dino_loss_func(torch.cat(out["z"]), torch.cat(out["momentum_z"]))
        self.log("dino_loss", dino_loss)
        return dino_loss + out["loss"]

    def on_after_backward(self):
        if self.current_epoch < self.freeze_last_layer:
            for param in self.head.last_layer.parameters():
                param.grad = None


def config(
    *,
    num_prototypes=32,
    norm_last_layer=False,
    max_epochs=4,
    warmup_epochs=2,
    features_dim=16,
    hidden_dim=24,
    bottleneck_dim=8,
    freeze_last_layer=1,
):
    """The ``cfg`` of a small DINO run, attribute access as solo-learn's omegaconf config."""
    return SimpleNamespace(
        features_dim=features_dim,
        max_epochs=max_epochs,
        data=SimpleNamespace(num_large_crops=2),
        method_kwargs=SimpleNamespace(
            proj_hidden_dim=hidden_dim,
            proj_output_dim=bottleneck_dim,
            num_prototypes=num_prototypes,
            use_bn_in_head=False,
            norm_last_layer=norm_last_layer,
            clip_grad=0,
            freeze_last_layer=freeze_last_layer,
            student_temperature=0.1,
            teacher_temperature=0.07,
            warmup_teacher_temperature=0.04,
            warmup_teacher_temperature_epochs=warmup_epochs,
        ),
    )


def batch(size=4, n_crops=2, seed=0):
    """solo-learn's ``[indexes, [crops], targets]`` with 16-px crops."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(size, 3, 16, 16, generator=g) for _ in range(n_crops)]
    return torch.arange(size), crops, torch.zeros(size, dtype=torch.long)


def train_step(method, batch, optimizer, tau=0.9):
    """One Lightning step of solo-learn's loop: ``training_step``, backward, ``on_after_backward``,
    optimizer step, ``on_train_batch_end``'s momentum update. Returns the loss."""
    loss = method.training_step(batch, 0)
    optimizer.zero_grad()
    loss.backward()
    method.on_after_backward()
    optimizer.step()
    method.momentum_update(tau)
    return loss
