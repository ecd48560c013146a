"""The demo's outputs: summary statistics over seeds, the printed table, ``results.json`` and
``demo.png`` (loss curves, k-NN accuracy, kappa histogram, prototype utilisation)."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from pathlib import Path

CURVE_STYLES = (
    {"lw": 4.0, "alpha": 0.45, "ls": "-"},
    {"lw": 1.4, "alpha": 1.0, "ls": "--"},
    {"lw": 1.6, "alpha": 1.0, "ls": "-"},
    {"lw": 1.4, "alpha": 1.0, "ls": ":"},
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
SUMMARY_KEYS = (
    "knn",
    "linear",
    "utilization",
    "effective_clusters",
    "distinct_prototypes",
    "kappa_median",
    "seconds",
    "cpu_seconds",
)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation, min, max and count ``n`` of the finite ``values``; ``std``
    is None for a single value (a spread needs two) and ``mean`` None when none is finite."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return {"mean": statistics.fmean(finite), "std": std, "min": min(finite), "max": max(finite), "n": len(finite)}


def summarize(runs: list[dict], references: dict[str, tuple[str, list[dict]]]) -> dict[str, dict]:
    """Mean, sample standard deviation, min and max over seeds of every ``SUMMARY_KEYS`` entry,
    per method (in first-seen order), after the reference rows: ``references`` maps a name to
    ``(label, [{"knn": ..., "linear": ...} per seed])`` (raw pixels, the untrained backbone)."""
    out: dict[str, dict] = {}
    for name, (label, rows) in references.items():
        out[name] = {
            "label": label,
            "knn": mean_std([r["knn"] for r in rows]),
            "linear": mean_std([r["linear"] for r in rows]),
        }
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        row = {"label": mine[0]["label"], "diverged": sum(r["diverged"] for r in mine)}
        for key in SUMMARY_KEYS:
            vals = [r[key] if key in r else r["diagnostics"].get(key, math.nan) for r in mine]
            row[key] = mean_std([float(v) for v in vals])
        out[name] = row
    return out


def _cell(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if stat is None or stat["n"] == 0:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def format_table(summary: dict[str, dict], n_seeds: int, out_dim: int) -> str:
    """Markdown table: accuracies in %, mean ± sample std over seeds."""
    spread = f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""
    head = [
        "method",
        "k-NN top-1 %",
        "linear %",
        f"used prototypes (of {out_dim})",
        "effective clusters",
        "distinct prototypes",
        "median kappa",
        "wall s",
        "CPU s",
    ]
    note = (
        "wall s: elapsed seconds of the run, which include waiting for a core when the machine is shared; "
        "CPU s: CPU seconds of the process over the run, all its threads summed."
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.values():
        label = row["label"] + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
        cells = [
            label,
            _cell(row["knn"], 100),
            _cell(row["linear"], 100),
            _cell(row.get("utilization"), digits=0),
            _cell(row.get("effective_clusters")),
            _cell(row.get("distinct_prototypes"), digits=0),
            _cell(row.get("kappa_median")),
            _cell(row.get("seconds"), digits=0),
            _cell(row.get("cpu_seconds"), digits=0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return f"Held-out accuracy of the teacher backbone{spread}\n\n" + "\n".join(lines) + f"\n\n{note}"


def environment() -> dict:
    """What produced a result: package, torch and Python versions, torch's thread count."""
    import platform

    import torch

    from .. import __version__

    return {
        "vmf_head": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, payload: dict) -> None:
    def clean(x):
        # JSON has no NaN/inf; null marks them (a diverged run's loss, say).
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(payload), indent=1))


