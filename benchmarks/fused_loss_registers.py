"""Static resource report of the fused loss kernels: registers and spills per kernel, from ptxas.

Compiles every kernel of ``vmf_head/ops/dino_loss.py`` for a CUDA architecture WITHOUT a GPU
(Triton's compiler and the ptxas it ships) at the block sizes the op uses, for float32, bfloat16,
float16 and float64 inputs and both centerings. It catches errors that only the compiler sees (the
interpreter does not type-check) and shows whether a tile fits in registers, which is how the tile
size in ``docs/fused_loss.md`` was chosen. Not a timing: timings need ``benchmarks/loss_gpu.py``.

    python benchmarks/fused_loss_registers.py [--arch 90] [--dtypes float32 bfloat16]

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

_TYPES = {"float32": ("fp32", tl.float32), "bfloat16": ("bf16", tl.float32), "float16": ("fp16", tl.float32),
          "float64": ("fp64", tl.float64)}
_ACC_NAME = {tl.float32: "fp32", tl.float64: "fp64"}


def _signature(fn, in_type: str, acc, constexprs: dict) -> dict[str, str]:
    """Argument types by the kernels' naming convention: the student/teacher/gradient tiles have the
    input dtype, every other pointer the arithmetic dtype, ``*_hi``/``*_lo`` are float32 scalars,
    the rest int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("s_ptr", "t_ptr", "ds_ptr"):
            sig[name] = "*" + in_type
        elif name.endswith("_ptr"):
            sig[name] = "*" + _ACC_NAME[acc]
        elif name.endswith(("_hi", "_lo")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def report(fn, in_type: str, acc, constexprs: dict, arch: int, num_warps: int) -> str:
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
    args = parser.parse_args(argv)
    tile, warps = op._TILE_ELEMENTS, op._NUM_WARPS
    dino_views, tokens = 16, ibot_patch_loss._TOKENS_PER_TILE  # 2 + 8 crops pad to 16 rows
    print(f"sm_{args.arch}, triton {triton.__version__}, tile {tile} elements")
    print("| kernel | input | constexprs | warps | registers | spills |")
    print("| --- | --- | --- | ---: | ---: | --- |")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
