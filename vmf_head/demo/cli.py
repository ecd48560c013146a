"""``vmf-head demo``: train DINO, DINO with free prototype norms, and DINO-vMF side by side on
real images, evaluate them as the paper does, and show what the vMF mixture learned."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from .train import METHODS, TrainConfig

DESCRIPTION = """\
Train small DINO and DINO-vMF models side by side on real images and compare them.

Default data: the 1,797 handwritten 8x8 digits that ship inside scikit-learn (no download),
75% for self-supervised training, a stratified 25% held out. Views: DINO's multi-crop
(2 global 16x16 crops + local 8x8 crops, random resized crops, brightness/contrast jitter,
pixel noise); no horizontal flips for digits, because a mirrored digit is a different
symbol (flips are on for --data). Backbone: a small CNN. Head and loss: vmf_head's
VMFPrototypeHead and DINOvMFLoss.

Methods (same seed, same data order, same initial weights, same budget):
  dino       DINO: unit-norm prototypes (norm_last_layer=True), logit centering
  dino-free  DINO with learned prototype norms, no vMF correction, logit centering
  dino-vmf   DINO-vMF: learned norms, logits + log C_p(||w_k||/tau), probability centering

Evaluation (as DINO / the DINO-vMF paper): k-NN top-1 (k=20, cosine, votes weighted by
exp(cos/0.07)) and a linear probe (logistic regression) on the frozen teacher backbone's
features of the held-out split. Diagnostics (vmf_head.diagnostics): prototypes used as
argmax, effective number of clusters, distinct prototypes (cosine <= 0.99), kappa = ||w||/tau.

Training also runs vmf_head.diagnostics.CollapseMonitor on the teacher's targets (--monitor-every;
its reports go into results.json) and, with --koleo-weight, KoLeo on the student's prototypes;
--long-tailed thins the training split to a 10:1 class imbalance (docs/collapse.md).

