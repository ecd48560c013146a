"""Stand-in for facebookresearch/dinov2: ``dinov2.layers.DINOHead``, ``dinov2.loss.DINOLoss`` and
``iBOTPatchLoss`` (their methods: ``softmax_center_teacher``, ``sinkhorn_knopp_teacher``, ``update_center``,
``forward``, ``forward_masked``), and ``dinov2.train.ssl_meta_arch.SSLMetaArch`` (``student``/``teacher``
ModuleDicts, ``dino_loss``/``ibot_patch_loss``, ``forward_backward(images, teacher_temp)``,
``update_teacher(m)``), without xFormers and FSDP (see the package docstring)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """DINOv2's head: MLP, L2 normalisation, ``last_layer = weight_norm(Linear)`` with g = 1, always trainable."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048, bottleneck_dim=256, mlp_bias=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=mlp_bias))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


def _sinkhorn(teacher_output, teacher_temp, n_samples, n_iterations):
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    n_prototypes = q.shape[0]
    total = q.sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        rows = q.sum(dim=1, keepdim=True)
        if dist.is_initialized():
            dist.all_reduce(rows)
        q /= rows
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class _Centered(nn.Module):
    """The deferred center update both DINOv2 losses share: reduce now, apply at the next centering."""

    def __init__(self, center_shape, student_temp, center_momentum):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.pending = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.updated = False
        mean_over_tokens = teacher_output if teacher_output.dim() == 2 else teacher_output.mean(1)
        batch_sum = mean_over_tokens.sum(0, keepdim=True).view_as(self.center)
        if dist.is_initialized():
            dist.all_reduce(batch_sum)
        self.pending = (batch_sum, len(teacher_output))

    @torch.no_grad()
    def apply_center_update(self):
        if not self.updated:
            batch_sum, n = self.pending
            world = dist.get_world_size() if dist.is_initialized() else 1
            self.center = self.center * self.center_momentum + batch_sum / (n * world) * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(_Centered):
    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        world = dist.get_world_size() if dist.is_initialized() else 1
        return _sinkhorn(teacher_output, teacher_temp, teacher_output.shape[0] * world, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total


class iBOTPatchLoss(_Centered):
    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        n_samples = n_masked_patches_tensor.clone()
        if dist.is_initialized():
            dist.all_reduce(n_samples)
        return _sinkhorn(teacher_output, teacher_temp, n_samples, n_iterations)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        loss = torch.sum(teacher_patch_tokens * F.log_softmax(student_patch_tokens / self.student_temp, dim=-1), dim=-1)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked,
        teacher_patch_tokens_masked,
        student_masks_flat,
        n_masked_patches=None,
        masks_weight=None,
    ):
        loss = torch.sum(
            teacher_patch_tokens_masked * F.log_softmax(student_patch_tokens_masked / self.student_temp, dim=-1), dim=-1
        )
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


class TinyViT(nn.Module):
    """Returns DINOv2's backbone dict (``x_norm_clstoken`` (B, D), ``x_norm_patchtokens`` (B, N, D)); a list
    of inputs (with a list of masks) gives a list of dicts. Masked patches (B, N) get a learnt token."""

    def __init__(self, embed_dim=16):
        super().__init__()
        self.patch_embed = nn.Linear(3 * 16, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def _one(self, x, masks):
        tokens = self.patch_embed(F.unfold(x, kernel_size=4, stride=4).transpose(1, 2))
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = self.norm(torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1))
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

    def forward(self, x, masks=None, is_training=True):
        if isinstance(x, list):
            return [self._one(xi, mi) for xi, mi in zip(x, masks)]
        return self._one(x, masks)


def default_cfg(out_dim=32, ibot_out_dim=24, separate_head=False, centering="centering", local_crops_number=2):
    return SimpleNamespace(
        dino=SimpleNamespace(
            loss_weight=1.0,
            head_n_prototypes=out_dim,
            head_bottleneck_dim=8,
            head_nlayers=3,
            head_hidden_dim=24,
            koleo_loss_weight=0.0,
        ),
        ibot=SimpleNamespace(
            loss_weight=1.0,
            separate_head=separate_head,
            head_n_prototypes=ibot_out_dim,
            head_bottleneck_dim=8,
            head_nlayers=3,
            head_hidden_dim=24,
        ),
        train=SimpleNamespace(centering=centering),
        crops=SimpleNamespace(local_crops_number=local_crops_number),
    )


