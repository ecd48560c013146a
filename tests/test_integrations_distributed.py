"""The centers of lightly's patched iBOT term and of solo-learn's patched DINO loss under
torch.distributed (2 gloo processes on the CPU), against lightly's ``IBOTPatchLoss`` and solo-learn's
``DINOLoss`` (stand-in) run in the same process group: with equal norms and logit centering both move
their centers as the codebases do, rank by rank, though the ranks hold different numbers of masked
tokens; a rank without masked tokens leaves lightly's center to the other rank's tokens, where
lightly's own center becomes NaN."""

from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from standins import solo as S

K, WORLD = 16, 2


def _ibot(rank: int) -> dict[str, torch.Tensor]:
    from lightly.loss import IBOTPatchLoss
    from lightly.models.modules import DINOv2ProjectionHead

    from vmf_head.integrations import lightly as vmf_lightly

    torch.manual_seed(0)
    heads = [DINOv2ProjectionHead(6, 12, 4, K) for _ in range(2)]
    for head in heads:  # equal, frozen norms: the iBOT-vMF term is lightly's
        head.last_layer.weight_g.requires_grad = False
    lightly_loss = IBOTPatchLoss(K, center_momentum=0.8)
    patched = vmf_lightly.patch_ibot(*heads, IBOTPatchLoss(K, center_momentum=0.8), centering="logit")
    g = torch.Generator().manual_seed(10 + rank)
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)
    mask.view(-1)[: 3 + 4 * rank] = True  # 3 masked tokens on rank 0, 7 on rank 1
    teacher_out, student_out = torch.randn(2, int(mask.sum()), K, generator=g)
    out = {
        "ibot/loss": patched(teacher_out, student_out, mask),
        "ibot/codebase_loss": lightly_loss(teacher_out, student_out, mask),
        "ibot/center": patched.center.value.clone(),
        "ibot/codebase_center": lightly_loss.center.value.clone(),
        "ibot/mean": teacher_out.mean(0, keepdim=True),
    }
    if rank == 1:  # a step where rank 1 has no masked token; rank 0 repeats its tokens
        mask[:] = False
    rows = int(mask.sum())
    patched(teacher_out[:rows], student_out[:rows], mask)
    out["ibot/center_after_empty"] = patched.center.value.clone()
    return out


def _solo(rank: int) -> dict[str, torch.Tensor]:
    from vmf_head.integrations import FrozenNormsWarning
    from vmf_head.integrations import solo as vmf_solo

    methods = []
    for patch in (False, True):
        torch.manual_seed(0)
        method = S.DINO(S.config(num_prototypes=K, norm_last_layer=True))
        if patch:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FrozenNormsWarning)
                method = vmf_solo.patch(method, centering="logit")
        method.current_epoch = 1
        method.on_train_epoch_start()
        methods.append(method)
    batch = S.batch(seed=20 + rank)
    with torch.no_grad():
        losses = [method.training_step(batch, 0) for method in methods]
    return {
        "solo/codebase_loss": losses[0],
        "solo/loss": losses[1],
        "solo/codebase_center": methods[0].dino_loss_func.center.clone(),
        "solo/center": methods[1].dino_loss_func.center.clone(),
    }


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save({**_ibot(rank), **_solo(rank)}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_centers_move_as_lightlys_and_solo_learns_across_ranks(tmp_path):
    path = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(WORLD)]
    for out in ranks:
        for name in ("ibot", "solo"):
            torch.testing.assert_close(out[f"{name}/loss"], out[f"{name}/codebase_loss"], atol=2e-6, rtol=1e-6)
            torch.testing.assert_close(out[f"{name}/center"], out[f"{name}/codebase_center"], atol=1e-6, rtol=1e-6)
        # rank 1 without masked tokens: the center moves by rank 0's mean alone, the same on both ranks
        expected = 0.8 * out["ibot/center"] + 0.2 * ranks[0]["ibot/mean"]
        torch.testing.assert_close(out["ibot/center_after_empty"], expected, atol=1e-6, rtol=1e-6)
    # 3 and 7 masked tokens: the center moved by the mean of the ranks' means (lightly's Center), not by
    # the mean over all 10 tokens
    mean_of_means = (ranks[0]["ibot/mean"] + ranks[1]["ibot/mean"]) / 2
    torch.testing.assert_close(ranks[0]["ibot/center"], 0.2 * mean_of_means, atol=1e-7, rtol=1e-6)
    token_mean = (3 * ranks[0]["ibot/mean"] + 7 * ranks[1]["ibot/mean"]) / 10
    assert not torch.allclose(ranks[0]["ibot/center"], 0.2 * token_mean, atol=1e-4)
