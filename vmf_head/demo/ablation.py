"""``vmf-head ablation``: the seed's ablation grid (its Figure 1), its prototype-norm analysis
(Figure 2) and a stability probe, at demo scale, with paired seeds and confidence intervals.

Every run is the demo's :func:`~vmf_head.demo.train.train_one` (same data, networks, loop and
evaluation); a cell is a :class:`~vmf_head.demo.train.Method`. Each finished run is written to
``OUT/runs/<cell>-seed<S>.json`` (``OUT/probe/`` for the probe) before the next starts, and a run
whose file is already there is read back instead of trained, so the command can be interrupted,
resumed, or run one seed per process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .cli import add_long_tailed_option
from .train import METHODS, Method, TrainConfig

# The seed's grid: prototypes L2-normalised or free x vMF correction on/off x centering logit or
# probability. With unit prototypes the correction log C_p(1/tau) is the same for every k and
# cancels in the softmax, so "normalised" has one vMF setting: six cells, plus the seed's
# large-nu approximation of log C_p as a seventh.
CELLS: tuple[Method, ...] = (
    METHODS["dino"],
    Method("dino-prob", "DINO, probability centering", norm_last_layer=True, vmf=False, centering="probability"),
    METHODS["dino-free"],
    Method(
        "dino-free-prob", "free norms, probability centering", norm_last_layer=False, vmf=False, centering="probability"
    ),
    Method("dino-vmf-logit", "DINO-vMF, logit centering", norm_last_layer=False, vmf=True, centering="logit"),
    METHODS["dino-vmf"],
    Method(
        "dino-vmf-approx",
        "DINO-vMF, approx. log C_p",
        norm_last_layer=False,
        vmf=True,
        centering="probability",
        mode="approx",
    ),
)
BASELINE = "dino"
# Each factor of the grid with the others held fixed, paired by seed: (what, cell, reference).
CONTRASTS = (
    ("probability centering, unit norms", "dino-prob", "dino"),
    ("free norms, logit centering", "dino-free", "dino"),
    ("free norms, probability centering", "dino-free-prob", "dino-prob"),
    ("vMF correction, logit centering", "dino-vmf-logit", "dino-free"),
    ("vMF correction, probability centering", "dino-vmf", "dino-free-prob"),
    ("approximate log C_p", "dino-vmf-approx", "dino-vmf"),
)
# DINO (unit norms) is the control: it says whether what happens at the probe's setting is due to
# the free norms or to the setting itself.
PROBE_CELLS: tuple[Method, ...] = (METHODS["dino"], METHODS["dino-free"], METHODS["dino-vmf"])

# The default grid budget is the demo's (60 epochs, K = 1024, 2 + 4 crops): docs/ablation.md says why.
GRID = TrainConfig()
# The stability probe: the demo's networks and data at 100x the learning rate, the setting where
# DINO with free norms broke down in the search that docs/ablation.md reports (lr 1e-2 and 3e-2,
# K = 8192 at lr 1e-2 did not). Its budget is a third of the grid's.
PROBE = {"lr": 0.1, "epochs": 20}
# --quick: a smoke test of every stage in seconds; its numbers mean nothing.
QUICK = {
    "epochs": 2,
    "batch_size": 96,
    "n_local": 1,
    "out_dim": 32,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
    "width": 4,
    "train_images": 192,
    "warmup_epochs": 0,
    "freeze_last_layer": 0,
    "eval_every": 2,
    "log_every": 1,
    "monitor_every": 1,
}
QUICK_SEEDS = 2  # two, so that the paired intervals are computed
QUICK_PROBE_SEEDS = 1

# --long-tailed: KoLeo on the prototypes (KoLeo-proto) where its authors found it helps most, long-tailed
# data. DINO-vMF without it, and with it at three weights a decade apart around DINOv2's KoLeo weight on
# features (0.1), on the digits thinned to a 10:1 imbalance (data.LONG_TAIL_RATIO).
KOLEO_WEIGHTS = (0.01, 0.1, 1.0)
KOLEO_CELLS: tuple[tuple[Method, float], ...] = (
    (METHODS["dino-vmf"], 0.0),
    *(
        (Method(f"dino-vmf-koleo{w:g}", f"DINO-vMF + KoLeo-proto {w:g}", False, vmf=True, centering="probability"), w)
        for w in KOLEO_WEIGHTS
    ),
)
KOLEO_BASELINE = "dino-vmf"
# The long-tailed split has 532 training images, 8 steps per epoch: 150 epochs are 1,200 steps, about
# the grid's 1,260, so that the assignments have time to sharpen as they do there.
LONG_TAILED = {"epochs": 150}

DESCRIPTION = """\
Train every distinct cell of the DINO-vMF paper's ablation (prototypes L2-normalised or free,
vMF correction on or off, teacher centering logit or probability; plus DINO-vMF with the
paper's approximation of log C_p) on the demo's data with paired seeds, and a stability probe
(DINO, DINO with free norms and DINO-vMF at 100x the learning rate).

