"""The DINOv3 and DINOv2 patches with every module of the student and teacher under FSDP2 ``fully_shard``
(``reshard_after_forward=True``, as DINOv3's ``prepare_for_distributed_training``, once also with the heads
compiled first, as it does): two gloo processes, each with half of the batch, train as one eager process
on the whole batch. DINOv2's own wrapper is FSDP1 pinned to a CUDA device (``device_id=local_rank``),
which cannot run here, so its patch is checked under FSDP2 too.

What the processes must agree on with the single process (1e-10; everything runs in float64): the mean
of their loss terms (each a mean over its own half, the halves equal in size), the prototype weights'
gradients (FSDP2 averages the ranks' gradients), the centers (global-batch statistics) and, through the
second step, the teacher targets that follow from both.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from standins import dinov2 as D2
from standins import dinov3 as D3

from vmf_head.integrations import dinov2 as vmf_dinov2
from vmf_head.integrations import dinov3 as vmf_dinov3

WORLD, BATCH, STEPS = 2, 4, 2
K, K2, P = 32, 24, 8
# (codebase, centering, heads compiled before sharding as DINOv3's cfg.train.compile does)
CASES = [
    ("dinov3", "sinkhorn", False),
    ("dinov3", "probability", True),
    ("dinov2", "probability", False),
    ("dinov2", "sinkhorn", False),
]
TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")  # the loss dicts' keys in both

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def _spread_norms(heads, seed):
    g = torch.Generator().manual_seed(seed)
    for head in heads:
        layer = head.last_layer
        with torch.no_grad():
            if hasattr(layer, "weight_g"):
                layer.weight_g.copy_(0.5 + 1.5 * torch.rand(layer.weight_g.shape, generator=g))
            else:
                layer.weight.mul_(
                    (0.5 + 1.5 * torch.rand(layer.weight.shape[0], 1, generator=g))
                    / layer.weight.norm(dim=1, keepdim=True)
                )


def _build(codebase, centering, compile):
    """The patched model, sharded when a process group exists; the same weights on every rank."""
    torch.manual_seed(0)
    if codebase == "dinov3":
        # KoLeo is a per-rank term by design: left out of a comparison with the whole batch
        model = D3.SSLMetaArch(D3.default_cfg(K, K2, P, koleo_loss_weight=0.0, compile=compile))
        model.init_weights()
        _spread_norms([model.student.dino_head, model.student.ibot_head], seed=1)
        model.model_ema.load_state_dict(model.student.state_dict())
        vmf_dinov3.patch(model, centering=centering)
        model.prepare_for_distributed_training()
        return model
    dinov2_centering = "sinkhorn_knopp" if centering == "sinkhorn" else "centering"
    model = D2.SSLMetaArch(D2.default_cfg(K, K2, separate_head=True, centering=dinov2_centering))
    _spread_norms([model.student.dino_head, model.student.ibot_head], seed=1)
    model.prepare_for_distributed_training()  # DINOv2's copies the student into the teacher
    vmf_dinov2.patch(model, centering=centering)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for modules in (model.student, model.teacher):
            for key in modules:
                fully_shard(modules[key], mesh=mesh, reshard_after_forward=True)
    return model


def _whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _run(codebase, centering, compile, rank, world):
    """STEPS training steps on this rank's part of the batch: per step the loss terms, the gradients of
    the student's prototype parameters and the centers after the step. In float64, so that what is
    compared is the mathematics, not the order in which sharded sums round in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _steps(codebase, centering, compile, rank, world)
    finally:
        torch.set_default_dtype(previous)


def _steps(codebase, centering, compile, rank, world):
    model = _build(codebase, centering, compile)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=0.05)
    history = []
    for step in range(STEPS):
        samples = D3.make_samples(BATCH, seed=step)
        batch = D3.collate(samples[rank * BATCH // world : (rank + 1) * BATCH // world])
        optimizer.zero_grad()
        if codebase == "dinov3":
            _, metrics = model.forward_backward(batch, teacher_temp=0.04 + 0.01 * step, iteration=step)
        else:
            metrics = model.forward_backward(batch, 0.04 + 0.01 * step)
        history.append(
            {
                "losses": {name: metrics[name].detach().clone() for name in TERMS},
                "grads": {
                    name: _whole(p.grad).clone() for name, p in model.student.named_parameters() if "last_layer" in name
                },
                "centers": {name: getattr(model, name).center.clone() for name in ("dino_loss", "ibot_patch_loss")},
            }
        )
        optimizer.step()
        if codebase == "dinov3":
            model.update_ema(0.7)
        else:
            model.update_teacher(0.7)
    return history


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({case: _run(*case, rank, world) for case in CASES}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_sharded_processes_train_as_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    for case in CASES:
        codebase, centering, _ = case
        single = _run(codebase, centering, False, rank=0, world=1)  # eager, unsharded
        for step, expected in enumerate(single):
            where = f"{case} step {step}"
            for name, value in expected["losses"].items():
                mean = sum(r[case][step]["losses"][name] for r in ranks) / WORLD
                torch.testing.assert_close(mean, value, rtol=0, atol=1e-10, msg=f"{where} {name}")
            for r in ranks:
                for kind in ("grads", "centers"):
                    for name, value in expected[kind].items():
                        torch.testing.assert_close(
                            r[case][step][kind][name], value, rtol=1e-10, atol=1e-10, msg=f"{where} {kind} {name}"
                        )
