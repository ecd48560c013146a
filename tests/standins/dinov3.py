"""Stand-in for facebookresearch/dinov3, written from its interfaces (not copied): ``dinov3.layers.DINOHead``
(plain ``nn.Linear`` prototypes, ``init_weights``, ``no_last_layer``/``only_last_layer``),
``dinov3.loss.DINOLoss`` and ``iBOTPatchLoss`` (NaN center filled by ``init_weights``,
``sinkhorn_knopp_teacher``, ``softmax_center_teacher``, ``forward(student_logits, teacher_probs,
ignore_diagonal)``, ``forward_masked``, the deferred center update), ``KoLeoLoss``,
``dinov3.train.ssl_meta_arch.SSLMetaArch`` (its assertions, ``student``/``teacher``/``model_ema``
ModuleDicts, ``init_weights``, ``forward_backward(data, *, teacher_temp, iteration)`` through
``get_teacher_output`` / ``get_student_output`` / ``compute_losses`` with DINOv3's loss scales,
``update_ema``, distillation's separate teacher, ``prepare_for_distributed_training``), and the batch
layout of ``dinov3.data.collate_data_and_cast``.

Left out: the ViT (a tiny patch-embedding backbone with DINOv3's output dict), the Gram loss, the local-loss
reweighting schedule, fp8 and activation checkpointing. ``prepare_for_distributed_training`` compiles the
heads (``cfg.train.compile``; DINOv3's default inductor replaced by ``aot_eager``: dynamo's handling of
hooks, which is what matters here, is the same) and applies FSDP2 ``fully_shard`` to every module of the
student and the inference-only models with ``reshard_after_forward=True`` when a process group exists, as
DINOv3's ``ac_compile_parallelize`` does (per module here, per block there). DINOv3's iBOT Sinkhorn
all-reduces the masked-patch count unconditionally; here only under a process group.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

COMPILE_BACKEND = "aot_eager"


def _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, bias):
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    for _ in range(nlayers - 2):
        layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim, bias=bias)]
    layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
    layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim, bias=bias)]
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINOv3's head: MLP, L2 normalisation, ``last_layer = nn.Linear(p, K, bias=False)`` (free row norms)."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048, bottleneck_dim=256, mlp_bias=True):
        super().__init__()
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, no_last_layer=False, only_last_layer=False):
        if not only_last_layer:
            x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return x if no_last_layer else self.last_layer(x)


def _sinkhorn(teacher_output, teacher_temp, n_samples, n_iterations):
    q = torch.exp(teacher_output.float() / teacher_temp).t()  # (K, B), no shift, as DINOv3
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
    """The center both DINOv3 losses hold: NaN until ``init_weights``, updated by reduce-then-apply."""

    def __init__(self, center_shape, student_temp, center_momentum):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.full(center_shape, math.nan))
        self.updated = True
        self.pending = None

    def init_weights(self):
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp, update_centers=True):
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self.updated = False
        per_row = teacher_output if teacher_output.dim() == 2 else teacher_output.mean(1)
        batch_sum = per_row.sum(0, keepdim=True).view_as(self.center)
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

    def forward(self, student_logits, teacher_probs, ignore_diagonal=False):
        """student_logits (S, B, K), teacher_probs (T, B, K): mean cross-entropy over the crop pairs."""
        n_student, batch, _ = student_logits.shape
        n_teacher = teacher_probs.shape[0]
        lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        pairs = -torch.einsum("sbk,tbk->st", lsm, teacher_probs)
        if not ignore_diagonal:
            return pairs.sum() / (batch * n_student * n_teacher)
        n_diag = min(n_student, n_teacher)
        pairs = torch.diagonal_scatter(pairs, pairs.new_zeros(n_diag))
        return pairs.sum() / (batch * n_student * n_teacher - batch * n_diag)


class SinkhornKnoppTeacher(nn.Module):
    """DINOv3 holds the iBOT Sinkhorn as a submodule (to compile it); no state, no state-dict keys."""

    @torch.no_grad()
    def forward(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        n_samples = n_masked_patches_tensor
        if dist.is_initialized():
            dist.all_reduce(n_samples)
        return _sinkhorn(teacher_output, teacher_temp, n_samples, n_iterations)


def _patch_cross_entropy(t, s, temp):
    return torch.sum(t.float() * F.log_softmax(s.float() / temp, dim=-1), dim=-1)


class iBOTPatchLoss(_Centered):
    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)
        self.sinkhorn_knopp_teacher = SinkhornKnoppTeacher()

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        loss = _patch_cross_entropy(teacher_patch_tokens, student_patch_tokens, self.student_temp)
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
        loss = _patch_cross_entropy(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            counts = student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = (1 / counts).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko regulariser: ``-mean log`` distance of each normalised row to its nearest neighbour."""

    def forward(self, x, eps=1e-8):
        x = F.normalize(x, eps=eps, p=2, dim=-1)
        dots = x @ x.t()
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        nearest = dots.argmax(dim=1)
        return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


