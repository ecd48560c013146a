"""Bytes each Triton kernel launch reads and writes, counted by running the kernels in Triton's
interpreter with every load and store intercepted (no GPU needed). The table in
``docs/fused_loss.md`` ("The kernels on paper") comes from it.

For every launch of one step it reports, per pointer argument, the bytes its loads and stores
request (every masked-in lane of every ``tl.load``/``tl.store``; a K-vector re-read by many programs
counts each time: L2 traffic) and the distinct bytes they touch (each address once: what has to
cross DRAM when the re-reads hit in L2, the memory-bound model). The grids are the ones a GPU with
``--sms`` streaming multiprocessors gets (132: H100 SXM and H200), since the ops size them from the
SM count, and ``backend="auto"`` takes the kernels as it does for CUDA tensors (the loss's vMF
corrections). The ATen ops the step runs outside the kernels are listed with the bytes of their
tensor arguments and results (an upper bound: an in-place op's destination counts as read and
written). It also counts the lanes of floating-point arithmetic per launch, by dtype (exponentials,
logarithms, square roots, divisions; additions and multiplications together).

Steps (all float32, forward + backward):

* ``loss``: ``DINOvMFLoss(centering="probability", backend="triton")`` with prototype norms,
  B = 64, 2 + 8 crops, K = 65,536 (``--batch``, ``--k``), teacher = the 2 global crops;
* ``prototype``: ``prototype_log_normalizer(W, 0.1)`` on W of K x 256, then its backward;
* ``elementwise``: ``log_vmf_normalizer`` (value, then its derivative through autograd) on K values.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kernel_bytes.py [--steps loss prototype elementwise]
        [--batch 64] [--k 65536] [--sms 132] [--json PATH]

The interpreter runs every program in NumPy: the full sizes take about 17 minutes on one core here
(15 of them for the loss); ``--k 8192`` takes 2 minutes and gives the same bytes per element of the
B x K tensors (the small per-split outputs depend on the grid, which depends on K).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("kernel_bytes.py runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")

import numpy as np
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime import interpreter

import vmf_head
from vmf_head import DINOvMFLoss, _dispatch, log_vmf_normalizer, prototype_log_normalizer


@dataclass
class Traffic:
    """Loads or stores of one pointer argument in one launch."""

    itemsize: int
    numel: int
    requested: int = 0  # bytes, every masked-in lane
    touched: np.ndarray | None = None  # which elements were touched

    def add(self, index: np.ndarray) -> None:
        self.requested += index.size * self.itemsize
        if self.touched is None:
            self.touched = np.zeros(self.numel, dtype=bool)
        self.touched[index] = True

    @property
    def distinct(self) -> int:
        return 0 if self.touched is None else int(self.touched.sum()) * self.itemsize


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: dict[str, tuple[int, int, int]]  # name -> (first address, bytes, itemsize)
    loads: dict[str, Traffic] = field(default_factory=dict)
    stores: dict[str, Traffic] = field(default_factory=dict)
    # lanes of floating-point arithmetic by (dtype, operation), masked-off lanes included (a GPU
    # computes them too)
    ops: Counter = field(default_factory=Counter)

    def record(self, kind: dict[str, Traffic], ptrs: np.ndarray, mask: np.ndarray) -> None:
        addresses = np.broadcast_to(ptrs, np.broadcast_shapes(ptrs.shape, mask.shape))[
            np.broadcast_to(mask, np.broadcast_shapes(ptrs.shape, mask.shape))
        ].astype(np.int64)
        if addresses.size == 0:
            return
        lo, hi = int(addresses.min()), int(addresses.max())
        # the tightest argument holding every address (two arguments may be views of one buffer)
        holders = [(nbytes, name) for name, (base, nbytes, _) in self.args.items() if base <= lo and hi < base + nbytes]
        if not holders:
            raise RuntimeError(f"{self.kernel}: an access at {lo:#x}..{hi:#x} outside every tensor argument")
        name = min(holders)[1]
        base, nbytes, itemsize = self.args[name]
        if name not in kind:
            kind[name] = Traffic(itemsize, nbytes // itemsize)
        kind[name].add((addresses - base) // itemsize)


LAUNCHES: list[Launch] = []
_current: list[Launch] = []


def _extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to its last, whatever its strides."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def _instrument() -> None:
    """Wrap the interpreter's masked loads and stores and its launches (Triton's interpreter API)."""
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(self, ptrs, mask, other, *rest):
        _current[-1].record(_current[-1].loads, ptrs.data, mask.data)
        return load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        _current[-1].record(_current[-1].stores, ptrs.data, mask.data)
        return store(self, ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store

    binary, unary, fma = builder.binary_op, builder.unary_op, builder.create_fma

    def count(dtype, name: str, lanes: int) -> None:
        if dtype.is_floating() and _current:
            _current[-1].ops[(str(dtype), name)] += lanes

    def binary_op(self, lhs, rhs, op):
        out = binary(self, lhs, rhs, op)
        count(out.dtype, op.__name__, out.data.size)
        return out

    def unary_op(self, arg, op):
        out = unary(self, arg, op)
        count(out.dtype, op.__name__, out.data.size)
        return out

    def create_fma(self, x, y, z):
        out = fma(self, x, y, z)
        count(out.dtype, "fma", out.data.size)
        return out

    builder.binary_op, builder.unary_op, builder.create_fma = binary_op, unary_op, create_fma

    init_args = interpreter.GridExecutor._init_args_hst
    call = interpreter.GridExecutor.__call__

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _current[-1].args = {
            name: (t.data_ptr(), _extent(t), t.element_size())
            for name, t in kwargs_hst.items()
            if isinstance(t, torch.Tensor)
        }
        return args_hst, kwargs_hst

    def launch(self, *args, **kwargs):
        grid = self.grid if not callable(self.grid) else ("callable",)
        _current.append(Launch(self.fn.__name__, tuple(grid), {}))
        try:
            with _disable_current_modes():  # the interpreter's own copies are not the step's
                return call(self, *args, **kwargs)
        finally:
            LAUNCHES.append(_current.pop())

    interpreter.GridExecutor._init_args_hst = init_args_hst
    interpreter.GridExecutor.__call__ = launch


def _auto_as_on_cuda() -> None:
    """``backend="auto"`` takes the kernels as it does for CUDA tensors (the loss computes its vMF
    corrections with the normaliser's default backend)."""
    original = _dispatch.use_triton

    def use_triton(backend: str, op: str, device: torch.device, unsupported: str = "") -> bool:
        if backend == "auto":
            return not unsupported and not _dispatch.problem(op, device)
        return original(backend, op, device, unsupported)

    _dispatch.use_triton = use_triton


def _set_sms(sms: int) -> None:
    """Grids as on a GPU with ``sms`` streaming multiprocessors: the ops aim at a number of programs
    per SM (``target_programs`` in every kernel module that sizes grids from it)."""
    programs = vmf_head.ops._launch._PROGRAMS_PER_SM * sms
    for name, module in list(sys.modules.items()):
        if name.startswith("vmf_head.ops") and hasattr(module, "target_programs"):
            module.target_programs = lambda device, programs=programs: programs


_ARITH = {"add", "subtract", "multiply", "fma"}

# ATen ops that only make a view or an allocation: no traffic.
_NO_TRAFFIC = {"empty", "empty_strided", "empty_like", "new_empty", "detach", "alias", "lift_fresh"}


class AtenBytes(TorchDispatchMode):
    """ATen ops outside the kernels (the custom operators are entered, so their own torch ops
    count too) with the bytes of their tensor arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vmf_head":  # run the operator's Python implementation, seen by this mode
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        view = func.is_view or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if name not in _NO_TRAFFIC and not view:
            leaves = [*args, *kwargs.values()]
            flat = [x for a in leaves for x in (a if isinstance(a, (list, tuple)) else [a])]
            read = sum(x.numel() * x.element_size() for x in flat if isinstance(x, torch.Tensor))
            results = out if isinstance(out, (list, tuple)) else [out]
            written = sum(x.numel() * x.element_size() for x in results if isinstance(x, torch.Tensor))
            self.ops.append((f"{name}.{func._overloadname}", read, written))
        return out


def step_loss(batch: int, k: int) -> Callable[[], None]:
    ncrops, g = 10, torch.Generator().manual_seed(0)
    student = (0.3 * torch.randn(ncrops * batch, k, generator=g)).requires_grad_()
    teacher = 0.3 * torch.randn(2 * batch, k, generator=g)
    norms = 1.0 + 0.2 * torch.rand(k, generator=g)
    s_norms = norms.clone().requires_grad_()
    loss_fn = DINOvMFLoss(k, ncrops, 0.04, 0.07, 30, 100, p=256, centering="probability", backend="triton")
    return lambda: loss_fn(student, teacher, 0, s_norms, norms).backward()


def step_prototype(k: int) -> Callable[[], None]:
    w = torch.randn(k, 256, generator=torch.Generator().manual_seed(0)).div_(16).requires_grad_()
    grad = torch.ones(k)
    return lambda: prototype_log_normalizer(w, 0.1, backend="triton").backward(grad)


def step_elementwise(k: int) -> Callable[[], None]:
    kappa = torch.logspace(-2, 3, k).requires_grad_()
    grad = torch.ones(k)
    return lambda: log_vmf_normalizer(kappa, 256, backend="triton").backward(grad)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f}"


def report(title: str, launches: list[Launch], aten: list[tuple[str, int, int]]) -> dict:
    print(f"\n### {title}\n")
    print("| # | kernel | grid | argument: distinct MB read (requested) | MB written | distinct MB in / out |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows, total_in, total_out = [], 0, 0
    for i, launch in enumerate(launches, 1):
        reads = ", ".join(
            f"{n} {_mb(t.distinct)}" + (f" ({_mb(t.requested)})" if t.requested != t.distinct else "")
            for n, t in sorted(launch.loads.items(), key=lambda kv: -kv[1].requested)
        )
        writes = ", ".join(f"{n} {_mb(t.distinct)}" for n, t in sorted(launch.stores.items()))
        d_in = sum(t.distinct for t in launch.loads.values())
        d_out = sum(t.distinct for t in launch.stores.values())
        total_in, total_out = total_in + d_in, total_out + d_out
        print(f"| {i} | {launch.kernel} | {launch.grid} | {reads} | {writes} | {_mb(d_in)} / {_mb(d_out)} |")
        rows.append(
            {
                "kernel": launch.kernel,
                "grid": list(launch.grid),
                "loads": {n: {"distinct": t.distinct, "requested": t.requested} for n, t in launch.loads.items()},
                "stores": {n: {"distinct": t.distinct, "requested": t.requested} for n, t in launch.stores.items()},
                "float_ops": {f"{dtype} {op}": lanes for (dtype, op), lanes in sorted(launch.ops.items())},
            }
        )
    print(f"\nkernels: {len(launches)} launches, {_mb(total_in)} MB read and {_mb(total_out)} MB written (distinct)")
    print("floating-point lanes per launch (exp, log, sqrt, divide; add, subtract, multiply and fma together):")
    for i, launch in enumerate(launches, 1):
        totals: Counter = Counter()
        for (dtype, op), lanes in launch.ops.items():
            kind = op if op in ("exp", "log", "sqrt", "divide") else "add/mul" if op in _ARITH else None
            if kind:
                totals[f"{dtype} {kind}"] += lanes
        print(f"  {i} {launch.kernel}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(totals.items())))
    aten_in, aten_out = sum(r for _, r, _ in aten), sum(w for _, _, w in aten)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, r, w in aten:
        counts[name][0] += 1
        counts[name][1] += r
        counts[name][2] += w
    listing = ", ".join(f"{n} x{c} ({_mb(r + w)} MB)" for n, (c, r, w) in counts.items())
    print(f"ATen ops outside the kernels: {len(aten)}, {_mb(aten_in)} MB in / {_mb(aten_out)} MB out: {listing}")
    return {"title": title, "launches": rows, "aten_ops": aten, "kernel_bytes": [total_in, total_out]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", default=["loss", "prototype", "elementwise"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (132: H100 SXM, H200)")
    parser.add_argument("--json", help="write the counts as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _instrument()
    _auto_as_on_cuda()
    steps = {
        "loss": (
            f"DINOvMFLoss (probability + vMF), B = {args.batch}, 2 + 8 crops, K = {args.k}, float32, fwd + bwd",
            lambda size: step_loss(args.batch if size else 2, size or 256),
        ),
        "prototype": (
            f"prototype_log_normalizer, W = {args.k} x 256 float32, fwd + bwd",
            lambda size: step_prototype(size or 256),
        ),
        "elementwise": (
            f"log_vmf_normalizer, {args.k} float32 values, value + derivative",
            lambda size: step_elementwise(size or 256),
        ),
    }
    results = []
    for name in args.steps:
        title, make = steps[name]
        make(0)()  # a small warm-up: imports the kernels, uploads the normaliser's constants
        _set_sms(args.sms)
        run = make(args.k)
        LAUNCHES.clear()
        start = time.perf_counter()
        with AtenBytes() as aten:
            run()
        results.append(report(title, list(LAUNCHES), aten.ops))
        print(f"({time.perf_counter() - start:.0f} s in the interpreter)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sms": args.sms, "steps": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
