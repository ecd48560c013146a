"""GPU benchmark of log C_p: the Triton kernels against the PyTorch reference on the GPU and against
the scipy path (CPU round trip), plus the fused prototype correction against the unfused sequence.

    PYTHONPATH=. python3 benchmarks/log_normalizer_gpu.py [--json PATH] [--p 256] [--repeats 20]

Measured per row: median and min-max over repeats (CUDA events around each call; the scipy path
with wall clocks, since it synchronises anyway), the ratio against the peer measured in the same run,
and for the large sizes the achieved memory bandwidth against the device's nominal peak and against
a device-to-device copy measured in the same run. Also checked once: how many CUDA kernels each
Triton call launches (torch.profiler) and that forward + backward never synchronise with the host
(``torch.cuda.set_sync_debug_mode("error")``).

Without a GPU it says so and exits 0; with TRITON_INTERPRET=1 it first runs a tiny smoke test of the
same code paths through Triton's interpreter (agreement only, the timings mean nothing).
``benchmarks/gpu_check.sh`` runs it on a GPU machine and keeps the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

import vmf_head
from vmf_head import log_vmf_normalizer, prototype_log_normalizer

# Nominal peak HBM bandwidth (bytes/s) by device-name fragment, most specific first (vendor data sheets).
_PEAK_BANDWIDTH = [
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80 GB, HBM3
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
]


def peak_bandwidth(name: str) -> float | None:
    for fragment, value in _PEAK_BANDWIDTH:
        if fragment in name:
            return value
    return None


def time_cuda(fn, repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call, one CUDA event pair per repeat, one synchronisation at the end."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_wall(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


def scipy_log_normalizer(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """The usual PyTorch vMF code: to the CPU, scipy's exponentially scaled I_nu, back to the GPU."""
    import numpy as np
    from scipy.special import ive

    nu = p / 2 - 1
    k = kappa.detach().double().cpu().numpy()
    with np.errstate(all="ignore"):
        out = nu * np.log(k) - (p / 2) * np.log(2 * np.pi) - np.log(ive(nu, k)) - k
    return torch.from_numpy(out).to(device=kappa.device, dtype=kappa.dtype)


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    finite = want.isfinite()
    if not finite.any():
        return 0.0
    return ((got[finite] - want[finite]).abs() / want[finite].abs().clamp_min(1.0)).max().item()