class TinyBackbone(nn.Module):
    """DINOv3's backbone output dict (``x_norm_clstoken`` (B, D), ``x_storage_tokens`` (B, R, D),
    ``x_norm_patchtokens`` (B, N, D)) from 4-px patches; a list of inputs (with a list of masks) gives a
    list of dicts. Masked patches (B, N) get a learnt token."""

    def __init__(self, embed_dim=16, n_storage_tokens=2):
        super().__init__()
        self.patch_embed = nn.Linear(3 * 16, embed_dim)
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def init_weights(self):
        nn.init.trunc_normal_(self.patch_embed.weight, std=0.2)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.mask_token, std=0.5)
        nn.init.normal_(self.storage_tokens, std=0.5)
        self.norm.reset_parameters()

    def _one(self, x, masks):
        tokens = self.patch_embed(F.unfold(x, kernel_size=4, stride=4).transpose(1, 2))
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        storage = self.storage_tokens.expand(len(x), -1, -1) + tokens.mean(1, keepdim=True)
        tokens = self.norm(torch.cat([tokens.mean(1, keepdim=True), storage, tokens], dim=1))
        n = storage.shape[1]
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_storage_tokens": tokens[:, 1 : 1 + n],
            "x_norm_patchtokens": tokens[:, 1 + n :],
        }

    def forward(self, x, masks=None, is_training=True):
        if isinstance(x, list):
            return [self._one(xi, mi) for xi, mi in zip(x, masks)]
        return self._one(x, masks)


def default_cfg(
    out_dim=32,
    ibot_out_dim=24,
    bottleneck_dim=8,
    local_crops_number=2,
    global_ignore_diagonal=True,
    koleo_loss_weight=0.1,
    compile=False,
    distillation_bottleneck_dim=None,
    multidistillation=False,
):
    """The fields of DINOv3's config that SSLMetaArch reads (small sizes); ``distillation_bottleneck_dim``
    switches distillation on, from a teacher with that bottleneck."""
    head = dict(head_bottleneck_dim=bottleneck_dim, head_nlayers=3, head_hidden_dim=24, loss_weight=1.0)
    return SimpleNamespace(
        dino=SimpleNamespace(
            head_n_prototypes=out_dim,
            global_ignore_diagonal=global_ignore_diagonal,
            koleo_loss_weight=koleo_loss_weight,
            **head,
        ),
        ibot=SimpleNamespace(head_n_prototypes=ibot_out_dim, separate_head=True, **head),
        train=SimpleNamespace(centering="sinkhorn_knopp", compile=compile),
        crops=SimpleNamespace(local_crops_number=local_crops_number),
        compute_precision=SimpleNamespace(sharding_strategy="SHARD_GRAD_OP"),
        distillation=SimpleNamespace(
            enabled=distillation_bottleneck_dim is not None, head_bottleneck_dim=distillation_bottleneck_dim
        ),
        multidistillation=SimpleNamespace(enabled=multidistillation),
    )