Per cell: k-NN (k=20, T=0.07) and linear-probe accuracy (mean ± sd over seeds), the paired
difference against DINO with a 95% t interval over seeds, prototype utilisation, effective
clusters, distinct prototypes, kappa spread, divergence flags (non-finite loss, collapse to one
prototype, loss stuck at log K), and k-NN accuracy per percentile range of the assigned
prototype's norm (the paper's Figure 2).

Outputs in --out: runs/ and probe/ (one JSON per run; a run found there is not trained again),
ablation.json, ablation.png, and the tables printed at the end. The default (5 seeds) took
61 CPU minutes single-threaded here (53 for the grid, 8 for the probe); --quick is a smoke
test of a few seconds (10-30 s with start-up, depending on how busy the machine is).

--long-tailed [RATIO] runs another experiment instead: DINO-vMF without and with KoLeo on the
prototypes (KoLeo-proto, weights 0.01, 0.1, 1) on the digits thinned to a RATIO:1 imbalance (default
10), paired by seed against the cell without KoLeo; runs in OUT/long_tailed/, summary in
OUT/long_tailed.json (no probe, no figure; --probe-seeds is ignored). One run took 77 CPU s here, the
20 runs of 5 seeds about 26 CPU minutes."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmf-head ablation", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"paired seeds SEED .. SEED+N-1 for the grid (default 5; --quick: {QUICK_SEEDS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--probe-seeds",
        type=int,
        default=None,
        help="seeds of the stability probe, from SEED (default: as --seeds; --quick: "
        f"{QUICK_PROBE_SEEDS}; 0 skips the probe)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny networks and budget: a smoke test of seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("vmf_ablation_out"),
        help="output directory (default ./vmf_ablation_out); runs already in it are reused",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these networks are too small to gain from more, "
        "and a second thread stalls when another job shares the cores)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="an ImageFolder directory (DIR/<class>/<image>) instead of the digits, as in the demo",
    )
    parser.add_argument(
        "--image-size", type=int, default=32, help="side images from --data are resized to (default 32)"
    )
    add_long_tailed_option(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _json_ready(x: object) -> object:
    return json.loads(json.dumps(x))


def run_cell(
    directory: Path, cell: Method, data, cfg: TrainConfig, seed: int, dataset: dict, progress: bool
) -> tuple[dict, bool]:
    """The run of ``cell`` with ``seed``: read from ``directory`` if it was trained there with the
    same configuration and data, else trained and written there. Returns ``(run, trained)``."""
    from .report import write_json
    from .train import train_one

    path = directory / f"{cell.name}-seed{seed}.json"
    config = _json_ready(asdict(cfg))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["config"] != config or stored["dataset"] != dataset or stored["cell"] != _json_ready(asdict(cell)):
            raise ValueError(
                f"{path} was trained with another configuration, data set or cell definition; "
                "use another --out (or delete that file to retrain it)"
            )
        return stored["run"], False
    run = train_one(cell, data, cfg, seed, progress=progress)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_json(tmp, {"cell": asdict(cell), "config": config, "dataset": dataset, "run": run})
    tmp.replace(path)  # a run interrupted while writing leaves no half file behind
    return json.loads(path.read_text())["run"], True


def _compact(run: dict, flags: dict) -> dict:
    keep = ("method", "seed", "knn", "linear", "diverged", "diagnostics", "seconds", "cpu_seconds")
    return {**{k: run[k] for k in keep}, "flags": flags}


def _train_all(jobs: list, args: argparse.Namespace, parser, data, dataset: dict) -> tuple[dict[str, list[dict]], int]:
    """Every ``(kind, cell, config, seed)`` job through :func:`run_cell` (read back or trained into
    ``OUT/<kind>/``): the runs by kind, and how many were trained here."""
    from tqdm.auto import tqdm

    results: dict[str, list[dict]] = {kind: [] for kind, *_ in jobs}
    trained = 0
    for kind, cell, c, seed in tqdm(jobs, desc="ablation", unit="run", disable=args.no_progress, dynamic_ncols=True):
        try:
            run, fresh = run_cell(args.out / kind, cell, data, c, seed, dataset, progress=not args.no_progress)
        except ValueError as err:
            parser.error(str(err))
        trained += fresh
        results[kind].append(run)
        if fresh:
            tqdm.write(
                f"  {kind:<5} {cell.label:<34} seed {seed}: k-NN {100 * run['knn']:.1f}%  linear "
                f"{100 * run['linear']:.1f}%  ({run['cpu_seconds']:.0f} CPU s, {run['seconds']:.0f} s wall)"
                + ("  DIVERGED" if run["diverged"] else "")
            )
    return results, trained


def main(argv: list[str] | None = None) -> int:
    from .cli import load_data, missing_extra

    parser = build_parser()
    args = parser.parse_args(argv)
    if missing_extra("ablation"):
        return 2
    n_seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 5)
    n_probe = args.probe_seeds if args.probe_seeds is not None else (QUICK_PROBE_SEEDS if args.quick else n_seeds)
    if n_seeds < 1 or n_probe < 0 or args.threads < 1:
        parser.error(f"need --seeds >= 1, --probe-seeds >= 0, --threads >= 1; got {n_seeds}, {n_probe}, {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA GPU; use --device cpu")
    cfg = replace(GRID, device=args.device)
    if args.quick:
        cfg = replace(cfg, **QUICK)
    probe_cfg = replace(cfg, **{k: v for k, v in PROBE.items() if not (args.quick and k == "epochs")})
    try:
        data = load_data(args)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    dataset = {
        "name": data.name,
        "train": len(data.train_labels),
        "test": len(data.test_labels),
        "classes": data.class_names,
        "class_counts": torch.bincount(data.train_labels, minlength=len(data.class_names)).tolist(),
    }
    seeds = list(range(args.seed, args.seed + n_seeds))
    command = "vmf-head ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.long_tailed is not None:
        return _koleo_on_long_tailed(
            args, parser, cfg if args.quick else replace(cfg, **LONG_TAILED), data, dataset, seeds, command
        )

    from . import ablation_report as rep
    from .report import environment, mean_std, write_json
    from .train import evaluate_pixels, evaluate_random_init

    probe_seeds = list(range(args.seed, args.seed + n_probe))
    jobs = [("runs", c, cfg, s) for s in seeds for c in CELLS] + [
        ("probe", c, probe_cfg, s) for s in probe_seeds for c in PROBE_CELLS
    ]
    print(
        f"vmf-head ablation: {data.name}, {dataset['train']} training / {dataset['test']} held-out images; "
        f"{len(CELLS)} cells x {n_seeds} seed(s) + probe {len(PROBE_CELLS)} x {n_probe}; {cfg.epochs} epochs, "
        f"K={cfg.out_dim}, p={cfg.bottleneck_dim}; {torch.get_num_threads()} thread(s); out {args.out}",
        flush=True,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    results, trained = _train_all(jobs, args, parser, data, dataset)
    results.setdefault("probe", [])

    summary = rep.summarize(results["runs"], list(CELLS), BASELINE, cfg.out_dim)
    probe_summary = rep.summarize(results["probe"], list(PROBE_CELLS), "", probe_cfg.out_dim) if n_probe else {}
    pixels = evaluate_pixels(data)
    random_init = [{"seed": s, **evaluate_random_init(data, cfg, s)} for s in seeds]
    random_stats = {k: mean_std([r[k] for r in random_init]) for k in ("knn", "linear")}
    factor_rows = rep.contrasts(results["runs"], CONTRASTS)
    probe_text = ", ".join(f"{k} {getattr(probe_cfg, k)}" for k in PROBE)
    args.out.mkdir(parents=True, exist_ok=True)

    payload = {
        "command": command,
        "dataset": dataset,
        "config": asdict(cfg),
        "probe_config": asdict(probe_cfg),
        "cells": [asdict(c) for c in CELLS],
        "probe_cells": [asdict(c) for c in PROBE_CELLS],
        "seeds": seeds,
        "probe_seeds": probe_seeds,
        "environment": environment(),
        # Of this invocation only (runs read back from --out keep their own seconds); the machine
        # may be shared, so wall seconds include waiting for a core, CPU seconds do not.
        "trained_here": trained,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "pixels": pixels,
        "random_init": random_init,
        "summary": summary,
        "contrasts": factor_rows,
        "probe": probe_summary,
        "runs": [_compact(r, rep.divergence_flags(r, cfg.out_dim)) for r in results["runs"]],
        "probe_runs": [_compact(r, rep.divergence_flags(r, probe_cfg.out_dim)) for r in results["probe"]],
    }
    write_json(args.out / "ablation.json", payload)
    rep.plot(
        args.out / "ablation.png",
        summary,
        results["runs"],
        probe_summary,
        results["probe"],
        BASELINE,
        cfg.out_dim,
        probe_cfg.out_dim,
        probe_text,
    )
    spread = f"mean ± sd over {n_seeds} seeds; Δ: paired difference, points, 95% t interval over seeds"
    print(
        f"\nThe grid ({spread}); raw pixels: k-NN {100 * pixels['knn']:.1f}%, linear {100 * pixels['linear']:.1f}%; "
        f"untrained backbone: k-NN {rep.pm(random_stats['knn'])}%, linear {rep.pm(random_stats['linear'])}%\n"
    )
    print(rep.format_table(summary, BASELINE, cfg.out_dim))
    print("\nOne factor at a time (paired by seed, points, 95% t interval)\n")
    print(rep.format_contrasts(factor_rows, {c.name: c.label for c in CELLS}))
    print("\nk-NN accuracy % by percentile range of the assigned prototype's norm (the seed's Figure 2)\n")
    print(rep.format_norm_groups(summary))
    if probe_summary:
        print(f"\nStability probe ({probe_text}; {n_probe} seeds)\n")
        print(rep.format_probe(probe_summary))
    print(
        f"\n{trained} run(s) trained here in {payload['cpu_seconds']:.0f} CPU s "
        f"({payload['wall_seconds']:.0f} s wall); "
        f"CPU s in the table: CPU time of each run's process (one thread unless --threads); "
        f"wrote {args.out / 'ablation.json'} and {args.out / 'ablation.png'}"
    )
    return 0


def _koleo_on_long_tailed(
    args: argparse.Namespace, parser, cfg: TrainConfig, data, dataset: dict, seeds: list[int], command: str
) -> int:
    """``--long-tailed``: the KoLeo cells on long-tailed data, paired by seed against DINO-vMF without KoLeo."""
    from . import ablation_report as rep
    from .report import environment, write_json

    cells = [cell for cell, _ in KOLEO_CELLS]
    jobs = [("long_tailed", cell, replace(cfg, koleo_weight=w), s) for s in seeds for cell, w in KOLEO_CELLS]
    counts = ", ".join(str(n) for n in dataset["class_counts"])
    print(
        f"vmf-head ablation --long-tailed: {data.name}, {dataset['train']} training images (per class {counts}) / "
        f"{dataset['test']} held-out (balanced); {len(cells)} cells x {len(seeds)} seed(s); {cfg.epochs} epochs, "
        f"K={cfg.out_dim}, p={cfg.bottleneck_dim}; {torch.get_num_threads()} thread(s); out {args.out}",
        flush=True,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    results, trained = _train_all(jobs, args, parser, data, dataset)
    runs = results["long_tailed"]
    summary = rep.summarize(runs, cells, KOLEO_BASELINE, cfg.out_dim)
    factor_rows = rep.contrasts(
        runs, tuple((f"KoLeo-proto, weight {w:g}", cell.name, KOLEO_BASELINE) for cell, w in KOLEO_CELLS[1:])
    )
    payload = {
        "command": command,
        "dataset": dataset,
        "config": asdict(cfg),
        "cells": [{**asdict(cell), "koleo_weight": w} for cell, w in KOLEO_CELLS],
        "seeds": seeds,
        "environment": environment(),
        "trained_here": trained,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "summary": summary,
        "contrasts": factor_rows,
        "runs": [_compact(r, rep.divergence_flags(r, cfg.out_dim)) for r in runs],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "long_tailed.json", payload)
    spread = f"mean ± sd over {len(seeds)} seeds; Δ: paired difference, points, 95% t interval over seeds"
    print(f"\nKoLeo-proto on long-tailed data ({spread})\n")
    print(rep.format_koleo_table(summary, {cell.name: w for cell, w in KOLEO_CELLS}, cfg.out_dim))
    print(
        f"\n{trained} run(s) trained here in {payload['cpu_seconds']:.0f} CPU s "
        f"({payload['wall_seconds']:.0f} s wall); wrote {args.out / 'long_tailed.json'}"
    )
    return 0
