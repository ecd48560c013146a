"""log C_p on the CPU: ``vmf_head.log_vmf_normalizer`` (float32 and float64) against scipy (docs/design.md, section 6).

The peer is the formula everyone writes with scipy,

    nu log k - (p/2) log(2 pi) - log(scipy.special.ive(nu, k)) - k,      nu = p/2 - 1,

on a float64 numpy array. For each p, kappa distribution and size the three are timed round-robin
(so that noise from other processes spreads evenly; ``--back-to-back`` times each in a row instead) and
reported as median and min-max over the
repeats, with the ratio scipy / ours of the medians. On a random subsample the error of each against
mpmath (``vmf_head.accuracy.truth``, 40 digits) is reported as the worst |ours - truth| / max(1, |truth|),
scipy's over its finite values, with the fraction of scipy's values that are inf/NaN over the whole
array. The kappas are float32 numbers, so one truth serves both precisions.

kappa distributions:
  loguniform  10^U(-3, 5)
  dino        ||w|| / tau with ||w|| ~ U(0.5, 5) and tau ~ U(0.04, 0.1) (DINO's prototype norms and
              temperatures)

    python benchmarks/log_normalizer.py                    # p = 3, 256, 65536; 65,536 and 1,048,576 values
    python benchmarks/log_normalizer.py --threads 1 --p 256 --sizes 65536
    python benchmarks/log_normalizer.py --compiled     # also torch.compile of the float64 reference kernel
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import math
import os
import statistics
import time
import warnings

import numpy as np
import torch

from vmf_head import log_vmf_normalizer
from vmf_head.accuracy import truth


def scipy_log_normalizer(kappa: np.ndarray, p: int) -> np.ndarray:
    from scipy.special import ive

    nu = p / 2 - 1
    with np.errstate(all="ignore"):
        return nu * np.log(kappa) - p / 2 * math.log(2 * math.pi) - np.log(ive(nu, kappa)) - kappa


def sample_kappa(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist == "loguniform":
        k = 10.0 ** rng.uniform(-3, 5, n)
    elif dist == "dino":
        k = rng.uniform(0.5, 5.0, n) / rng.uniform(0.04, 0.1, n)
    else:
        raise ValueError(f"unknown kappa distribution {dist!r}")
    return k.astype(np.float32).astype(np.float64)


def time_calls(fns: dict, repeats: int, back_to_back: bool = False) -> dict[str, list[float]]:
    """Milliseconds per call for each function (after one warm-up), interleaved over the repeats, or
    with ``back_to_back`` all repeats of one function in a row (warm caches and threads)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = [name for name in fns for _ in range(repeats)] if back_to_back else list(fns) * repeats
    for name in order:
        start = time.perf_counter()
        fns[name]()
        times[name].append(1e3 * (time.perf_counter() - start))
    return times


def _truth_value(task: tuple[int, float]) -> float:
    return float(truth(*task)[0])


def worst_error(ours: np.ndarray, exact: np.ndarray) -> float:
    finite = np.isfinite(ours)
    if not finite.any():
        return math.nan
    return float(np.max(np.abs(ours[finite] - exact[finite]) / np.maximum(1.0, np.abs(exact[finite]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, nargs="+", default=[3, 256, 65536])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--dists", nargs="+", default=["loguniform", "dino"], choices=["loguniform", "dino"])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats at 65,536 values (fewer for larger)")
    parser.add_argument("--subsample", type=int, default=64, help="values per (p, distribution) checked with mpmath")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="time the repeats of each candidate in a row instead of round-robin (warm caches and threads)",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time torch.compile of the float64 reference kernel (not a path of the package)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at start); scipy single-threaded; "
        f"times in ms, median (min-max) over repeats; ratio = scipy / ours\n"
    )
    candidates = {
        "ours float64": lambda k64, k32, p: log_vmf_normalizer(k64, p),
        "ours float32": lambda k64, k32, p: log_vmf_normalizer(k32, p),
    }
    if args.compiled:
        candidates["compiled reference float64"] = lambda k64, k32, p: _compiled(p)(k64)
    head = ["p", "kappa", "values", "scipy ive formula"]
    for name in candidates:
        head += [name, "ratio"]
    head += ["scipy non-finite", "max err scipy"] + [f"max err {name}" for name in candidates]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for p in args.p:
            for dist in args.dists:
                for n in args.sizes:
                    kappa = sample_kappa(dist, n, rng)
                    k64 = torch.from_numpy(kappa)
                    k32 = k64.to(torch.float32)
                    fns = {"scipy": lambda: scipy_log_normalizer(kappa, p)}
                    fns.update({name: functools.partial(fn, k64, k32, p) for name, fn in candidates.items()})
                    repeats = max(5, args.repeats * 65536 // max(n, 65536))
                    times = time_calls(fns, repeats, back_to_back=args.back_to_back)
                    med = {name: statistics.median(t) for name, t in times.items()}
                    outputs = {name: np.asarray(fn().double()) for name, fn in fns.items() if name != "scipy"}
                    ref = scipy_log_normalizer(kappa, p)
                    idx = rng.choice(n, size=min(args.subsample, n), replace=False)
                    exact = np.array(list(pool.map(_truth_value, [(p, float(k)) for k in kappa[idx]])))

                    def cell(name: str) -> str:
                        return f"{med[name]:.2f} ({min(times[name]):.2f}-{max(times[name]):.2f})"

                    row = [str(p), dist, f"{n:,}", cell("scipy")]
                    for name in candidates:
                        row += [cell(name), f"{med['scipy'] / med[name]:.1f}x"]
                    row += [f"{100 * float(np.mean(~np.isfinite(ref))):.1f}%", f"{worst_error(ref[idx], exact):.1e}"]
                    row += [f"{worst_error(outputs[name][idx], exact):.1e}" for name in candidates]
                    print("| " + " | ".join(row) + " |", flush=True)


@functools.cache
def _compiled(p: int):
    """torch.compile (Inductor's C++ backend) of the float64 reference kernel for dimension p: not a
    code path of the package, a measure of what fusing its ~25 elementwise passes would give."""
    from vmf_head.special.bessel import TOL_FLOAT64
    from vmf_head.special.vmf import log_normalizer_exact

    # Dynamo notes that it traces through the kernel's lru_caches (order-only constants): expected.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")

    return torch.compile(functools.partial(log_normalizer_exact, p=p, tol=TOL_FLOAT64), dynamic=False)


if __name__ == "__main__":
    main()