class SSLMetaArch(nn.Module):
    """DINOv3's meta-architecture, reduced to what the losses see (no Gram teacher, no ViT)."""

    def __init__(self, cfg, embed_dim=16):
        super().__init__()
        assert cfg.crops.local_crops_number > 0
        assert cfg.ibot.separate_head is True
        assert cfg.train.centering == "sinkhorn_knopp"
        assert cfg.compute_precision.sharding_strategy == "SHARD_GRAD_OP"
        self.cfg = cfg

        def heads(bottleneck_dim):
            return {
                name: DINOHead(
                    embed_dim,
                    c.head_n_prototypes,
                    nlayers=c.head_nlayers,
                    hidden_dim=c.head_hidden_dim,
                    bottleneck_dim=bottleneck_dim or c.head_bottleneck_dim,
                )
                for name, c in (("dino_head", cfg.dino), ("ibot_head", cfg.ibot))
            }

        self.student = nn.ModuleDict({"backbone": TinyBackbone(embed_dim), **heads(None)})
        self.teacher = nn.ModuleDict({"backbone": TinyBackbone(embed_dim), **heads(None)})
        self.model_ema = self.teacher
        if cfg.distillation.enabled:
            self.teacher = nn.ModuleDict(
                {"backbone": TinyBackbone(embed_dim), **heads(cfg.distillation.head_bottleneck_dim)}
            )
        self.teacher.requires_grad_(False)
        self.model_ema.requires_grad_(False)
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        self.n_local_crops = cfg.crops.local_crops_number
        self.is_distillation_enabled = cfg.distillation.enabled
        self.dino_global_ignore_diagonal = cfg.dino.global_ignore_diagonal
        self.ema_params_lists = None

    def init_weights(self):
        for key in ("backbone", "dino_head", "ibot_head"):
            self.student[key].init_weights()
        self.dino_loss.init_weights()
        self.ibot_patch_loss.init_weights()
        self.model_ema.load_state_dict(self.student.state_dict())
        if self.is_distillation_enabled:
            for module in self.teacher.values():
                module.init_weights()

    def prepare_for_distributed_training(self):
        models = [self.student, self.model_ema] + ([self.teacher] if self.is_distillation_enabled else [])
        if self.cfg.train.compile:
            for model in models:
                for key in ("dino_head", "ibot_head"):
                    model[key].compile(backend=COMPILE_BACKEND)
        if dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for model in models:
                for key in model:
                    fully_shard(model[key], mesh=mesh, reshard_after_forward=True)

    def forward_backward(self, data, *, teacher_temp, iteration=0, **ignored_kwargs):
        n_global_crops, n_local_crops = 2, self.n_local_crops
        batch = data["collated_local_crops"].shape[0] // n_local_crops
        assert data["collated_global_crops"].shape[0] == n_global_crops * batch
        global_crops = data["collated_global_crops"].unflatten(0, (n_global_crops, batch))
        local_crops = data["collated_local_crops"].unflatten(0, (n_local_crops, batch))
        masks, mask_indices_list = data["collated_masks"], data["mask_indices_list"]
        teacher_global = self.get_teacher_output(
            global_crops,
            teacher_temp=teacher_temp,
            n_masked_patches_tensor=data["n_masked_patches"],
            mask_indices_list=mask_indices_list,
            upperbound=data["upperbound"],
        )
        student_global, student_local = self.get_student_output(
            global_crops=global_crops,
            local_crops=local_crops,
            upperbound=data["upperbound"],
            masks=masks,
            mask_indices_list=mask_indices_list,
        )
        loss, loss_dict = self.compute_losses(
            teacher_global=teacher_global,
            student_global=student_global,
            student_local=student_local,
            masks=masks,
            mask_indices_list=mask_indices_list,
            masks_weight=data["masks_weight"],
            iteration=iteration,
        )
        loss.backward()
        return loss, {"local_batch_size": batch} | loss_dict

    @torch.no_grad()
    def get_teacher_output(self, images, *, upperbound, mask_indices_list, teacher_temp, n_masked_patches_tensor):
        n_crops, batch = images.shape[:2]
        out = self.teacher.backbone(images.flatten(0, 1), is_training=True)
        cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        masked_after_head = self.teacher.ibot_head(torch.index_select(patches.flatten(0, 1), 0, mask_indices_list))
        cls_after_head = self.teacher.dino_head(cls)
        cls_centered = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp)
        masked_centered = self.ibot_patch_loss.sinkhorn_knopp_teacher(
            masked_after_head, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_patches_tensor
        )
        return {
            "cls_pre_head": cls.unflatten(0, (n_crops, batch)),
            "cls_centered": cls_centered.unflatten(0, (n_crops, batch)),
            "masked_patch_centered": masked_centered,
        }

    def get_student_output(self, *, global_crops, local_crops, upperbound, masks, mask_indices_list):
        n_global, batch = global_crops.shape[:2]
        n_local = local_crops.shape[0]
        global_out, local_out = self.student.backbone(
            [global_crops.flatten(0, 1), local_crops.flatten(0, 1)],
            masks=[masks if not self.is_distillation_enabled else None, None],
            is_training=True,
        )
        masked_pre_head = torch.index_select(global_out["x_norm_patchtokens"].flatten(0, 1), 0, mask_indices_list)
        masked_after_head = self.student.ibot_head(masked_pre_head)
        g_cls, l_cls = global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]
        after_head = self.student.dino_head(torch.cat([g_cls, l_cls]))
        g_after, l_after = torch.split_with_sizes(after_head, [len(g_cls), len(l_cls)])
        student_global = {
            "cls_pre_head": g_cls.unflatten(0, (n_global, batch)),
            "cls_after_head": g_after.unflatten(0, (n_global, batch)),
            "masked_patch_after_head": masked_after_head,
        }
        student_local = {"cls_after_head": l_after.unflatten(0, (n_local, batch))}
        return student_global, student_local

    def compute_losses(
        self, *, teacher_global, student_global, student_local, masks, mask_indices_list, masks_weight, iteration
    ):
        n_global = student_global["cls_after_head"].shape[0]
        n_local = student_local["cls_after_head"].shape[0]
        global_terms = n_global * (n_global - 1) if self.dino_global_ignore_diagonal else n_global**2
        local_terms = n_global * n_local
        local_loss = self.dino_loss(
            student_logits=student_local["cls_after_head"], teacher_probs=teacher_global["cls_centered"]
        )
        global_loss = self.dino_loss(
            student_logits=student_global["cls_after_head"],
            teacher_probs=teacher_global["cls_centered"],
            ignore_diagonal=self.dino_global_ignore_diagonal,
        )
        koleo_loss = sum(self.koleo_loss(x) for x in student_global["cls_pre_head"]) / n_global
        ibot_loss = self.ibot_patch_loss.forward_masked(
            student_global["masked_patch_after_head"],
            teacher_global["masked_patch_centered"],
            student_masks_flat=masks,
            n_masked_patches=mask_indices_list.shape[0],
            masks_weight=masks_weight,
        )
        dino_weight = self.cfg.dino.loss_weight
        total = (
            dino_weight * local_terms / (global_terms + local_terms) * local_loss
            + dino_weight * global_terms / (global_terms + local_terms) * global_loss
            + self.cfg.dino.koleo_loss_weight * n_global * koleo_loss
            + self.cfg.ibot.loss_weight * ibot_loss
        )
        return total, {
            "dino_local_crops_loss": local_loss,
            "dino_global_crops_loss": global_loss,
            "koleo_loss": koleo_loss,
            "ibot_loss": ibot_loss,
        }

    def update_ema(self, m):
        if self.ema_params_lists is None:
            pairs = [
                (ps, pt)
                for k in self.student
                for ps, pt in zip(self.student[k].parameters(), self.model_ema[k].parameters())
            ]
            self.ema_params_lists = ([ps for ps, _ in pairs], [pt for _, pt in pairs])
        student_params, teacher_params = self.ema_params_lists
        with torch.no_grad():
            torch._foreach_mul_(teacher_params, m)
            torch._foreach_add_(teacher_params, student_params, alpha=1 - m)