class SSLMetaArch(nn.Module):
    """DINOv2's meta-architecture, reduced to what the losses see (no KoLeo, no FSDP, no xFormers)."""

    def __init__(self, cfg, embed_dim=16):
        super().__init__()
        self.cfg = cfg
        self.do_dino, self.do_ibot = cfg.dino.loss_weight > 0, cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        self.dino_loss_weight, self.ibot_loss_weight = cfg.dino.loss_weight, cfg.ibot.loss_weight

        def head(c):
            return DINOHead(
                embed_dim,
                c.head_n_prototypes,
                nlayers=c.head_nlayers,
                hidden_dim=c.head_hidden_dim,
                bottleneck_dim=c.head_bottleneck_dim,
            )

        student, teacher = {"backbone": TinyViT(embed_dim)}, {"backbone": TinyViT(embed_dim)}
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        student["dino_head"], teacher["dino_head"] = head(cfg.dino), head(cfg.dino)
        self.ibot_out_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(self.ibot_out_dim)
        if self.ibot_separate_head:
            student["ibot_head"], teacher["ibot_head"] = head(cfg.ibot), head(cfg.ibot)
        self.student, self.teacher = nn.ModuleDict(student), nn.ModuleDict(teacher)
        for p in self.teacher.parameters():
            p.requires_grad = False

    def prepare_for_distributed_training(self):
        for k in self.student:
            self.teacher[k].load_state_dict(self.student[k].state_dict())

    def forward_backward(self, images, teacher_temp):
        n_global, n_local = 2, self.cfg.crops.local_crops_number
        global_crops, local_crops = images["collated_global_crops"], images["collated_local_crops"]
        masks, mask_indices_list = images["collated_masks"], images["mask_indices_list"]
        n_masked_patches_tensor, n_masked = images["n_masked_patches"], images["mask_indices_list"].shape[0]
        upperbound, masks_weight = images["upperbound"], images["masks_weight"]
        terms = (n_global - 1) * n_global + max(n_local * n_global, 1)

        with torch.no_grad():
            out = self.teacher.backbone(global_crops, is_training=True)
            cls = out["x_norm_clstoken"].chunk(n_global)
            cls = torch.cat((cls[1], cls[0]))  # swapped so that view A meets B
            patches = out["x_norm_patchtokens"]
            buffer = patches.new_zeros(upperbound, patches.shape[-1])
            buffer[:n_masked].copy_(torch.index_select(patches.flatten(0, 1), 0, mask_indices_list))
            if self.ibot_separate_head:
                t_cls = self.teacher.dino_head(cls)
                t_patch = self.teacher.ibot_head(buffer)[:n_masked]
            else:
                after = self.teacher.dino_head(torch.cat([cls, buffer]))
                t_cls, t_patch = after[: len(cls)], after[len(cls) : len(cls) + n_masked]
            if self.cfg.train.centering == "centering":
                t_dino = self.dino_loss.softmax_center_teacher(t_cls, teacher_temp=teacher_temp).view(
                    n_global, -1, t_cls.shape[-1]
                )
                self.dino_loss.update_center(t_cls)
                t_patch = t_patch.unsqueeze(0)
                t_ibot = self.ibot_patch_loss.softmax_center_teacher(
                    t_patch[:, :n_masked], teacher_temp=teacher_temp
                ).squeeze(0)
                self.ibot_patch_loss.update_center(t_patch[:n_masked])
            else:
                t_dino = self.dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp=teacher_temp).view(
                    n_global, -1, t_cls.shape[-1]
                )
                t_ibot = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    t_patch, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_patches_tensor
                )

        g_out, l_out = self.student.backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
        s_patch_in = g_out["x_norm_patchtokens"]
        s_buffer = s_patch_in.new_zeros(upperbound, s_patch_in.shape[-1])
        s_buffer[:n_masked].copy_(torch.index_select(s_patch_in.flatten(0, 1), 0, mask_indices_list))
        inputs = [l_out["x_norm_clstoken"], g_out["x_norm_clstoken"]]
        if not self.ibot_separate_head:
            inputs.append(s_buffer)
        outputs = list(self.student.dino_head(torch.cat(inputs)).split([len(x) for x in inputs]))
        s_local, s_global = outputs[0], outputs[1]
        s_patch = outputs[2][:n_masked] if not self.ibot_separate_head else self.student.ibot_head(s_buffer)[:n_masked]

        loss_dict, total = {}, 0
        local_loss = self.dino_loss(s_local.chunk(n_local), t_dino) / terms
        global_loss = self.dino_loss([s_global], [t_dino.flatten(0, 1)]) * 2 / terms
        ibot_loss = (
            self.ibot_patch_loss.forward_masked(
                s_patch, t_ibot, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=masks_weight
            )
            * 2
            / n_global
        )
        loss_dict.update(dino_local_crops_loss=local_loss, dino_global_crops_loss=global_loss, ibot_loss=ibot_loss / 2)
        total = self.dino_loss_weight * (local_loss + global_loss) + self.ibot_loss_weight * ibot_loss
        total.backward()
        loss_dict["total"] = total.detach()
        return loss_dict

    def update_teacher(self, m):
        with torch.no_grad():
            for k in self.student:
                for ps, pt in zip(self.student[k].parameters(), self.teacher[k].parameters()):
                    pt.mul_(m).add_(ps, alpha=1 - m)


def collated_batch(batch=3, n_local=2, seed=0, ratio=0.4, upperbound_extra=2):
    """What DINOv2's ``collate_data_and_cast`` hands to ``forward_backward`` (16-px global crops: 16 patches)."""
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * batch, 3, 16, 16, generator=g)
    local_crops = torch.randn(n_local * batch, 3, 8, 8, generator=g)
    masks = torch.rand(2 * batch, 16, generator=g) < ratio
    masks[0] = False  # an image with no masked patch
    mask_indices_list = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": int(masks.sum()) + upperbound_extra,
        "n_masked_patches": torch.full((1,), fill_value=int(masks.sum()), dtype=torch.long),
    }
