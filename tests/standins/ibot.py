"""Stand-in for bytedance/ibot: ``models.head.iBOTHead``, ``utils.MultiCropWrapper`` (with masks),
``main_ibot.iBOTLoss`` and the body of ``main_ibot.train_one_epoch`` (see the package docstring)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .dino import DINOHead, cancel_gradients_last_layer, weight_normed_linear


class TinyTokenBackbone(nn.Module):
    """Images (B, 3, H, W) -> tokens (B, 1 + N, D), N = (H/4)(W/4): a [CLS] token then one per 4x4 patch.
    ``mask`` (B, H/4, W/4) replaces the embeddings of masked patches by a learnt token, as iBOT's ViT does
    while ``masked_im_modeling`` is True."""

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = nn.Linear(3 * 16, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
        self.mix = nn.Linear(embed_dim, embed_dim)
        self.masked_im_modeling = True
        self.fc, self.head = nn.Identity(), nn.Identity()

    def forward(self, x, mask=None):
        patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, 48)
        tokens = self.patch_embed(patches)
        if mask is not None and self.masked_im_modeling:
            tokens = torch.where(mask.flatten(1).unsqueeze(-1), self.masked_embed.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(len(x), -1, -1) + tokens.mean(1, keepdim=True)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + torch.tanh(self.mix(tokens))


class iBOTHead(DINOHead):
    """iBOT's ``models.head.iBOTHead`` (norm None/'bn'/'ln', act 'gelu'/'relu', last_norm None): attributes
    ``mlp`` (one norm module shared by the hidden layers), ``last_layer``, ``last_layer2`` (the same module
    when ``shared_head``), ``last_norm``/``last_norm2`` (None). A 2-D input gives the [CLS] logits alone."""

    def __init__(
        self,
        in_dim,
        out_dim,
        patch_out_dim=8192,
        norm=None,
        act="gelu",
        nlayers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
        norm_last_layer=True,
        shared_head=False,
    ):
        norm_cls = {None: None, "bn": nn.BatchNorm1d, "ln": nn.LayerNorm}[norm]
        act_cls = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        super().__init__(
            in_dim,
            out_dim,
            norm_last_layer=norm_last_layer,
            nlayers=nlayers,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            norm_cls=norm_cls,
            act_cls=act_cls,
            shared_norm=True,
        )
        if shared_head:
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer)
        self.last_norm = self.last_norm2 = None

    def forward(self, x):
        if x.dim() == 2:
            return super().forward(x)
        y = F.normalize(self.run_mlp(x), dim=-1, p=2)
        return self.last_layer(y[:, 0]), self.last_layer2(y[:, 1:])


class MultiCropWrapper(nn.Module):
    """iBOT's ``utils.MultiCropWrapper``: as DINO's, plus per-crop masks passed to the backbone."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x, mask=None):
        crops = x if isinstance(x, list) else [x]
        masks = mask if mask is None or isinstance(mask, list) else [mask]
        outputs, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            kwargs = {} if masks is None else {"mask": torch.cat(masks[start:end])}
            outputs.append(self.backbone(torch.cat(crops[start:end]), **kwargs))
            start = end
        return self.head(torch.cat(outputs))