def kernels_launched(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def never_syncs(fn) -> bool | str:
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        return f"synchronised: {exc}".splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True


def kappa_values(n: int, device: str) -> torch.Tensor:
    # Concentrations of a DINO-vMF head: ||w||/tau with norms spread over four decades.
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (10 ** (torch.rand(n, generator=gen) * 6 - 2)).to(device)


def prototypes(k: int, p: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    w = torch.randn(k, p, generator=gen)
    return (w / w.norm(dim=1, keepdim=True) * (0.5 + torch.rand(k, 1, generator=gen))).to(device)


def fwd_bwd(fn, x: torch.Tensor):
    def run():
        xg = x.detach().requires_grad_()
        return torch.autograd.grad(fn(xg).sum(), xg)[0]

    return run


DEVICE = "cuda"


def run_gpu(args) -> dict:
    device = DEVICE
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    p, tau = args.p, 0.1
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "p": p,
        "peak_bandwidth_GBps": peak and peak / 1e9,
        "rows": [],
        "checks": {},
    }
    rows = result["rows"]

    def add(group: str, label: str, times: list[float], peer: str | None = None, bytes_moved: int | None = None):
        row = {"group": group, "name": label, **summary(times)}
        if peer is not None:
            peer_row = next(r for r in rows if r["group"] == group and r["name"] == peer)
            row["speedup_vs"] = peer
            row["speedup"] = peer_row["median_ms"] / row["median_ms"]
        if bytes_moved is not None:
            row["GBps"] = bytes_moved / (row["median_ms"] * 1e-3) / 1e9
            if peak:
                row["fraction_of_peak"] = row["GBps"] * 1e9 / peak
        rows.append(row)
        extra = f"  x{row['speedup']:.1f} vs {peer}" if peer else ""
        bw = f"  {row['GBps']:.0f} GB/s" if bytes_moved else ""
        print(
            f"{group:<28} {label:<34} median {row['median_ms']:9.3f} ms  "
            f"[{row['min_ms']:.3f}, {row['max_ms']:.3f}]{bw}{extra}",
            flush=True,
        )

    # Device-to-device copy: the bandwidth this machine actually reaches, as a second yardstick.
    big = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    copy_ms = statistics.median(time_cuda(big.clone, 10))
    result["copy_bandwidth_GBps"] = 2 * big.numel() / (copy_ms * 1e-3) / 1e9
    del big
    print(f"{name}: nominal peak {peak and peak / 1e9} GB/s, measured copy {result['copy_bandwidth_GBps']:.0f} GB/s")

    for n in args.sizes:
        kappa = kappa_values(n, device)
        group = f"log C_p, {n} values, fp32"
        bytes_moved = 2 * 4 * n  # read kappa, write the value (float32)
        want = log_vmf_normalizer(kappa.double(), p, backend="reference")

        def values(backend: str, mode: str = "exact"):
            return lambda k: log_vmf_normalizer(k, p, mode=mode, backend=backend)

        ref, tri = (lambda: values("reference")(kappa)), (lambda: values("triton")(kappa))
        scipy_repeats = max(2, min(args.repeats, int(2e6 // n)))
        timed = functools.partial(time_cuda, repeats=args.repeats)
        add(group, "scipy (CPU round trip)", time_wall(lambda: scipy_log_normalizer(kappa, p), scipy_repeats))
        add(group, "torch reference (GPU)", timed(ref), "scipy (CPU round trip)")
        add(group, "triton exact", timed(tri), "torch reference (GPU)", bytes_moved)
        add(
            group,
            "triton approx",
            timed(lambda: values("triton", "approx")(kappa)),
            "torch reference (GPU)",
            bytes_moved,
        )
        add(group, "torch reference fwd+bwd", timed(fwd_bwd(values("reference"), kappa)))
        add(
            group, "triton exact fwd+bwd", timed(fwd_bwd(values("triton"), kappa)), "torch reference fwd+bwd", 3 * 4 * n
        )
        via_scipy = scipy_log_normalizer(kappa.double(), p)
        result["checks"][f"max_rel_error_fp32_{n}"] = {
            "triton": max_rel_error(tri(), want),
            "reference": max_rel_error(ref(), want),
            "scipy_fp64": max_rel_error(via_scipy, want),
            "scipy_nonfinite": int((~via_scipy.isfinite()).sum()),
        }
        del kappa, want

    for k in args.prototypes:
        weight = prototypes(k, p, device)
        group = f"prototype correction, K={k}, p={p}, fp32"
        w_bytes = weight.numel() * 4

        def fused(backend: str):
            return lambda w: prototype_log_normalizer(w, tau, backend=backend)

        def unfused(w):
            return log_vmf_normalizer(torch.linalg.vector_norm(w, dim=1) / tau, p, backend="triton")

        timed = functools.partial(time_cuda, repeats=args.repeats)
        add(group, "reference (torch, GPU)", timed(lambda: fused("reference")(weight)))
        add(group, "unfused: torch norm + kernel", timed(lambda: unfused(weight)), "reference (torch, GPU)", w_bytes)
        add(group, "fused kernel", timed(lambda: fused("triton")(weight)), "unfused: torch norm + kernel", w_bytes)
        add(group, "reference fwd+bwd", timed(fwd_bwd(fused("reference"), weight)))
        add(group, "unfused fwd+bwd", timed(fwd_bwd(unfused, weight)), "reference fwd+bwd", 3 * w_bytes)
        add(group, "fused fwd+bwd", timed(fwd_bwd(fused("triton"), weight)), "unfused fwd+bwd", 3 * w_bytes)
        want = prototype_log_normalizer(weight.double(), tau, backend="reference")
        result["checks"][f"prototype_max_rel_error_fp32_K{k}"] = max_rel_error(
            prototype_log_normalizer(weight, tau, backend="triton"), want
        )
        del weight

    kappa = kappa_values(args.check_size, device).requires_grad_()
    weight = prototypes(args.check_size, p, device).requires_grad_()
    ones = torch.ones(args.check_size, device=device)
    checks = {
        "kernels_log_vmf_normalizer_forward": lambda: kernels_launched(
            lambda: log_vmf_normalizer(kappa, p, backend="triton")
        ),
        "kernels_prototype_forward": lambda: kernels_launched(
            lambda: prototype_log_normalizer(weight, tau, backend="triton")
        ),
        "kernels_prototype_backward": lambda: kernels_launched(
            lambda: torch.autograd.grad(prototype_log_normalizer(weight, tau, backend="triton"), weight, ones)
        ),
        "no_host_sync_fwd_bwd": lambda: never_syncs(
            lambda: torch.autograd.grad(
                prototype_log_normalizer(weight, tau).sum() + log_vmf_normalizer(kappa, p).sum(), (weight, kappa)
            )
        ),
    }
    for key, check in checks.items():
        try:  # one failed check must not cost the numbers of the others
            result["checks"][key] = check()
        except Exception as exc:
            result["checks"][key] = f"failed: {type(exc).__name__}: {exc}"
    for key in (
        "kernels_log_vmf_normalizer_forward",
        "kernels_prototype_forward",
        "kernels_prototype_backward",
        "no_host_sync_fwd_bwd",
    ):
        print(f"{key}: {result['checks'][key]}")
    return result


def run_smoke() -> dict:
    """Kernels against the reference through Triton's interpreter on CPU tensors: the code paths and
    the agreement, not the speed. Max |triton - reference| / max(1, |reference|) per case."""
    grid = torch.logspace(-6, 6, 3000, dtype=torch.float64)
    checks = {}
    for p in (2, 3, 256, 4096, 65536):
        for dtype in (torch.float32, torch.float64):
            for mode in ("exact", "approx") if p >= 3 else ("exact",):
                kappa = grid.to(dtype)
                key = f"p={p} {str(dtype)[6:]} {mode}"
                checks[key + " value"] = max_rel_error(
                    log_vmf_normalizer(kappa, p, mode=mode, backend="triton"),
                    log_vmf_normalizer(kappa, p, mode=mode, backend="reference"),
                )
                checks[key + " slope"] = max_rel_error(
                    vmf_head.normalizer._log_vmf_normalizer_grad_op(kappa, p, mode, "triton"),
                    vmf_head.normalizer._log_vmf_normalizer_grad_op(kappa, p, mode, "reference"),
                )
    for dtype in (torch.float32, torch.float64):
        weight = prototypes(200, 256, "cpu").to(dtype)
        checks[f"prototype K=200 p=256 {str(dtype)[6:]}"] = max_rel_error(
            prototype_log_normalizer(weight, 0.1, backend="triton"),
            prototype_log_normalizer(weight, 0.1, backend="reference"),
        )
    print("interpreter smoke test (no GPU), max relative difference triton vs reference:")
    for key, value in checks.items():
        print(f"  {key:<36} {value:.2e}")
    return {"device": "cpu (Triton interpreter)", "mode": "smoke", "checks": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 1 << 24])
    parser.add_argument(
        "--prototypes", type=int, nargs="+", default=[65536, 1 << 20], help="K values for the fused rows"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-size", type=int, default=65536, help="K for the launch-count and sync checks")
    parser.add_argument("--json", default=os.environ.get("STEP_JSON"), help="write the results here")
    args = parser.parse_args(argv)
    print(f"vmf_head {vmf_head.__version__}, torch {torch.__version__}")
    if torch.cuda.is_available():
        result = run_gpu(args)
    else:
        print("log_normalizer_gpu: needs a CUDA GPU; nothing timed.")
        if os.environ.get("TRITON_INTERPRET") != "1":
            return 0
        result = run_smoke()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