class MultiDistillationMetaArch(SSLMetaArch):
    """DINOv3's multi-distillation meta-architecture (students in process subgroups): only its name and
    config flag matter here."""


def make_samples(n, *, n_local=2, n_tokens=16, seed=0, ratio=0.4):
    """``n`` dataset samples: two 16-px global crops, ``n_local`` 8-px local crops, and one mask (N,) per
    global crop (DINOv3 draws the masks in the collate function; they are drawn here so that a batch split
    over ranks holds the same masks as the whole batch). Sample 0's first crop has no masked patch."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        masks = [torch.rand(n_tokens, generator=g) < ratio for _ in range(2)]
        if i == 0:
            masks[0][:] = False
        samples.append(
            {
                "global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(n_local)],
                "masks": masks,
            }
        )
    return samples


def collate(samples):
    """What ``collate_data_and_cast`` hands to ``forward_backward``: crops stacked crop-major ([crop 0 of
    every sample, crop 1 of every sample, ...]), masks (2B, N) in the order of the global crops."""
    n_local = len(samples[0]["local_crops"])
    masks = torch.stack([s["masks"][i] for i in range(2) for s in samples])
    mask_indices_list = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": torch.stack([s["global_crops"][i] for i in range(2) for s in samples]),
        "collated_local_crops": torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]),
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
        "upperbound": int(masks.sum()),
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
        "global_batch_size": len(samples),
    }


def teacher_temp_schedule(iterations):
    """A per-iteration numpy schedule, as DINOv3's ``CosineScheduler`` gives: linear warm-up 0.04 -> 0.07
    over half the iterations, then constant (its elements are numpy float64)."""
    warmup = max(iterations // 2, 1)
    return np.concatenate([np.linspace(0.04, 0.07, warmup), np.full(iterations - warmup, 0.07)])
