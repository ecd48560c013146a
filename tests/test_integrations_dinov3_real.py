"""The one-line patch on facebookresearch/dinov3's own ``SSLMetaArch``, where a checkout is at hand.

DINOv3 is a repository, not a package, so these tests run only with ``DINOV3_REPO`` pointing at a
checkout (and its dependencies ``omegaconf`` and ``termcolor`` installed); otherwise they skip saying
so. On the CPU, DINOv3's ``forward_backward`` moves the batch with ``.cuda()``, made the identity here,
and its iBOT Sinkhorn all-reduces unconditionally, so a one-process gloo group is started.
``prepare_for_distributed_training`` builds CUDA device meshes: the FSDP2 test shards with a CPU mesh the
way it shards (``fully_shard`` per module, ``reshard_after_forward=True``). The model is a ViT-S/16 on
64-px crops, heads of 64 and 48 prototypes with p = 16, built on the meta device and NaN-filled as
``main`` does.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vmf_head.integrations import dinov3 as vmf_dinov3

REPO = os.environ.get("DINOV3_REPO")
TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")


def _import_dinov3():
    if not REPO:
        pytest.skip("set DINOV3_REPO to a facebookresearch/dinov3 checkout to run its own SSLMetaArch")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        return importlib.import_module("dinov3.train.ssl_meta_arch"), importlib.import_module("dinov3.data.collate")
    except ImportError as error:
        pytest.skip(f"DINOv3 at {REPO} does not import: {error}")


@pytest.fixture
def dinov3_on_cpu(monkeypatch):
    modules = _import_dinov3()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield modules
    if started:
        dist.destroy_process_group()


def _cfg():
    from dinov3.configs import get_default_config
    from omegaconf import OmegaConf

    return OmegaConf.merge(
        get_default_config(),
        OmegaConf.create(
            {
                "student": {
                    "arch": "vit_small",
                    "drop_path_rate": 0.0,
                    "pos_embed_rope_dtype": "fp32",
                    "n_storage_tokens": 2,
                },
                "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 2},
                "dino": {
                    "head_n_prototypes": 64,
                    "head_bottleneck_dim": 16,
                    "head_hidden_dim": 32,
                    "koleo_loss_weight": 0.0,
                },
                "ibot": {"head_n_prototypes": 48, "head_bottleneck_dim": 16, "head_hidden_dim": 32},
                "train": {"compile": False},
            }
        ),
    )


def _build(meta_arch, centering, equal_norms):
    """DINOv3's ``main`` order on the CPU: meta device, (patch), NaN fill, ``init_weights``."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = meta_arch.SSLMetaArch(_cfg())
        if centering:
            vmf_dinov3.patch(model, centering=centering)
    model._apply(lambda t: torch.full_like(t, math.nan, device="cpu"), recurse=True)
    torch.manual_seed(1)
    model.init_weights()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key in ("dino_head", "ibot_head"):
            weight = model.student[key].last_layer.weight
            scale = 1.3 if equal_norms else 0.5 + 1.5 * torch.rand(weight.shape[0], 1, generator=g)
            weight.copy_(weight / weight.norm(dim=1, keepdim=True) * scale)
    model.model_ema.load_state_dict(model.student.state_dict())
    return model


def _batch(collate, seed, n=4):
    """DINOv3's ``collate_data_and_cast`` on random crops, with its own mask generator."""
    import random

    from dinov3.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, 64, 64, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 32, 32, generator=g) for _ in range(2)],
            },
            None,
        )
        for _ in range(n)
    ]
    random.seed(seed)
    data = collate.collate_data_and_cast(
        samples,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        dtype=torch.float32,
        n_tokens=16,
        mask_generator=MaskingGenerator(input_size=(4, 4), max_num_patches=8),
    )
    return data | {"global_batch_size": n}


def _share(data, rank, world):
    """This rank's samples of a collated batch (crops are stacked crop-major), masks and their indices."""
    n = data["global_batch_size"]
    rows = slice(rank * n // world, (rank + 1) * n // world)
    crops = {
        key: data[key].unflatten(0, (-1, n))[:, rows].flatten(0, 1)
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks")
    }
    masks = crops["collated_masks"]
    indices = masks.flatten().nonzero().flatten()
    return crops | {
        "mask_indices_list": indices,
        "upperbound": data["upperbound"],
        "global_batch_size": n,
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.full((1,), fill_value=indices.shape[0], dtype=torch.long),
    }


def _metrics(metrics):
    return {name: float(metrics[name].detach()) for name in TERMS}


def test_equal_norms_give_dinov3s_own_train_step(dinov3_on_cpu):
    meta_arch, collate = dinov3_on_cpu
    plain, patched = _build(meta_arch, None, True), _build(meta_arch, "sinkhorn", True)
    for model in (plain, patched):
        model.train()
    _, metrics = patched.forward_backward(_batch(collate, 0), teacher_temp=0.04, iteration=0)
    _, metrics_plain = plain.forward_backward(_batch(collate, 0), teacher_temp=0.04, iteration=0)
    assert _metrics(metrics) == pytest.approx(_metrics(metrics_plain), abs=1e-5)
    for name, param in patched.student.backbone.named_parameters():
        expected = plain.student.backbone.get_parameter(name).grad
        # float32 noise through 12 blocks, relative to each tensor's scale (some, as key biases, are ~0)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("centering", ["sinkhorn", "probability", "logit"])
def test_every_centering_trains_in_dinov3s_train_step(dinov3_on_cpu, centering):
    meta_arch, collate = dinov3_on_cpu
    model = _build(meta_arch, centering, False)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    for it in range(2):
        optimizer.zero_grad()
        model.train()
        loss, _ = model.forward_backward(_batch(collate, it), teacher_temp=0.04 + 0.01 * it, iteration=it)
        assert torch.isfinite(loss) and model.student.dino_head.last_layer.weight.grad.norm() > 0
        optimizer.step()
        model.update_ema(0.9)
    if centering == "probability":
        torch.testing.assert_close(model.ibot_patch_loss.center.sum(), torch.tensor(1.0))


def _run(centering, rank, world):
    meta_arch, collate = _import_dinov3()
    model = _build(meta_arch, centering, False)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for modules in (model.student, model.model_ema):
            for key in modules:
                fully_shard(modules[key], mesh=mesh, reshard_after_forward=True)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    history = []
    for it in range(2):
        optimizer.zero_grad()
        model.train()
        _, metrics = model.forward_backward(
            _share(_batch(collate, it), rank, world), teacher_temp=0.04 + 0.01 * it, iteration=it
        )
        grads = {
            name: getattr(p.grad, "full_tensor", lambda p=p: p.grad)().clone()
            for name, p in model.student.named_parameters()
            if "last_layer" in name
        }
        history.append((_metrics(metrics), grads, model.dino_loss.center.clone(), model.ibot_patch_loss.center.clone()))
        optimizer.step()
        model.update_ema(0.9)
    return history


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({c: _run(c, rank, world) for c in ("sinkhorn", "probability")}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_on_dinov3s_own_model(dinov3_on_cpu, tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for centering in ("sinkhorn", "probability"):
        for step, (losses, grads, center, center2) in enumerate(_run(centering, 0, 1)):
            for name, value in losses.items():
                assert sum(r[centering][step][0][name] for r in ranks) / 2 == pytest.approx(value, abs=1e-5)
            for r in ranks:
                for name, value in grads.items():
                    torch.testing.assert_close(r[centering][step][1][name], value, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(r[centering][step][2], center, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(r[centering][step][3], center2, rtol=1e-5, atol=1e-7)
