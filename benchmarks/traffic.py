"""Memory traffic of a step, counted at the ATen level: the bytes its operators read and write.

Every ATen operator that reaches the dispatcher passes through a ``TorchDispatchMode``. For each call
the counter adds the bytes of the tensors the operator reads (its tensor arguments) and writes (its
fresh outputs, and the arguments its schema marks as written: in-place ``self``, ``out=``), counting
only tensors of at least ``min_numel`` elements: the B x K tensors a loss step is made of, not its
(K,) vectors. A view (``view``, ``expand``, ``transpose``, ...) moves nothing; a tensor is counted
with the bytes its storage can hold at most (an expanded (K,) vector is K values, not B x K).

This is the traffic of the operators as written, each one reading its inputs from memory and writing
its outputs back: what an eager step costs when its tensors exceed the caches, and an upper bound
for a compiled step (which fuses operators). One view of the multi-crop loss at the benchmark's
shapes is B x K = 64 x 65536 float32 = 16 MiB.

    python benchmarks/traffic.py                # per candidate of benchmarks/loss.py, CPU, float32
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operators that take a tensor for its dtype, device or shape only: they read none of its data.
_METADATA_ONLY = {"empty_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "zeros_like",
                  "ones_like", "full_like"}  # fmt: skip


def _nbytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


@dataclass
class Traffic:
    """Bytes read and written by the counted operators, in total and per operator."""

    read: int = 0
    written: int = 0
    by_op: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.read + self.written


class TrafficCounter(TorchDispatchMode):
    """``with TrafficCounter(min_numel) as c: step()``; then ``c.traffic`` holds the bytes."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.traffic = Traffic()

    def _big(self, x: object) -> bool:
        return isinstance(x, torch.Tensor) and x.numel() >= self.min_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if schema.is_mutable is False and any(r.alias_info is not None for r in schema.returns):
            return out  # a view: no data moves
        name = schema.name.removeprefix("aten::")
        read = written = 0
        values = dict(zip((a.name for a in schema.arguments), args))
        values.update(kwargs)
        for arg in schema.arguments:
            tensors = [t for t in tree_leaves(values.get(arg.name)) if self._big(t)]
            size = sum(_nbytes(t) for t in tensors)
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            if not (is_write and arg.kwarg_only) and name not in _METADATA_ONLY:  # out= is written, not read
                read += size
            if is_write:
                written += size
        fresh = [r.alias_info is None for r in schema.returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not name.startswith("empty") and name not in ("empty_like", "new_empty", "new_empty_strided"):
            written += sum(_nbytes(t) for t, new in zip(outs, fresh) if new and self._big(t))
        if read or written:
            self.traffic.read += read
            self.traffic.written += written
            self.traffic.by_op[name] += read + written
        return out


def count_traffic(fn, min_numel: int) -> Traffic:
    """The traffic of ``fn()`` (forward and backward, if it runs both) on tensors >= ``min_numel``."""
    with TrafficCounter(min_numel) as counter:
        fn()
    return counter.traffic


def main(argv: list[str] | None = None) -> int:
    import loss as bench  # benchmarks/loss.py: the candidates and their inputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--ops", action="store_true", help="also list the bytes per operator")
    args = parser.parse_args(argv)
    args.device, args.dtype = "cpu", torch.float32
    x = bench.make_inputs(args)
    view = args.batch * args.out_dim
    minimum = (x.student.numel() * 2 + x.teacher.numel()) * 4
    print(
        f"ATen-level traffic of one forward + backward on tensors of >= B x K = {view} elements, "
        f"B={args.batch}, 2+{args.local_crops} crops, K={args.out_dim}, float32; "
        f"least a step can move (student read, its gradient written, teacher read): {minimum / 2**20:.0f} MiB"
    )
    print("| candidate | read MiB | written MiB | total MiB | x least |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for candidate in bench.CANDIDATES:
        if candidate.compiled:
            continue  # compiled steps run Inductor's kernels, not ATen operators
        step = candidate.make(x)
        bench._one_step(step, x)  # first-call work is not the step's traffic
        student = x.student.detach().clone().requires_grad_()
        traffic = count_traffic(lambda: step(student).backward(), view)
        mib = 2**20
        print(
            f"| {candidate.name} | {traffic.read / mib:.0f} | {traffic.written / mib:.0f} | "
            f"{traffic.total / mib:.0f} | {traffic.total / minimum:.1f} |"
        )
        if args.ops:
            for op, nbytes in traffic.by_op.most_common():
                print(f"|   {op} | | | {nbytes / mib:.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