Outputs in --out: results.json (everything, including per-step curves), demo.png, and the
table printed at the end. The default budget takes about 5 minutes on 2 CPU cores;
--quick takes well under a minute."""

# --quick: a smoke test of the whole pipeline, not a meaningful comparison.
QUICK = {
    "epochs": 2,
    "batch_size": 128,
    "n_local": 2,
    "out_dim": 256,
    "hidden_dim": 128,
    "width": 8,
    "train_images": 512,
    "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 1,
    "eval_every": 1,
    "log_every": 2,
}

# (option, TrainConfig field, type, help)
OPTIONS = [
    ("--epochs", "epochs", int, "passes over the training split"),
    ("--batch-size", "batch_size", int, "images per step (each gives 2 global + --local-crops views)"),
    ("--local-crops", "n_local", int, "local crops per image"),
    ("--prototypes", "out_dim", int, "K, number of prototypes (head outputs)"),
    ("--bottleneck-dim", "bottleneck_dim", int, "p, the head's bottleneck: the vMF lives on S^(p-1)"),
    ("--hidden-dim", "hidden_dim", int, "width of the head's MLP"),
    ("--width", "width", int, "channels of the CNN's first stage (features: 4x this)"),
    ("--lr", "lr", float, "peak AdamW learning rate (linear warm-up, then cosine decay)"),
    ("--warmup-epochs", "warmup_epochs", int, "epochs of learning-rate warm-up"),
    ("--momentum-teacher", "momentum_teacher", float, "initial EMA momentum of the teacher (cosine to 1)"),
    ("--warmup-teacher-temp", "warmup_teacher_temp", float, "teacher temperature at the start"),
    ("--teacher-temp", "teacher_temp", float, "teacher temperature after the warm-up"),
    ("--warmup-teacher-temp-epochs", "warmup_teacher_temp_epochs", int, "epochs of teacher temperature warm-up"),
    ("--student-temp", "student_temp", float, "student temperature"),
    (
        "--train-images",
        "train_images",
        int,
        "self-supervise on only the first N training images, 0 for all "
        "(for smoke tests; k-NN and probe still use the whole split)",
    ),
    ("--eval-every", "eval_every", int, "k-NN evaluation every this many epochs (for the curve)"),
    ("--log-every", "log_every", int, "diagnostics every this many steps"),
    ("--monitor-every", "monitor_every", int, "steps between the collapse monitor's checks of the teacher's targets"),
    (
        "--koleo-weight",
        "koleo_weight",
        float,
        "weight of KoLeo on the student's prototype directions (KoLeo-proto) added to the loss; 0: off",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmf-head demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny budget for a smoke test (well under a minute on 2 cores); options given explicitly still win",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="independent repeats (seeds SEED, SEED+1, ...); the table reports mean ± std",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="an ImageFolder directory (DIR/<class>/<image>) of your own images instead of the "
        "digits; read with Pillow, resized to --image-size, classes used only for evaluation",
    )
    parser.add_argument(
        "--image-size", type=int, default=32, help="side images from --data are resized to (default 32)"
    )
    add_long_tailed_option(parser)
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the held-out split, the same for every --seeds repeat (default 0)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out fraction per class (default 0.25)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu (default), cuda, cuda:1, ...; 'cuda' needs a CUDA build and GPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these networks are too small to gain from a second "
        "thread, which stalls the whole run when another job shares the cores)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("vmf_demo_out"),
        help="output directory for results.json and demo.png (default ./vmf_demo_out)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    for flag, name, typ, text in OPTIONS:
        parser.add_argument(
            flag,
            dest=name,
            type=typ,
            default=None,
            help=f"{text} (default {getattr(defaults, name)}; --quick: {QUICK.get(name, getattr(defaults, name))})",
        )
    return parser


def make_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(device=args.device)
    if args.quick:
        cfg = replace(cfg, **QUICK)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    cfg = replace(cfg, **given)
    positive = ("epochs", "batch_size", "out_dim", "hidden_dim", "width", "eval_every", "log_every", "monitor_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.bottleneck_dim < 2:
        raise ValueError(f"--bottleneck-dim must be >= 2 (the sphere S^(p-1) needs p >= 2), got {cfg.bottleneck_dim}")
    if cfg.n_local < 0 or cfg.train_images < 0:
        raise ValueError(f"--local-crops and --train-images must be >= 0, got {cfg.n_local} and {cfg.train_images}")
    for name in ("lr", "teacher_temp", "warmup_teacher_temp", "student_temp"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not cfg.koleo_weight >= 0:
        raise ValueError(f"--koleo-weight must be >= 0, got {cfg.koleo_weight}")
    if not 0 <= cfg.momentum_teacher < 1:
        raise ValueError(f"--momentum-teacher must be in [0, 1), got {cfg.momentum_teacher}")
    if cfg.warmup_teacher_temp_epochs > cfg.epochs:
        cfg = replace(cfg, warmup_teacher_temp_epochs=cfg.epochs)
    return cfg


def _parse_methods(text: str) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got {text!r}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def add_long_tailed_option(parser: argparse.ArgumentParser) -> None:
    """``--long-tailed [RATIO]``: the training split thinned geometrically (``data.long_tailed``)."""
    from .data import LONG_TAIL_RATIO

    parser.add_argument(
        "--long-tailed",
        type=float,
        nargs="?",
        const=LONG_TAIL_RATIO,
        default=None,
        metavar="RATIO",
        help="thin the training split geometrically over the classes, the largest keeping RATIO times as "
        f"many images as the smallest (default ratio {LONG_TAIL_RATIO:g}); the held-out split stays balanced",
    )


def load_data(args: argparse.Namespace, test_fraction: float = 0.25, split_seed: int = 0):
    """The data set of ``--data`` / ``--image-size``, long-tailed with ``--long-tailed``."""
    from .data import load_dataset, long_tailed

    data = load_dataset(args.data, args.image_size, test_fraction, seed=split_seed)
    return data if args.long_tailed is None else long_tailed(data, args.long_tailed)


def missing_extra(command: str) -> bool:
    """True (after saying so on stderr) when the demo extra's packages are not installed."""
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        print(
            f"vmf-head {command} needs the demo extra ({err.name} is missing): pip install 'vmf-head[demo]'",
            file=sys.stderr,
        )
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if missing_extra("demo"):
        return 2
    try:
        methods = _parse_methods(args.methods)
        cfg = make_config(args)
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: this torch build sees no CUDA GPU; use --device cpu")
        torch.device(cfg.device)
        data = load_data(args, args.test_fraction, args.split_seed)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    from .report import environment, format_table, plot, summarize, write_json
    from .train import evaluate_pixels, evaluate_random_init, train_one

    print(
        f"vmf-head demo: {data.name}, {len(data.train_labels)} training / {len(data.test_labels)} held-out images, "
        f"{len(data.class_names)} classes; {len(methods)} methods x {args.seeds} seed(s), {cfg.epochs} epochs, "
        f"K={cfg.out_dim}, p={cfg.bottleneck_dim}, 2+{cfg.n_local} crops, device {cfg.device}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    runs, baselines = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        baselines.append({"seed": seed, **evaluate_random_init(data, cfg, seed)})
        for method in methods:
            result = train_one(method, data, cfg, seed, progress=not args.no_progress)
            runs.append(result)
            status = "DIVERGED (non-finite loss)" if result["diverged"] else ""
            print(
                f"  {method.label:<18} seed {seed}: k-NN {100 * result['knn']:.1f}%  linear "
                f"{100 * result['linear']:.1f}%  ({result['seconds']:.0f} s, {result['cpu_seconds']:.0f} CPU s) "
                f"{status}",
                flush=True,
            )
    pixels = evaluate_pixels(data)
    references = {
        "pixels": ("raw pixels (no network)", [pixels]),
        "random-init": ("random init (untrained)", baselines),
    }
    summary = summarize(runs, references)
    table = format_table(summary, args.seeds, cfg.out_dim)

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "vmf-head demo " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": {
            "name": data.name,
            "train": len(data.train_labels),
            "test": len(data.test_labels),
            "classes": data.class_names,
            "flip": data.flip,
            "split_seed": args.split_seed,
        },
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "environment": environment(),
        "total_seconds": time.perf_counter() - start,
        "total_cpu_seconds": time.process_time() - start_cpu,
        "summary": summary,
        "random_init": baselines,
        "pixels": pixels,
        "runs": runs,
    }
    write_json(args.out / "results.json", payload)
    plot(args.out / "demo.png", runs, summary, cfg.out_dim)
    print()
    print(table)
    print(f"\n{_verdict(summary)}")
    print(
        f"total {payload['total_seconds']:.0f} s ({payload['total_cpu_seconds']:.0f} CPU s); "
        f"wrote {args.out / 'results.json'} and {args.out / 'demo.png'}"
    )
    return 0


def _verdict(summary: dict) -> str:
    """One honest sentence on DINO-vMF vs DINO's k-NN accuracy, judged against the seed spread."""
    if "dino" not in summary or "dino-vmf" not in summary:
        return "(run both dino and dino-vmf for a comparison)"
    a, b = summary["dino"]["knn"], summary["dino-vmf"]["knn"]
    if a["n"] == 0 or b["n"] == 0:
        return "DINO or DINO-vMF diverged in every seed: no comparison."
    diff = 100 * (b["mean"] - a["mean"])
    if b["n"] < 2 or a["n"] < 2:
        return f"DINO-vMF - DINO k-NN: {diff:+.1f} points (one seed: run --seeds 3 or more to judge the spread)."
    spread = 100 * max(a["std"], b["std"])
    if abs(diff) <= spread:
        return f"DINO-vMF - DINO k-NN: {diff:+.1f} points, within the seed spread ({spread:.1f}): no clear winner."
    return f"DINO-vMF - DINO k-NN: {diff:+.1f} points, beyond the seed spread ({spread:.1f})."