def _smooth(values: list[float], width: int) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in values:
        window.append(v)
        acc += v
        if len(window) > width:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def plot(path: Path, runs: list[dict], summary: dict[str, dict], out_dim: int) -> None:
    """Six panels: loss per step, k-NN accuracy per evaluation epoch, final accuracies with the
    spread over seeds, the final teacher kappa histogram, batch utilisation and effective
    number of clusters over training. Curves are means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [name for name in summary if "seconds" in summary[name]]
    colors = {name: f"C{i}" for i, name in enumerate(methods)}
    # DINO and "DINO, free norms" often coincide: the first method is drawn wide and pale, the
    # next ones thinner and dashed on top of it, so every curve stays visible.
    styles = {name: CURVE_STYLES[i % len(CURVE_STYLES)] for i, name in enumerate(methods)}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax_loss, ax_knn, ax_bar, ax_kappa, ax_util, ax_eff = axes.ravel()
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        label, color = summary[name]["label"], colors[name]
        loss = _mean_curve([r["history"]["loss"] for r in mine])
        style = styles[name]
        ax_loss.plot(_smooth(loss, max(1, len(loss) // 50)), color=color, label=label, **style)
        if all(r["history"]["knn"] for r in mine):
            knn = _mean_curve([r["history"]["knn"] for r in mine])
            epochs = mine[0]["history"]["knn_epoch"][: len(knn)]
            ax_knn.plot(
                epochs,
                [100 * v for v in knn],
                marker=MARKERS[methods.index(name) % len(MARKERS)],
                color=color,
                label=label,
                **style,
            )
        steps = mine[0]["history"]["diag_step"]
        for key, ax in (("utilization", ax_util), ("effective_clusters", ax_eff)):
            curve = _mean_curve([[d[key] for d in r["history"]["diag"]] for r in mine])
            ax.plot(steps[: len(curve)], curve, color=color, label=label, **style)
        kappa = [k for r in mine for k in r["kappa"]]
        ax_kappa.hist(
            kappa,
            bins=40,
            histtype="step",
            color=color,
            label=label,
            ls=style["ls"],
            linewidth=max(1.5, style["lw"] / 2),
        )
    for i, name in enumerate(n for n in summary if n not in methods):
        ax_knn.axhline(
            100 * summary[name]["knn"]["mean"], color="grey", ls=("--", ":")[i % 2], label=summary[name]["label"]
        )
    ax_loss.set(title="training loss (smoothed)", xlabel="step", ylabel="loss")
    ax_knn.set(title="k-NN top-1 (k=20, T=0.07), held-out", xlabel="epoch", ylabel="accuracy %")
    ax_util.set(title="prototypes used in a batch (argmax)", xlabel="step", ylabel="count")
    ax_eff.set(title="effective clusters exp H(mean teacher prob.)", xlabel="step", ylabel="clusters")
    ax_kappa.set(title="teacher kappa_k = ||w_k|| / tau_t at the end", xlabel="kappa", ylabel="prototypes")

    names = list(summary)
    x = range(len(names))
    for offset, key, hatch in ((-0.2, "knn", None), (0.2, "linear", "//")):
        means = [100 * summary[n][key]["mean"] for n in names]
        stds = [100 * (summary[n][key]["std"] or 0.0) for n in names]
        ax_bar.bar(
            [i + offset for i in x],
            means,
            0.4,
            yerr=stds,
            capsize=3,
            hatch=hatch,
            color=[colors.get(n, "lightgrey") for n in names],
            edgecolor="black",
            label="k-NN" if key == "knn" else "linear probe",
        )
    lo = min(100 * summary[n][k]["mean"] for n in names for k in ("knn", "linear") if summary[n][k]["n"])
    ax_bar.set_ylim(max(0, lo - 10), 100)
    ax_bar.set_xticks(list(x), [textwrap.fill(summary[n]["label"], 12) for n in names], fontsize=8)
    ax_bar.set(title="held-out accuracy (bars: mean, whiskers: std)", ylabel="accuracy %")
    for ax in (ax_loss, ax_knn, ax_bar, ax_kappa, ax_util, ax_eff):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"vmf-head demo: DINO vs DINO-vMF, K = {out_dim} prototypes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
