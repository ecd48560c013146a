"""Two processes (gloo, CPU) give the loss, gradients and centers of one process on the
concatenated batch: every statistic is all-reduced, and DDP's gradient averaging matches. Each rank
counts the operations of its steps that would synchronise a GPU (none), and a rank with an empty
batch leaves the centers as the other rank's batch alone would."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sync_ops import SyncCounter

from vmf_head import DINOvMFLoss, iBOTvMFLoss

K, K2, NCROPS, NL, B, N, WORLD = 12, 10, 4, 2, 3, 5, 2
CENTERINGS = ("logit", "probability", "sinkhorn")


def _global_batch():
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    return {
        "student": torch.randn(NCROPS, WORLD * B, K, generator=g, dtype=f64),
        "teacher": torch.randn(2, WORLD * B, K, generator=g, dtype=f64) * 2,
        "s_norms": torch.rand(K, generator=g, dtype=f64) + 0.5,
        "t_norms": torch.rand(K, generator=g, dtype=f64) + 0.5,
        "s_patch": torch.randn(2, WORLD * B, N, K2, generator=g, dtype=f64),
        "t_patch": torch.randn(2, WORLD * B, N, K2, generator=g, dtype=f64),
        "s_local": torch.randn(NL, WORLD * B, K, generator=g, dtype=f64),
        "mask": torch.rand(2, WORLD * B, N, generator=g) < 0.5,
        "p_norms": torch.rand(K2, generator=g, dtype=f64) + 0.5,
    }


def _run(rows: slice) -> dict[str, torch.Tensor]:
    """Two steps of each loss on the batch rows ``rows`` (of every view); returns what to compare,
    with the number of syncing operations the steps (not the losses' construction) asked for."""
    data = _global_batch()
    out = {}
    counter = SyncCounter()
    for centering in CENTERINGS:
        loss_fn = DINOvMFLoss(K, NCROPS, 0.04, 0.07, 2, 3, p=8, centering=centering, backend="reference").double()
        for epoch in range(2):
            student = data["student"][:, rows].reshape(-1, K).clone().requires_grad_()
            s_norms = data["s_norms"].clone().requires_grad_()
            teacher = data["teacher"][:, rows].reshape(-1, K) * (1 + epoch)
            with counter:
                loss = loss_fn(student, teacher, epoch, s_norms, data["t_norms"])
                g_student, g_norms = torch.autograd.grad(loss, (student, s_norms))
            out[f"{centering}{epoch}/loss"] = loss.detach()
            out[f"{centering}{epoch}/g_student"] = g_student.view(NCROPS, -1, K)
            out[f"{centering}{epoch}/g_norms"] = g_norms
        out[f"{centering}/center"] = loss_fn.center.clone()
    ibot = iBOTvMFLoss(K, K2, 2, NL, 0.04, 0.07, 0.04, 0.07, 2, 3, p=8, backend="reference").double()
    s_cls = data["student"][:2, rows].reshape(-1, K).clone().requires_grad_()
    s_patch = data["s_patch"][:, rows].reshape(-1, N, K2).clone().requires_grad_()
    inputs = (
        (s_cls, s_patch),
        (data["teacher"][:, rows].reshape(-1, K), data["t_patch"][:, rows].reshape(-1, N, K2)),
        data["s_local"][:, rows].reshape(-1, K),
        [m for m in data["mask"][:, rows]],
    )
    with counter:
        losses = ibot(*inputs, 0, (data["s_norms"], data["p_norms"]), (data["t_norms"], data["p_norms"]))
        g_patch = torch.autograd.grad(losses["loss"], s_patch)[0]
    out["ibot/loss"] = losses["loss"].detach()
    out["ibot/g_patch"] = g_patch.view(2, -1, N, K2)
    out["ibot/center"], out["ibot/center2"] = ibot.center.clone(), ibot.center2.clone()
    out["syncs"] = sum(counter.syncs.values())
    return out


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_run(slice(rank * B, (rank + 1) * B)), f"{path}.{rank}")
        # rank 1 without samples (an uneven last batch): rank 0's batch alone decides the centers
        torch.save(_run(slice(0, B) if rank == 0 else slice(0, 0)), f"{path}.empty.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    path = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(WORLD)]
    single = _run(slice(None))
    assert [r.pop("syncs") for r in ranks] == [0, 0] and single.pop("syncs") == 0
    close = dict(rtol=1e-10, atol=1e-13)
    for key, value in single.items():
        name = key.split("/")[1]
        if name == "loss":  # the local losses average to the global one (equal local batches)
            torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD, value, **close)
        elif name in ("g_student", "g_patch"):  # DDP averages: rank r's gradient / WORLD is its slice
            parts = [r[key] / WORLD for r in ranks]
            torch.testing.assert_close(torch.cat(parts, dim=1), value, **close, msg=key)
        elif name == "g_norms":  # a parameter shared by the ranks: DDP's average
            torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD, value, **close, msg=key)
        else:  # centers: the same on every rank, and as with the whole batch
            for r in ranks:
                torch.testing.assert_close(r[key], value, **close, msg=key)


def test_an_empty_rank_leaves_the_centers_to_the_others(tmp_path):
    """B = 0 on one rank: no NaN anywhere, the centers on both ranks are those of one process on the
    other rank's batch, and the empty rank's losses are 0."""
    path = str(tmp_path / "rank")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{path}.empty.{r}") for r in range(WORLD)]
    alone = _run(slice(0, B))
    for key, value in alone.items():
        if key.endswith("center") or key.endswith("center2"):
            for r in ranks:
                torch.testing.assert_close(r[key], value, rtol=1e-10, atol=1e-13, msg=key)
        elif key.endswith("loss"):
            assert float(ranks[1][key]) == 0.0, key
