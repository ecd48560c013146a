"""KoLeo on the prototypes, forward + backward: chunked nearest neighbour against the whole K x K matrix.

Two candidates on the same (K, p) float32 prototypes: ``vmf_head.functional.koleo_prototype_loss``
(rows in chunks against all K prototypes, never a K x K matrix) and DINOv2's formulation written out
(``x @ x.T``, diagonal marked, row-wise max, ``nn.PairwiseDistance``), timed round-robin, medians over
the repeats, ratio against the full-matrix peer measured in the same run. The peer needs 4 K^2 bytes for
its matrix alone (16 GiB at K = 65536), so ``--peer-max-k`` (default 16384) skips it above that K.

Peak memory: on the CPU the growth of the peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs just before the step) over one forward + backward after a warm-up step, in a
fresh subprocess per candidate with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave
the resident set; on CUDA ``max_memory_allocated`` minus what was allocated before the step. The
prototypes themselves (4 K p bytes, 64 MiB at K = 65536, p = 256) exist before and are not counted.

    python benchmarks/koleo.py --threads 1                       # K = 65536, p = 256, and the peer at 16384
    python benchmarks/koleo.py --k 8192 16384 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from loss import _proc_status_kib
from torch import nn

from vmf_head.functional import koleo_prototype_loss


def full_matrix(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo loss with its K x K matrix (the peer)."""
    u = nn.functional.normalize(x, p=2, dim=1, eps=eps)
    dots = u @ u.T
    dots.fill_diagonal_(-1.0)
    distance = nn.PairwiseDistance(p=2, eps=1e-8)(u, u[dots.max(dim=1).indices])
    return -torch.log(distance + eps).mean()


CANDIDATES = {"vmf-head chunked": koleo_prototype_loss, "full K x K matrix (DINOv2)": full_matrix}


def _inputs(k: int, p: int, device: str) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(name: str, w: torch.Tensor) -> float:
    w.grad = None
    loss = CANDIDATES[name](w)
    loss.backward()
    return float(loss.detach())


def peak_memory_mib(name: str, k: int, p: int, device: str) -> float:
    w = _inputs(k, p, device)
    _step(name, w)  # first-call work (lazy imports, the gradient buffer) is not the step's memory
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(name, w)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    _step(name, w)
    return (_proc_status_kib("VmHWM") - before) / 1024


def _memory_in_subprocess(name: str, k: int, p: int, args: argparse.Namespace) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    argv = [sys.executable, __file__, "--memory-of", name, "--k", str(k), "--p", str(p), "--device", args.device]
    argv += ["--threads", str(args.threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[16384, 65536], help="numbers of prototypes")
    parser.add_argument("--p", type=int, default=256, help="prototype dimension")
    parser.add_argument("--peer-max-k", type=int, default=16384, help="largest K the full-matrix peer runs at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(peak_memory_mib(args.memory_of, args.k[0], args.p, args.device))
        return 0
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"KoLeo-proto fwd+bwd, p={args.p}, float32, {device}, torch {torch.__version__}, {args.repeats} repeats")
    print("| K | candidate | median s | min-max s | vs full matrix | peak MiB | loss |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for k in args.k:
        names = [n for n in CANDIDATES if k <= args.peer_max_k or n == "vmf-head chunked"]
        w = _inputs(k, args.p, args.device)
        times: dict[str, list[float]] = {n: [] for n in names}
        losses: dict[str, float] = {}
        for r in range(1 + args.repeats):  # round-robin, the first round a warm-up
            for name in names:
                _sync(args.device)
                start = time.perf_counter()
                losses[name] = _step(name, w)
                _sync(args.device)
                if r:
                    times[name].append(time.perf_counter() - start)
        peer = statistics.median(times[names[-1]]) if len(names) == 2 else None
        for name in names:
            med = statistics.median(times[name])
            mem = "-" if args.no_memory else f"{_memory_in_subprocess(name, k, args.p, args):.0f}"
            ratio = f"{med / peer:.2f}x" if peer else "- (not run: 4 K^2 bytes)"
            spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
            print(f"| {k} | {name} | {med:.2f} | {spread} | {ratio} | {mem} | {losses[name]:.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
