"""``vmf-head collapse``: the two collapses of the DINO family reproduced with the demo's code, and a healthy
run, with the collapse monitor watching: when it flags them, against when the loss curve says so.

Every run is the demo's :func:`~vmf_head.demo.train.train_one`, whose loop steps a
:class:`vmf_head.diagnostics.CollapseMonitor` with the teacher's targets (every ``monitor_every`` steps a
check). Runs are written to ``OUT/runs/<reproduction>-seed<S>.json`` and read back when there, as in
``vmf-head ablation``, so the command resumes and can run one seed per process.

The loss-curve criteria (per step, on the mean loss of the last ``monitor_every`` steps, the window a
check sees): "uniform" when it is at least ``STUCK_FRACTION`` (99%) of log K, the ablation's "stuck at
log K" flag; "one-hot" when it is at most 10% of log K (a DINO loss near 0 means the student matches
targets that no longer depend on the image). Both are reported twice: the first step they hold, and the
step from which they hold to the end of the run (which only hindsight knows).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .ablation_report import STUCK_FRACTION
from .train import Method, TrainConfig

ONE_HOT_LOSS_FRACTION = 0.1


@dataclass(frozen=True)
class Reproduction:
    """A run of the demo set up to end in ``expected`` (a monitor status), with its config changes."""

    name: str
    label: str
    expected: str
    changes: dict = field(default_factory=dict)


DINO_VMF = {"norm_last_layer": False, "vmf": True, "centering": "probability"}
REPRODUCTIONS = (
    # The ablation's stability probe: 100x the learning rate ends every cell at log K (docs/ablation.md).
    Reproduction("uniform", "DINO-vMF at lr 0.1 (100x)", "uniform", {"lr": 0.1, "epochs": 20}),
    # docs/demo.md: at a teacher temperature of 0.02 DINO-vMF's loss fell to 0.008 in about 100 steps.
    Reproduction(
        "one-hot",
        "DINO-vMF at teacher temperature 0.02",
        "one-hot",
        {"teacher_temp": 0.02, "warmup_teacher_temp": 0.02, "epochs": 15},
    ),
    Reproduction("healthy", "DINO-vMF, the demo's defaults", "ok"),
)
QUICK = {
    "epochs": 2,
    "train_images": 256,
    "out_dim": 64,
    "hidden_dim": 32,
    "bottleneck_dim": 16,
    "width": 4,
    "monitor_every": 2,
}

DESCRIPTION = """\
Reproduce a uniform collapse (DINO-vMF at 100x the learning rate: the loss ends at log K) and a one-hot
collapse (DINO-vMF at teacher temperature 0.02: the loss falls to 0) with the demo's data, networks and
loop, and a healthy run (the demo's defaults), while vmf_head.diagnostics.CollapseMonitor checks the
teacher's targets every 10 steps. For every run: the first check the monitor does not call ok, the
first check it flags with the expected collapse (and from which check on it flags every check),
against the first step the loss curve meets its criterion (the mean loss of the last 10 steps >= 99%
of log K for uniform, <= 10% of log K for one-hot; for the healthy run, either).

Outputs in --out: runs/ (one JSON per run, with every monitor report; a run found there is not trained
again), collapse.json and the table printed at the end. One seed of the three runs takes about 2.5 CPU
minutes on one thread (30 s, 25 s and 90 s)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmf-head collapse", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = ", ".join(r.name for r in REPRODUCTIONS)
    parser.add_argument("--runs", default=",".join(r.name for r in REPRODUCTIONS), help=f"subset of {names}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds SEED .. SEED+N-1 (default 5; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny networks and budget: a smoke test of seconds")
    parser.add_argument("--out", type=Path, default=Path("vmf_collapse_out"), help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _first(flags: list[bool], steps: list[int]) -> int | None:
    return next((s for s, f in zip(steps, flags) if f), None)


def _from(flags: list[bool], steps: list[int]) -> int | None:
    """The step from which every flag to the end is set (None if the last one is not)."""
    start = None
    for s, f in zip(steps, flags):
        if not f:
            start = None
        elif start is None:
            start = s
    return start


def timing(run: dict, expected: str, out_dim: int, window: int) -> dict:
    """When the monitor and the loss curve say ``expected`` ("ok": when they first say anything else), and
    the monitor's first check that was not "ok", whatever it said."""
    reports = run["history"]["monitor"]
    checks = [r["step"] for r in reports]
    flagged = [(r["status"] == expected) if expected != "ok" else (r["status"] != "ok") for r in reports]
    loss = run["history"]["loss"]
    log_k = math.log(out_dim)
    steps = list(range(window, len(loss) + 1))
    mean = [statistics.fmean(loss[s - window : s]) for s in steps]
    uniform = [m >= STUCK_FRACTION * log_k for m in mean]
    one_hot = [m <= ONE_HOT_LOSS_FRACTION * log_k for m in mean]
    loss_flags = {"uniform": uniform, "one-hot": one_hot, "ok": [u or o for u, o in zip(uniform, one_hot)]}[expected]
    alarm = next((r for r in reports if r["status"] != "ok"), None)
    return {
        "monitor_first_alarm": None if alarm is None else f"{alarm['step']} ({alarm['status']})",
        "monitor_first": _first(flagged, checks),
        "monitor_from": _from(flagged, checks) if expected != "ok" else None,
        "loss_first": _first(loss_flags, steps),
        "loss_from": _from(loss_flags, steps) if expected != "ok" else None,
        "checks": len(reports),
        "checks_by_status": {
            s: sum(r["status"] == s for r in reports) for s in dict.fromkeys(r["status"] for r in reports)
        },
        "steps": len(loss),
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table: per run, when the monitor flags the expected collapse and when the loss does."""
    head = [
        "run",
        "seed",
        "steps",
        "monitor: first check not ok",
        "monitor: first check flagged",
        "monitor: flags every check from",
        "loss: criterion first met",
        "loss: met at every step from",
        "checks by status",
        "final loss",
        "k-NN %",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def step(s: int | None) -> str:
        return "-" if s is None else str(s)

    for row in rows:
        t = row["timing"]
        statuses = ", ".join(f"{v} {k}" for k, v in t["checks_by_status"].items())
        cells = [row["label"], row["seed"], t["steps"], t["monitor_first_alarm"] or "-"]
        cells += [step(t["monitor_first"]), step(t["monitor_from"])]
        cells += [step(t["loss_first"]), step(t["loss_from"]), statuses, f"{row['final_loss']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + f" | {100 * row['knn']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .ablation import run_cell
    from .cli import missing_extra

    parser = build_parser()
    args = parser.parse_args(argv)
    if missing_extra("collapse"):
        return 2
    chosen = [n.strip() for n in args.runs.split(",") if n.strip()]
    known = {r.name: r for r in REPRODUCTIONS}
    if not chosen or any(n not in known for n in chosen):
        parser.error(f"--runs must be a comma-separated subset of {', '.join(known)}, got {args.runs!r}")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    if n_seeds < 1 or args.threads < 1:
        parser.error(f"need --seeds >= 1 and --threads >= 1, got {n_seeds} and {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA GPU; use --device cpu")
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    from .data import load_digits
    from .report import environment, write_json

    data = load_digits()
    dataset = {"name": data.name, "train": len(data.train_labels), "test": len(data.test_labels)}
    base = replace(TrainConfig(), device=args.device, **(QUICK if args.quick else {}))
    jobs = []
    for seed in range(args.seed, args.seed + n_seeds):
        for name in chosen:
            rep = known[name]
            changes = {k: v for k, v in rep.changes.items() if not (args.quick and k == "epochs")}
            jobs.append((rep, Method(rep.name, rep.label, **DINO_VMF), replace(base, **changes), seed))
    print(
        f"vmf-head collapse: {', '.join(chosen)} x {n_seeds} seed(s), {torch.get_num_threads()} thread(s); "
        f"out {args.out}",
        flush=True,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    rows, trained = [], 0
    for rep, method, cfg, seed in tqdm(jobs, desc="collapse", unit="run", disable=args.no_progress):
        try:
            run, fresh = run_cell(args.out / "runs", method, data, cfg, seed, dataset, progress=not args.no_progress)
        except ValueError as err:
            parser.error(str(err))
        trained += fresh
        loss = [v for v in run["history"]["loss"] if math.isfinite(v)]
        tail = loss[-max(1, len(loss) // 20) :]
        rows.append(
            {
                "name": rep.name,
                "label": rep.label,
                "expected": rep.expected,
                "seed": seed,
                "config": asdict(cfg),
                "knn": run["knn"],
                "linear": run["linear"],
                "final_loss": statistics.fmean(tail),
                "cpu_seconds": run["cpu_seconds"],
                "timing": timing(run, rep.expected, cfg.out_dim, cfg.monitor_every),
            }
        )
    payload = {
        "command": "vmf-head collapse " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "trained_here": trained,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "collapse.json", payload)
    print()
    print(format_table(rows))
    print(
        f"\n{trained} run(s) trained here in {payload['cpu_seconds']:.0f} CPU s "
        f"({payload['wall_seconds']:.0f} s wall); wrote {args.out / 'collapse.json'}"
    )
    return 0
