"""Static resource report of the Triton kernels: registers and spills per kernel, from ptxas.

Runs the ops' own host code (``vmf_head/ops/``) on CPU tensors at DINO's sizes (K = 65,536, 2 + 8
views; p = 256 for the normaliser) with every kernel launch intercepted, then compiles each
intercepted launch, with exactly the arguments, block sizes and warps the op chose, for CUDA
architectures WITHOUT a GPU (Triton's compiler and the ptxas it ships). It catches errors that only
the compiler sees (the interpreter does not type-check) and shows whether a tile fits in registers,
which is how the tile sizes in ``docs/fused_loss.md`` and ``docs/triton.md`` were chosen. Not a
timing: timings need ``benchmarks/loss_gpu.py`` and ``benchmarks/log_normalizer_gpu.py``.

    python benchmarks/kernel_registers.py [--arch 80 89 90] [--dtypes float32 bfloat16] [--ops loss log_normalizer]

Do not run it with TRITON_INTERPRET=1 (the interpreter has no compiler).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_registers.py compiles kernels: run it without TRITON_INTERPRET=1")

from vmf_head.functional.cross_entropy import Pairing
from vmf_head.functional.vmf import compute_dtype
from vmf_head.ops import cross_entropy as ce
from vmf_head.ops import cross_entropy_backward, cross_entropy_forward
from vmf_head.ops import log_normalizer as lcp

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_CODES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}


def capture(run: Callable[[], object]) -> list[tuple[JITFunction, dict, int]]:
    """The kernel launches ``run()`` makes: (kernel, arguments by name, num_warps), none executed."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        launches.append((self, named, named.pop("num_warps", 4)))

    JITFunction.run = record
    try:
        run()
    finally:
        JITFunction.run = original
    return launches


def _signature(fn: JITFunction, args: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for param in fn.params:
        value = args[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _CODES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    return signature, constexprs


def _ptxas(arch: int) -> str:
    try:
        found = nvidia.get_ptxas(arch)
    except TypeError:  # older Triton: one ptxas for every architecture
        found = nvidia.get_ptxas()
    return getattr(found, "path", found)


def report(fn: JITFunction, args: dict, num_warps: int, arch: int) -> tuple[str, str]:
    signature, constexprs = _signature(fn, args)
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"], capture_output=True, text=True
        )
    if out.returncode:
        raise RuntimeError(f"ptxas failed for {fn.__name__}: {out.stderr}")
    lines = out.stderr.splitlines()
    regs = next(line.split("Used ")[1].split(" registers")[0] for line in lines if "Used" in line)
    spill = next(line.split(",")[1].strip() for line in lines if "spill stores" in line)
    return regs, spill


def _shown(fn: JITFunction, args: dict) -> str:
    flags = {p.name: args[p.name] for p in fn.params if p.is_constexpr and p.name != "ACC"}
    absent = sorted(p.name for p in fn.params if args[p.name] is None)
    return f"{flags}" + (f", None: {', '.join(absent)}" if absent else "")


def _log_normalizer_launches(dtype: torch.dtype) -> list:
    kappa = torch.rand(1024, dtype=dtype)
    weight = torch.randn(65536, 256, dtype=dtype)
    tau = torch.tensor(0.1, dtype=torch.float64)
    launches = []
    for mode in ("exact", "approx"):
        for derivative in (False, True):
            launches += capture(lambda: lcp.log_normalizer(kappa, p=256, mode=mode, derivative=derivative))
        launches += capture(
            lambda: lcp.prototype_log_normalizer(weight, tau=tau, p=256, mode=mode, out_dtype=torch.float32)
        )
        launches += capture(
            lambda: lcp.prototype_log_normalizer_backward(torch.ones(65536), weight, tau=tau, p=256, mode=mode)
        )
    return launches


def _loss_launches(dtype: torch.dtype) -> list:
    """The launches of the DINO layout (2 + 8 views), iBOT's patches and DINOv2's targets, K = 65,536."""
    K, B = 65536, 2
    acc = compute_dtype(torch.empty(0, dtype=dtype))
    inv_temps = torch.tensor([10.0, 25.0], dtype=acc)
    corr = torch.zeros(K, dtype=acc)
    launches = []
    for pairing, rows, t_rows in ((Pairing(10, 2), 10 * B, 2 * B), (Pairing(1, 1, skip_same=False), 8 * B, 8 * B)):
        layout = ce.PairLayout.of(pairing, rows)
        student, teacher = torch.randn(rows, K, dtype=dtype), torch.randn(t_rows, K, dtype=dtype)
        weights, stat = torch.ones(rows, dtype=acc), torch.ones(t_rows, dtype=acc)
        for centering in ("logit", "probability", None):  # None: precomputed targets
            x = cross_entropy_forward.Inputs(
                student, teacher, weights, None if centering is None else corr, corr, corr, inv_temps
            )
            teacher_stats = None
            if centering is not None:
                probability = centering == "probability"
                launches += capture(
                    lambda: cross_entropy_forward.teacher_statistics(x, probability=probability, ACC=ce._TL_DTYPES[acc])
                )
                teacher_stats = cross_entropy_forward.TeacherRowStats(stat, stat)
            launches += capture(
                lambda: cross_entropy_forward.student_pass(x, teacher_stats, layout, ce._TL_DTYPES[acc])
            )
            student_stats = cross_entropy_forward.StudentRowStats(weights, weights, weights)
            launches += capture(
                lambda: cross_entropy_backward.student_backward(
                    torch.ones((), dtype=acc),
                    x,
                    teacher_stats,
                    student_stats,
                    layout,
                    want_grad_student=True,
                    want_grad_correction=True,
                    ACC=ce._TL_DTYPES[acc],
                )
            )
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="*", default=[80, 89, 90], help="compute capabilities x 10")
    parser.add_argument("--dtypes", nargs="*", default=list(_DTYPES), choices=list(_DTYPES))
    parser.add_argument("--ops", nargs="*", default=["loss", "log_normalizer"], choices=["loss", "log_normalizer"])
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}; registers / spill stores per architecture")
    print("| kernel | input | constexprs | warps | " + " | ".join(f"sm_{a}" for a in args.arch) + " |")
    print("| --- | --- | --- | ---: | " + " | ".join("---" for _ in args.arch) + " |")
    seen = set()
    for name in args.dtypes:
        dtype = _DTYPES[name]
        launches = []
        if "log_normalizer" in args.ops:
            launches += _log_normalizer_launches(dtype)
        if "loss" in args.ops:
            launches += _loss_launches(dtype)
        for fn, named, warps in launches:
            key = (fn.__name__, name, _shown(fn, named), warps, tuple(sorted(_signature(fn, named)[0].items())))
            if key in seen:
                continue
            seen.add(key)
            cells = []
            for arch in args.arch:
                regs, spill = report(fn, named, warps, arch)
                cells.append(f"{regs} / {spill.split()[0]}")
            print(f"| {fn.__name__} | {name} | {_shown(fn, named)} | {warps} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
