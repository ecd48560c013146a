"""Stand-in for facebookresearch/dino: ``vision_transformer.DINOHead``, ``utils.MultiCropWrapper``,
``utils.cancel_gradients_last_layer`` / ``get_params_groups`` / ``load_pretrained_weights``,
``main_dino.DINOLoss`` and the body of ``main_dino.train_one_epoch`` (see the package docstring)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TinyBackbone(nn.Module):
    """Images (B, 3, H, W) of any size -> features (B, embed_dim). Has ``fc``/``head`` like DINO's archs."""

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.proj = nn.Linear(3 * 4, embed_dim)
        self.fc = nn.Linear(embed_dim, 10)  # a classifier that MultiCropWrapper disables
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.head(self.fc(torch.tanh(self.proj(pooled))))


def weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer):
    """The prototype layer as DINO and iBOT build it: ``nn.utils.weight_norm(nn.Linear(p, K, bias=False))``
    with ``weight_g`` filled with 1 (legacy ``weight_g``/``weight_v`` state-dict keys) and frozen when
    ``norm_last_layer``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated since torch 2.1; DINO still calls it
        layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    layer.weight_g.data.fill_(1)
    if norm_last_layer:
        layer.weight_g.requires_grad = False
    return layer


class DINOHead(nn.Module):
    """Constructor, attributes, parameter names and initialisation of DINO's
    ``vision_transformer.DINOHead`` (hidden Linear layers trunc-normal with std 0.02 and zero bias; the
    prototype layer keeps torch's default). ``norm_cls``, ``act_cls`` and ``shared_norm`` (one norm module
    reused by every hidden layer) are the options iBOT's head adds (``standins.ibot.iBOTHead``)."""

    def __init__(
        self,
        in_dim,
        out_dim,
        use_bn=False,
        norm_last_layer=True,
        nlayers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
        norm_cls=None,
        act_cls=nn.GELU,
        shared_norm=False,
    ):
        super().__init__()
        if use_bn:
            norm_cls = nn.BatchNorm1d
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            shared = norm_cls(hidden_dim) if (norm_cls and shared_norm) else None
            layers = []
            for i in range(nlayers - 1):
                layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim))
                if norm_cls is not None:
                    layers.append(shared if shared is not None else norm_cls(hidden_dim))
                layers.append(act_cls())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def run_mlp(self, x):
        # iBOT applies BatchNorm1d to (B, N, C) tokens by moving C to dimension 1.
        if isinstance(self.mlp, nn.Linear) or x.dim() == 2:
            return self.mlp(x)
        for m in self.mlp:
            x = m(x.transpose(1, 2)).transpose(1, 2) if isinstance(m, nn.BatchNorm1d) else m(x)
        return x

    def forward(self, x):
        return self.last_layer(F.normalize(self.run_mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """DINO's ``utils.MultiCropWrapper``: backbone per run of equal-resolution crops, head on all of them."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        crops = x if isinstance(x, list) else [x]
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch < freeze_last_layer:
        for name, param in model.named_parameters():
            if "last_layer" in name:
                param.grad = None


def get_params_groups(model):
    decayed, not_decayed = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (not_decayed if name.endswith(".bias") or param.dim() == 1 else decayed).append(param)
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]


def load_pretrained_weights(backbone, checkpoint, checkpoint_key="teacher"):
    """What DINO's eval_knn.py / eval_linear.py do with ``--pretrained_weights`` and ``--checkpoint_key``:
    take the key, strip the ``module.`` and ``backbone.`` prefixes, load non-strictly into the backbone."""
    state = checkpoint[checkpoint_key]
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in state.items()}
    return backbone.load_state_dict(state, strict=False)


class DINOLoss(nn.Module):
    """``main_dino.DINOLoss``: constructor, attributes (numpy ``teacher_temp_schedule``), forward."""

    def __init__(
        self,
        out_dim,
        ncrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output, teacher_output, epoch):
        student_views = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_views = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for i, q in enumerate(teacher_views):
            for j, s in enumerate(student_views):
                if i != j:
                    total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                    terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_sum = teacher_output.sum(dim=0, keepdim=True)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(batch_sum)
            world = dist.get_world_size()
        self.center = self.center * self.center_momentum + batch_sum / (len(teacher_output) * world) * (
            1 - self.center_momentum
        )


def build_networks(out_dim=32, *, norm_last_layer=False, embed_dim=16, bottleneck_dim=8, hidden_dim=24, seed=0):
    """Student and teacher ``MultiCropWrapper(backbone, DINOHead)`` as ``main_dino.train_dino`` builds them."""
    torch.manual_seed(seed)
    student = MultiCropWrapper(
        TinyBackbone(embed_dim),
        DINOHead(
            embed_dim, out_dim, norm_last_layer=norm_last_layer, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim
        ),
    )
    teacher = MultiCropWrapper(
        TinyBackbone(embed_dim), DINOHead(embed_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
    )
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def crops(batch=4, n_local=2, seed=0):
    """2 global crops (16 px) and ``n_local`` local crops (8 px), as DINO's data augmentation returns them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n_local)
    ]


def train_step(
    student,
    teacher,
    teacher_without_ddp,
    dino_loss,
    images,
    optimizer,
    epoch,
    momentum,
    freeze_last_layer=0,
    observe=None,
):
    """One iteration of ``main_dino.train_one_epoch`` (fp32, no clipping). Returns the loss tensor.
    ``observe(student_output, teacher_output)``, if given, sees the outputs before the loss does."""
    teacher_output = teacher(images[:2])
    student_output = student(images)
    if observe is not None:
        observe(student_output, teacher_output)
    loss = dino_loss(student_output, teacher_output, epoch)
    optimizer.zero_grad()
    loss.backward()
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    student_module = student.module if hasattr(student, "module") else student
    with torch.no_grad():
        for param_q, param_k in zip(student_module.parameters(), teacher_without_ddp.parameters()):
            param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
    return loss
