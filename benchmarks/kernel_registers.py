"""Static resource report of the Triton kernels: registers and spills per kernel, from ptxas.

Compiles every kernel of ``vmf_head/ops/dino_loss.py`` (for float32, bfloat16, float16 and float64
inputs and both centerings) and of ``vmf_head/ops/log_normalizer.py`` (exact and approx mode) for a
CUDA architecture WITHOUT a GPU (Triton's compiler and the ptxas it ships), at the block sizes the
ops use. It catches errors that only the compiler sees (the interpreter does not type-check) and
shows whether a tile fits in registers, which is how the tile sizes in ``docs/fused_loss.md`` and
``docs/triton.md`` were chosen. Not a timing: timings need ``benchmarks/loss_gpu.py`` and
``benchmarks/log_normalizer_gpu.py``.

    python benchmarks/kernel_registers.py [--arch 90] [--dtypes float32 bfloat16] [--ops loss log_normalizer]

Do not run it with TRITON_INTERPRET=1 (the interpreter has no compiler).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from vmf_head.ops import dino_loss as op
from vmf_head.ops import ibot_patch_loss
from vmf_head.ops import log_normalizer as lcp

_TYPES = {"float32": ("fp32", tl.float32), "bfloat16": ("bf16", tl.float32), "float16": ("fp16", tl.float32),
          "float64": ("fp64", tl.float64)}
_ACC_NAME = {tl.float32: "fp32", tl.float64: "fp64"}


def _signature(fn, in_type: str, acc, constexprs: dict) -> dict[str, str]:
    """Argument types by the kernels' naming convention: the loss's student/teacher/gradient tiles and
    the normaliser's kappa, W, gradients and outputs have the input dtype, its constants table
    ``params`` is float64, every other pointer has the arithmetic dtype, ``*_hi``/``*_lo`` are
    float32 scalars, ``tau_bits`` int64, the rest int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "params":
            sig[name] = "*fp64"
        elif name == "tau_bits":
            sig[name] = "i64"
        elif name in ("s_ptr", "t_ptr", "ds_ptr", "kappa_ptr", "out_ptr", "w_ptr", "gw_ptr", "grad_ptr"):
            sig[name] = "*" + in_type
        elif name.endswith("_ptr"):
            sig[name] = "*" + _ACC_NAME[acc]
        elif name.endswith(("_hi", "_lo")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def report(fn, in_type: str, acc, constexprs: dict, arch: int, num_warps: int) -> str:
    if "ACC" in fn.arg_names:  # the loss kernels take their arithmetic dtype as a constexpr
        constexprs = {**constexprs, "ACC": acc}
    kernel = triton.compile(ASTSource(fn, _signature(fn, in_type, acc, constexprs), constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              f.name, "-o", "/dev/null"], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ptxas failed for {fn.__name__}: {out.stderr}")
    lines = out.stderr.splitlines()
    regs = next(line.split("Used ")[1].split(" registers")[0] for line in lines if "Used" in line)
    spill = next(line.split(",")[1].strip() for line in lines if "spill stores" in line)
    shown = {k: v for k, v in constexprs.items() if k != "ACC"}
    return f"| {fn.__name__} | {in_type} | {shown} | {num_warps} | {regs} | {spill} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtypes", nargs="*", default=list(_TYPES), choices=list(_TYPES))
    parser.add_argument("--ops", nargs="*", default=["loss", "log_normalizer"], choices=["loss", "log_normalizer"])
    args = parser.parse_args(argv)
    print(f"sm_{args.arch}, triton {triton.__version__}")
    print("| kernel | input | constexprs | warps | registers | spills |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    if "log_normalizer" in args.ops:
        _log_normalizer_rows(args)
    if "loss" in args.ops:
        _loss_rows(args)
    return 0


def _log_normalizer_rows(args) -> None:
    # Arithmetic is float64 whatever the input; p = 256 decides the prototype kernels' tiles.
    block_k, block_d = lcp._blocks(256)
    for dtype in args.dtypes:
        in_type = _TYPES[dtype][0]
        for exact in (True, False):
            for derivative in (False, True):
                flags = dict(DERIVATIVE=derivative, EXACT=exact, BLOCK=lcp._BLOCK)
                print(report(lcp._elementwise_kernel, in_type, tl.float64, flags, args.arch, 4))
            flags = dict(EXACT=exact, BLOCK_K=block_k, BLOCK_D=block_d)
            print(report(lcp._prototype_forward_kernel, in_type, tl.float64, flags, args.arch, 4))
            print(report(lcp._prototype_backward_kernel, in_type, tl.float64, flags, args.arch, 4))


def _loss_rows(args) -> None:
    tile, warps = op._TILE_ELEMENTS, op._NUM_WARPS
    dino_views, tokens = 16, ibot_patch_loss._TOKENS_PER_TILE  # 2 + 8 crops pad to 16 rows
    print(f"(fused loss: tile {tile} elements)")
    for dtype in args.dtypes:
        in_type, acc = _TYPES[dtype]
        for probability in (False, True):
            common = dict(PROBABILITY=probability, HAS_TCORR=True)
            print(report(op._teacher_stats_kernel, in_type, acc, dict(common, BLOCK_K=tile), args.arch, warps))
            print(report(op._center_stat_kernel, in_type, acc,
                         dict(common, ROWS=op._STAT_ROWS, BLOCK_K=tile // op._STAT_ROWS), args.arch, warps))
            for pair_self, views in ((False, dino_views), (True, tokens)):
                # the tiles the op picks for K = 65,536 (see _block_k's half_tile in the op)
                fp64 = acc == tl.float64
                flags = dict(common, PAIR_SELF=pair_self, N_TEACHER=views if pair_self else 2, HAS_SCORR=True,
                             VIEWS=views, BLOCK_K=op._block_k(views, 65536, half_tile=fp64))
                print(report(op._student_forward_kernel, in_type, acc, flags, args.arch, warps))
                half = fp64 or in_type in ("bf16", "fp16")
                print(report(op._student_backward_kernel, in_type, acc,
                             dict(flags, WRITE_DS=True, WRITE_DSCORR=True, BLOCK_K=op._block_k(views, 65536, half)),
                             args.arch, warps))
        for with_loss in (False, True):
            print(report(op._merge_kernel, in_type, acc, dict(WITH_LOSS=with_loss, BLOCK=op._MERGE_ROWS),
                         args.arch, op._MERGE_WARPS))


if __name__ == "__main__":
    sys.exit(main())
