"""GPU benchmark of the fused Triton DINO-vMF loss against the losses users have: DINO's and lightly's,
eager and under ``torch.compile``, and the vmf-head reference, eager and compiled.

For every configuration of the grid (B = 64 and 128 per GPU, 2 + 8 crops, K = 65,536, float32 and
bfloat16 by default) it builds the candidates of ``benchmarks/loss.py`` for CUDA (each eager and
compiled) plus two defined here (the fused op with and without the vMF correction), then in one
process:

* times forward + backward round-robin over the candidates (wall clock around the step with a
  device synchronisation on either side, so launch overhead counts), after warm-up steps that
  also compile; median and min-max over the repeats;
* measures each candidate's peak memory of one step (``torch.cuda.max_memory_allocated`` minus the
  memory held before it, the inputs already allocated);
* reports the ratios the targets are stated in: fused vs DINO eager (>= 3x faster), vs
  ``torch.compile`` of DINO's loss (faster), vs the compiled reference (>= 1.5x faster), peak memory
  vs DINO eager (<= 0.5x);
* turns the fused op's median time into achieved bandwidth with the traffic model of
  ``docs/fused_loss.md`` (``e K (3 R_s + 4 R_t)`` bytes), against the device's nominal peak and a
  device-to-device copy measured in the same run;
* checks once per configuration that the fused forward + backward never synchronises with the host
  and counts the kernels it launches.

    PYTHONPATH=. python benchmarks/loss_gpu.py [--batch 64 128] [--dtype float32 bfloat16] [--scale 0.3 1]
        [--repeats 10] [--no-compile] [--json PATH]

Without a GPU it says so and exits 0. ``benchmarks/gpu_check.sh`` runs it and keeps the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import loss as cpu_bench  # benchmarks/loss.py: inputs, candidates, one timed step
import torch
from log_normalizer_gpu import kernels_launched, never_syncs, peak_bandwidth

BASELINE = cpu_bench.BASELINE
COMPILED_DINO = cpu_bench.COMPILED_BASELINE
FUSED = "vmf-head fused Triton, DINO-vMF (probability + vMF)"
COMPILED = "vmf-head reference, DINO-vMF (probability + vMF), torch.compile"

GPU_CANDIDATES = [
    cpu_bench.Candidate(FUSED, cpu_bench._vmf("probability", True, backend="triton"), devices=("cuda",)),
    cpu_bench.Candidate(
        "vmf-head fused Triton, DINO (logit, no norms)",
        cpu_bench._vmf("logit", False, backend="triton"),
        devices=("cuda",),
    ),
]


def fused_bytes(x: cpu_bench.Inputs) -> int:
    """Bytes the fused forward + backward moves by the model of docs/fused_loss.md."""
    k = x.student.shape[1]
    rows_s, rows_t = x.student.shape[0], x.teacher.shape[0]
    return x.student.element_size() * k * (3 * rows_s + 4 * rows_t)


def copy_bandwidth(nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median over repeats."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def peak_mib(step, x: cpu_bench.Inputs) -> float:
    student = x.student.detach().clone().requires_grad_()
    x.student_norms.grad = None
    return cpu_bench.cuda_peak_mib(step, student)


def _at_least(values: dict[str, float], peer: str, name: str, ratio: float) -> bool | None:
    """values[peer] >= ratio * values[name] (None when the peer was not measured)."""
    return None if peer not in values else values[peer] >= ratio * values[name]


def run_config(
    args: argparse.Namespace, batch: int, dtype: torch.dtype, scale: float, candidates, copy_bw: float
) -> dict:
    ns = argparse.Namespace(
        batch=batch, local_crops=args.local_crops, out_dim=args.out_dim, device="cuda", dtype=dtype, scale=scale
    )
    x = cpu_bench.make_inputs(ns)
    steps, skipped = {}, {}
    for c in candidates:
        try:
            steps[c.name] = c.make(x)
        except ImportError as exc:  # e.g. lightly is not installed on the GPU machine
            skipped[c.name] = repr(exc)
    times = {name: [] for name in steps}
    losses = {}
    for r in range(args.warmup + args.repeats):
        for name in list(steps):
            try:
                seconds, losses[name] = cpu_bench._one_step(steps[name], x)
            except Exception as exc:  # a candidate that fails (e.g. a compile error) must not stop the run
                skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                del steps[name], times[name]
                continue
            if r >= args.warmup:
                times[name].append(seconds)
    memory = {name: peak_mib(step, x) for name, step in steps.items()}

    median = {name: statistics.median(ts) for name, ts in times.items()}
    label = f"B={batch}, 2+{args.local_crops} crops, K={args.out_dim}, {str(dtype)[6:]}, outputs with std {scale:g}"
    print(f"\n### {label}")
    print(
        f"| candidate | median ms | min-max ms | vs {BASELINE} | vs {COMPILED_DINO} | peak MiB | vs {BASELINE} | loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, ts in times.items():
        speed_base = median[BASELINE] / median[name] if BASELINE in median else None
        speed_comp = median[COMPILED_DINO] / median[name] if COMPILED_DINO in median else None
        mem_base = memory[name] / memory[BASELINE] if memory.get(BASELINE) else None
        print(
            f"| {name} | {median[name] * 1e3:.3f} | {min(ts) * 1e3:.3f}-{max(ts) * 1e3:.3f} | "
            f"{'-' if speed_base is None else f'{speed_base:.2f}x faster'} | "
            f"{'-' if speed_comp is None else f'{speed_comp:.2f}x faster'} | {memory[name]:.0f} | "
            f"{'-' if mem_base is None else f'{mem_base:.2f}x'} | {losses[name]:.6f} |"
        )
        rows.append(
            {
                "name": name,
                "times_s": ts,
                "median_s": median[name],
                "peak_mib": memory[name],
                "speedup_vs_eager": speed_base,
                "speedup_vs_compiled_dino": speed_comp,
                "memory_vs_eager": mem_base,
                "loss": losses[name],
            }
        )
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} |")

    result = {"config": label, "batch": batch, "dtype": str(dtype), "scale": scale, "rows": rows, "skipped": skipped}
    if FUSED in steps:

        def fused_step():
            steps[FUSED](x.student.detach().clone().requires_grad_()).backward()

        nbytes = fused_bytes(x)
        achieved = nbytes / median[FUSED]
        nominal = peak_bandwidth(torch.cuda.get_device_name())
        result["fused"] = {
            "bytes_model": nbytes,
            "achieved_bytes_per_s": achieved,
            "fraction_of_nominal_peak": None if nominal is None else achieved / nominal,
            "fraction_of_copy": achieved / copy_bw,
            "kernels_per_step": len(kernels_launched(fused_step)),
            "never_syncs": never_syncs(fused_step),
            "targets": {
                ">= 3x faster than DINO eager": _at_least(median, BASELINE, FUSED, 3.0),
                "faster than torch.compile of DINO's loss": _at_least(median, COMPILED_DINO, FUSED, 1.0),
                ">= 1.5x faster than compiled reference": _at_least(median, COMPILED, FUSED, 1.5),
                "<= 0.5x DINO eager's peak memory": _at_least(memory, BASELINE, FUSED, 2.0),
            },
        }
        fused = result["fused"]
        of_peak = "-" if nominal is None else f"{achieved / nominal:.0%}"
        print(
            f"fused: {nbytes / 1e6:.0f} MB moved (model) in {median[FUSED] * 1e3:.3f} ms = {achieved / 1e9:.0f} GB/s, "
            f"{of_peak} of the nominal peak, {achieved / copy_bw:.0%} of a device copy; "
            f"{fused['kernels_per_step']} kernels per step (the clone of the input included); "
            f"never syncs with the host: {fused['never_syncs']}"
        )
        verdicts = {True: "met", False: "NOT met", None: "n/a"}
        print("targets: " + "; ".join(f"{k}: {verdicts[v]}" for k, v in fused["targets"].items()))
    steps.clear()  # free the candidates' buffers before the next configuration
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--scale", type=float, nargs="+", default=[0.3], help="std of the raw outputs (see loss.py)")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per candidate (torch.compile compiles here)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("loss_gpu: no CUDA GPU here; nothing measured")
        return 0
    candidates = [c for c in cpu_bench.CANDIDATES + GPU_CANDIDATES if "cuda" in c.devices]
    if args.no_compile:
        candidates = [c for c in candidates if not c.compiled]
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(
        f"loss fwd+bwd on {device}, torch {torch.__version__}, {args.repeats} repeats after {args.warmup} warm-up; "
        f"device copy {copy_bw / 1e9:.0f} GB/s, nominal {peak_bandwidth(device) or 'unknown'} B/s"
    )
    results = [
        run_config(args, b, getattr(torch, d), s, candidates, copy_bw)
        for b in args.batch
        for d in args.dtype
        for s in args.scale
    ]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": device, "torch": torch.__version__, "copy_bytes_per_s": copy_bw, "configs": results},
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