class iBOTLoss(nn.Module):
    """``main_ibot.iBOTLoss``: constructor, attributes (numpy schedules, ``center`` (1, K), ``center2``
    (1, 1, K2)), ``forward`` returning the dict ``cls``/``patch``/``loss``."""

    def __init__(
        self,
        out_dim,
        patch_out_dim,
        ngcrops,
        nlcrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp2,
        teacher_temp2,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
        center_momentum2=0.9,
        lambda1=1.0,
        lambda2=1.0,
        mim_start_epoch=0,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.ngcrops, self.nlcrops, self.ncrops = ngcrops, nlcrops, ngcrops + nlcrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.lambda1, self.lambda2 = lambda1, lambda2
        warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.teacher_temp_schedule = np.concatenate((warm, np.full(nepochs - warmup_teacher_temp_epochs, teacher_temp)))
        warm2 = np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs)
        self.teacher_temp2_schedule = np.concatenate(
            (
                np.full(mim_start_epoch, warmup_teacher_temp2),
                warm2,
                np.full(nepochs - warmup_teacher_temp_epochs - mim_start_epoch, teacher_temp2),
            )
        )

    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch):
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        s_cls = (student_cls / self.student_temp).chunk(self.ncrops)
        s_patch = (student_patch / self.student_temp).chunk(self.ngcrops)
        temp, temp2 = self.teacher_temp_schedule[epoch], self.teacher_temp2_schedule[epoch]
        t_cls = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach().chunk(self.ngcrops)
        t_patch = F.softmax((teacher_patch - self.center2) / temp2, dim=-1).detach().chunk(self.ngcrops)
        cls_total, cls_terms, patch_total, patch_terms = 0.0, 0, 0.0, 0
        for q in range(len(t_cls)):
            for v in range(len(s_cls)):
                if v == q:
                    per_token = torch.sum(-t_patch[q] * F.log_softmax(s_patch[v], dim=-1), dim=-1)
                    mask = student_mask[v].flatten(-2, -1).float()
                    patch_total = patch_total + (torch.sum(per_token * mask, -1) / mask.sum(-1).clamp(min=1.0)).mean()
                    patch_terms += 1
                else:
                    cls_total = cls_total + torch.sum(-t_cls[q] * F.log_softmax(s_cls[v], dim=-1), dim=-1).mean()
                    cls_terms += 1
        cls_loss = cls_total / cls_terms * self.lambda1
        patch_loss = patch_total / patch_terms * self.lambda2
        self.update_center(teacher_cls, teacher_patch)
        return dict(cls=cls_loss, patch=patch_loss, loss=cls_loss + patch_loss)

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        cls_sum = teacher_cls.sum(0, keepdim=True)
        patch_sum = teacher_patch.mean(1).sum(0, keepdim=True)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(cls_sum)
            dist.all_reduce(patch_sum)
            world = dist.get_world_size()
        m, m2 = self.center_momentum, self.center_momentum2
        self.center = self.center * m + cls_sum / (len(teacher_cls) * world) * (1 - m)
        self.center2 = self.center2 * m2 + patch_sum / (len(teacher_patch) * world) * (1 - m2)


def build_networks(
    out_dim=32,
    patch_out_dim=32,
    *,
    norm_last_layer=False,
    shared_head=False,
    shared_head_teacher=True,
    embed_dim=16,
    bottleneck_dim=8,
    hidden_dim=24,
    seed=0,
):
    """Student and teacher as ``main_ibot.train_ibot`` builds them (teacher head shared by default)."""
    torch.manual_seed(seed)
    student = MultiCropWrapper(
        TinyTokenBackbone(embed_dim),
        iBOTHead(
            embed_dim,
            out_dim,
            patch_out_dim=patch_out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            norm_last_layer=norm_last_layer,
            shared_head=shared_head,
        ),
    )
    teacher = MultiCropWrapper(
        TinyTokenBackbone(embed_dim),
        iBOTHead(
            embed_dim,
            out_dim,
            patch_out_dim=patch_out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            shared_head=shared_head_teacher,
        ),
    )
    teacher.load_state_dict(student.state_dict(), strict=False)
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def crops_and_masks(batch=3, n_local=2, seed=0, ratio=0.4):
    """2 global crops (16 px, 16 patches) with random boolean masks (B, 4, 4), ``n_local`` local crops (8 px)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]
    images += [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n_local)]
    masks = [torch.rand(batch, 4, 4, generator=g) < ratio for _ in range(2)]
    masks[0][0] = False  # an image without masked patches: its patch term is 0 (clamp(min=1))
    return images, masks


def train_step(
    student, teacher, ibot_loss, images, masks, optimizer, epoch, momentum, freeze_last_layer=0, observe=None
):
    """One iteration of ``main_ibot.train_one_epoch`` (fp32). Returns iBOT's loss dict.
    ``observe(student_output, teacher_output, student_local_cls)`` sees the outputs before the loss."""
    teacher_output = teacher(images[:2])
    student_output = student(images[:2], mask=masks[:2])
    student_module = student.module if hasattr(student, "module") else student
    student_module.backbone.masked_im_modeling = False
    student_local_cls = student(images[2:])[0] if len(images) > 2 else None
    student_module.backbone.masked_im_modeling = True
    if observe is not None:
        observe(student_output, teacher_output, student_local_cls)
    all_loss = ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch)
    optimizer.zero_grad()
    all_loss["loss"].backward()
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    # iBOT averages only the parameters that student and teacher both have (by name).
    teacher_params = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param_q in student_module.named_parameters():
            if name in teacher_params:
                teacher_params[name].data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
    return all_loss
