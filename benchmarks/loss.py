"""DINO-vMF loss, forward + backward, against DINO's and lightly's losses, eager and compiled
(docs/design.md, section 6).

Every candidate gets the same inputs (student ``(ncrops * B, K)``, teacher ``(2 * B, K)``, prototype
norms for the vMF candidates) and is timed forward + backward, round-robin over the candidates so that
noise from other processes spreads evenly; medians and min-max over the repeats, and ratios against
DINO's eager loss and ``torch.compile`` of it, measured in the same run. Every eager candidate is also
a compiled one: ``torch.compile`` of the loss call, as a user would try it first. On a shared 2-core
machine time with ``--threads 1`` (torch's two threads slow down many-fold when another process runs).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory held before the step; on the
CPU the growth of the peak resident set (Linux VmHWM, reset before the step) over one step after a
warm-up step, measured in a fresh subprocess per candidate with glibc's mmap threshold fixed at
128 KiB so that freed tensors leave the resident set (tracemalloc does not see torch's allocations).

Candidates are a list (``CANDIDATES``); a fused peer is one more ``Candidate``. The bytes each eager
candidate moves: ``benchmarks/traffic.py``.

    python benchmarks/loss.py --threads 1              # CPU, B=64, 2+8 crops, K=65536, float32
    python benchmarks/loss.py --threads 1 --scale 1    # peaked teachers: t / 0.04 spans +-125
    python benchmarks/loss.py --device cuda --repeats 20

The allocator (CPU). A step's (V B, K) tensors are 160 MiB: glibc maps such a block on allocation and
unmaps it on free, so each step pays the kernel's page faults and zeroing (about 60 ms for 160 MiB on
one thread here) unless the process happens to reuse memory, which depends on what ran in it before:
measured alone or round-robin, the same candidate can differ 2-3x, and not by the same factor for
every candidate. ``--allocator steady`` (the default) runs the timing in a process whose heap never
returns memory to the system (``MALLOC_MMAP_MAX_=0``, a huge ``MALLOC_TRIM_THRESHOLD_``): no page
faults after the warm-up, the steady state of a training loop, and the CPU's analogue of CUDA's
caching allocator; ``--allocator system`` keeps glibc's defaults.

``--scale`` is the standard deviation of the raw outputs w^T y (0.3 by default). At 1, the teacher's
logits t / 0.04 span about +-125 and most of its probabilities are below float32's normal range
(subnormal numbers, which slow a CPU's arithmetic on them tenfold or more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vmf_head import DINOvMFLoss

Step = Callable[[torch.Tensor], torch.Tensor]  # student output (requires grad) -> scalar loss


@dataclass
class Inputs:
    student: torch.Tensor  # (ncrops * B, K)
    teacher: torch.Tensor  # (2 * B, K)
    student_norms: torch.Tensor  # (K,), requires grad
    teacher_norms: torch.Tensor  # (K,)
    ncrops: int
    epoch: int = 0


@dataclass
class Candidate:
    name: str
    make: Callable[[Inputs], Step]
    devices: tuple[str, ...] = ("cpu", "cuda")
    compiled: bool = False


def compiled(candidate: Candidate) -> Candidate:
    """``candidate`` under ``torch.compile`` (Inductor, default options), as a user would try it first:
    the loss call is compiled, its backward through AOTAutograd; the warm-up steps compile."""

    def make(x: Inputs) -> Step:
        return torch.compile(candidate.make(x))

    return Candidate(f"{candidate.name}, torch.compile", make, candidate.devices, compiled=True)


class EagerDINOLoss(torch.nn.Module):
    """DINO's ``DINOLoss`` as facebookresearch/dino computes it (re-implemented from its behaviour):
    numpy temperature schedule, softmax of the centerd teacher, a log-softmax per (teacher view,
    student view) pair, EMA of the mean raw teacher output (single process)."""

    def __init__(self, out_dim, ncrops, warm, final, warm_epochs, nepochs, student_temp=0.1, momentum=0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.momentum = ncrops, student_temp, momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.schedule = np.concatenate((np.linspace(warm, final, warm_epochs), np.ones(nepochs - warm_epochs) * final))

    def forward(self, student_output, teacher_output, epoch):
        student = (student_output / self.student_temp).chunk(self.ncrops)
        teacher = F.softmax((teacher_output - self.center) / self.schedule[epoch], dim=-1).detach().chunk(2)
        total, terms = 0, 0
        for i, q in enumerate(teacher):
            for j, v in enumerate(student):
                if i != j:
                    total = total + torch.sum(-q * F.log_softmax(v, dim=-1), dim=-1).mean()
                    terms += 1
        with torch.no_grad():
            self.center = self.center * self.momentum + teacher_output.mean(0, keepdim=True) * (1 - self.momentum)
        return total / terms


def _dino_eager(x: Inputs) -> Step:
    loss = EagerDINOLoss(x.student.shape[1], x.ncrops, 0.04, 0.07, 30, 100).to(x.student.device)
    return lambda s: loss(s, x.teacher, x.epoch)


def _lightly(x: Inputs) -> Step:
    from lightly.loss import DINOLoss

    loss = DINOLoss(x.student.shape[1], 0.04, 0.07, 30, 0.1, 0.9).to(x.student.device)
    teacher = list(x.teacher.chunk(2))
    return lambda s: loss(teacher, list(s.chunk(x.ncrops)), epoch=x.epoch)


def _vmf(centering: str, norms: bool, backend: str = "reference") -> Callable[[Inputs], Step]:
    def make(x: Inputs) -> Step:
        loss = DINOvMFLoss(
            x.student.shape[1], x.ncrops, 0.04, 0.07, 30, 100, p=256, centering=centering, backend=backend
        )
        loss = loss.to(x.student.device)
        if norms:
            return lambda s: loss(s, x.teacher, x.epoch, x.student_norms, x.teacher_norms)
        return lambda s: loss(s, x.teacher, x.epoch)

    return make


_EAGER = [
    Candidate("DINO eager", _dino_eager),
    Candidate("lightly DINOLoss", _lightly),
    Candidate("vmf-head reference, DINO (logit, no norms)", _vmf("logit", False)),
    Candidate("vmf-head reference, DINO-vMF (probability + vMF)", _vmf("probability", True)),
]
CANDIDATES: list[Candidate] = _EAGER + [compiled(c) for c in _EAGER]
BASELINE = "DINO eager"
COMPILED_BASELINE = "DINO eager, torch.compile"


def make_inputs(args: argparse.Namespace) -> Inputs:
    g = torch.Generator().manual_seed(0)
    ncrops = 2 + args.local_crops
    k = args.out_dim
    # Raw outputs w^T y of unit y and prototypes of norm about 1: values in about [-1, 1].
    student = (torch.randn(ncrops * args.batch, k, generator=g) * args.scale).to(args.device, args.dtype)
    teacher = (torch.randn(2 * args.batch, k, generator=g) * args.scale).to(args.device, args.dtype)
    norms = torch.rand(k, generator=g) + 0.5
    return Inputs(student, teacher, norms.to(args.device).requires_grad_(), norms.to(args.device) * 1.01, ncrops)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _one_step(step: Step, x: Inputs) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward."""
    student = x.student.detach().clone().requires_grad_()
    x.student_norms.grad = None
    _sync(str(x.student.device.type))
    start = time.perf_counter()
    loss = step(student)
    loss.backward()
    _sync(str(x.student.device.type))
    return time.perf_counter() - start, float(loss.detach())


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cuda_peak_mib(step: Step, student: torch.Tensor) -> float:
    """Peak CUDA memory of one forward + backward of ``step`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(student).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_memory_mib(name: str, args: argparse.Namespace) -> float:
    """Extra memory one step (after a warm-up step) needs at its peak, in MiB.

    CPU: the peak resident set (VmHWM) is reset through /proc/self/clear_refs after the inputs exist,
    so the value is the step's own peak minus the resident set before it (ru_maxrss cannot be reset,
    and a child process inherits its parent's)."""
    x = make_inputs(args)
    step = next(c for c in CANDIDATES if c.name == name).make(x)
    _one_step(step, x)  # first-call work (lazy imports, caches) is not the step's memory
    student = x.student.detach().clone().requires_grad_()
    if args.device == "cuda":
        return cuda_peak_mib(step, student)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step(student).backward()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _memory_in_subprocess(name: str, argv: list[str]) -> float:
    # A fixed glibc mmap threshold: every block >= 128 KiB is mapped on allocation and unmapped on
    # free, so the resident set follows the live tensors (by default glibc raises the threshold
    # after the first large free and keeps later blocks of up to 32 MiB resident).
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", name], check=True, capture_output=True, text=True, env=env
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--scale", type=float, default=0.3, help="standard deviation of the raw outputs w^T y")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument(
        "--allocator",
        choices=["steady", "system"],
        default="steady",
        help="steady: a heap that keeps its memory (no page faults per step); system: glibc's defaults",
    )
    parser.add_argument("--only", nargs="*", help="names of the candidates to run (default: all for the device)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    steady = os.environ.get("MALLOC_MMAP_MAX_") == "0"
    if args.allocator == "steady" and args.device == "cpu" and not steady and not args.memory_of:
        # glibc reads these when the process starts: run again with them
        env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
        return subprocess.run([sys.executable, __file__, *raw], env=env, check=False).returncode
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(peak_memory_mib(args.memory_of, args))
        return 0

    candidates = [
        c
        for c in CANDIDATES
        if args.device in c.devices and (not args.only or c.name in args.only) and not (args.no_compile and c.compiled)
    ]
    x = make_inputs(args)
    steps = {c.name: c.make(x) for c in candidates}
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for r in range(args.warmup + args.repeats):
        for name, step in steps.items():
            seconds, losses[name] = _one_step(step, x)
            if r >= args.warmup:
                times[name].append(seconds)
    memory_argv = [a for a in raw if a != "--no-memory"]
    memory = {} if args.no_memory else {name: _memory_in_subprocess(name, memory_argv) for name in steps}

    bases = {b: statistics.median(times[b]) for b in (BASELINE, COMPILED_BASELINE) if b in times}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"loss fwd+bwd, B={args.batch}, 2+{args.local_crops} crops, K={args.out_dim}, {str(args.dtype)[6:]}, "
        f"outputs with std {args.scale:g}, "
        f"{device}, torch {torch.__version__}, {args.repeats} repeats after {args.warmup} warm-up"
        + (f", {args.allocator} allocator" if args.device == "cpu" else "")
    )
    mem_what = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS growth, VmHWM"
    versus = " | ".join(f"vs {b}" for b in bases)
    print(f"| candidate | median ms | min-max ms | {versus} | peak MiB ({mem_what}) | loss |")
    print("| --- | ---: | ---: | " + "---: | " * len(bases) + "---: | ---: |")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = {b: med / base for b, base in bases.items()}
        mem = f"{memory[name]:.0f}" if name in memory else "-"
        spread = f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}"
        cells = " | ".join(f"{r:.2f}x" for r in ratios.values())
        print(f"| {name} | {med * 1e3:.0f} | {spread} | {cells} | {mem} | {losses[name]:.6f} |")
        rows.append(
            {
                "name": name,
                "times_s": ts,
                "median_s": med,
                "ratios": ratios,
                "peak_mib": memory.get(name),
                "loss": losses[name],
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "device": device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
