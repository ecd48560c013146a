"""Statistics, tables and figure of ``vmf-head ablation``.

Paired statistics: every cell of a seed shares that seed's data order, augmentation draws and
initial weights with the DINO cell of the same seed, so a cell is compared with DINO through the
per-seed differences ``d_s = a_s - b_s`` and Student's t on them (a paired t interval):
``mean(d) ± t_{0.975, n-1} * sd(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

from .report import MARKERS, mean_std

# Final-loss threshold of the "stuck" flag: the mean loss of the last 5% of steps within 1% of
# log K means the teacher targets stayed (near) uniform and the student only matched them.
STUCK_FRACTION = 0.99
NORM_GROUPS = 5  # percentile ranges of the Figure 2 analysis: 0-20, 20-40, ..., 80-100


def _t_central_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df >= 1`` degrees of freedom, by the finite
    sums of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df), ``theta = atan(t / sqrt(df))``."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)  # cos + (2/3) cos^3 + (2*4)/(3*5) cos^5 + ... + cos^(df-2)
        for j in range(3, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0  # 1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ... + cos^(df-2)
    for j in range(2, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student t critical value: the ``t`` with ``P(|T| <= t) = level`` (so
    ``t_quantile(0.95, df)`` is the 0.975 quantile), by bisection on :func:`_t_central_mass`."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"need 0 < level < 1 and df >= 1, got level={level}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central_mass(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """``a - b`` paired by seed (the keys; seeds missing or non-finite in either are dropped).

    Returns ``mean``, ``std`` (sample sd of the differences), ``n``, ``seeds``, and the paired t
    interval ``ci_low``/``ci_high`` at ``level`` (None for n < 2)."""
    seeds = sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s]))
    d = [a[s] - b[s] for s in seeds]
    out: dict = {
        "n": len(d),
        "seeds": seeds,
        "mean": statistics.fmean(d) if d else None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if len(d) >= 2:
        sd = statistics.stdev(d)
        half = t_quantile(level, len(d) - 1) * sd / math.sqrt(len(d))
        out.update(std=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def divergence_flags(run: dict, out_dim: int) -> dict[str, bool]:
    """``nonfinite``: a non-finite loss stopped the run; ``collapsed``: one prototype is the
    teacher's argmax for every training image; ``stuck``: the mean loss of the last 5% of steps is
    within 1% of log K (uniform targets, nothing learned by the head)."""
    loss = [v for v in run["history"]["loss"] if v is not None and math.isfinite(v)]
    tail = loss[-max(1, len(loss) // 20) :]
    return {
        "nonfinite": bool(run["diverged"]),
        "collapsed": run["diagnostics"]["utilization"] <= 1,
        "stuck": bool(tail) and statistics.fmean(tail) >= STUCK_FRACTION * math.log(out_dim),
    }


def kappa_spread(kappa: list[float]) -> dict[str, float]:
    """5th and 95th percentiles of the teacher's ``kappa_k = ||w_k|| / tau_t`` and their ratio
    (1 for DINO's unit prototypes), and the coefficient of variation std / mean."""
    k = sorted(kappa)

    def pct(q: float) -> float:  # linear interpolation between order statistics
        x = q * (len(k) - 1)
        i = min(int(x), len(k) - 2) if len(k) > 1 else 0
        return k[i] if len(k) == 1 else k[i] + (x - i) * (k[i + 1] - k[i])

    p5, p95 = pct(0.05), pct(0.95)
    return {
        "kappa_p5": p5,
        "kappa_p95": p95,
        "kappa_ratio": p95 / p5,
        "kappa_cv": statistics.pstdev(k) / statistics.fmean(k),
    }


def norm_group_accuracy(heldout: dict, n_groups: int = NORM_GROUPS) -> dict[str, list[float]]:
    """The seed's Figure 2 for one run: held-out images sorted by the norm of the prototype they
    are assigned to, cut into ``n_groups`` equal-count percentile ranges (ties broken by image
    index), and the k-NN accuracy and mean assigned norm of each range."""
    norms, correct = heldout["assigned_norm"], heldout["knn_correct"]
    order = sorted(range(len(norms)), key=lambda i: norms[i])
    bounds = [round(g * len(order) / n_groups) for g in range(n_groups + 1)]
    groups = [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]
    return {
        "accuracy": [statistics.fmean(float(correct[i]) for i in g) if g else math.nan for g in groups],
        "mean_norm": [statistics.fmean(norms[i] for i in g) if g else math.nan for g in groups],
    }


def summarize(runs: list[dict], cells: list, baseline: str, out_dim: int) -> dict:
    """Per cell: mean/std over seeds of the accuracies and diagnostics, divergence flag counts,
    the paired difference against ``baseline`` for k-NN and linear accuracy, and (free-norm
    cells) the norm-percentile accuracies averaged over seeds."""
    by_cell = {c.name: [r for r in runs if r["method"] == c.name] for c in cells}
    base = {r["seed"]: r for r in by_cell.get(baseline, [])}
    out: dict = {}
    for cell in cells:
        mine = by_cell[cell.name]
        if not mine:
            continue
        flags = [divergence_flags(r, out_dim) for r in mine]
        spreads = [kappa_spread(r["kappa"]) for r in mine]
        row: dict = {
            "label": cell.label,
            "norm_last_layer": cell.norm_last_layer,
            "vmf": cell.mode if cell.vmf else None,
            "centering": cell.centering,
            "seeds": [r["seed"] for r in mine],
            "flags": {k: sum(f[k] for f in flags) for k in ("nonfinite", "collapsed", "stuck")},
            "final_loss": mean_std([_final_loss(r) for r in mine]),
            "peak_loss": mean_std(
                [
                    max((v for v in r["history"]["loss"] if v is not None and math.isfinite(v)), default=math.nan)
                    for r in mine
                ]
            ),
            "cpu_seconds": mean_std([r["cpu_seconds"] for r in mine]),
            "seconds": mean_std([r["seconds"] for r in mine]),
        }
        for key in ("knn", "linear"):
            row[key] = mean_std([r[key] for r in mine])
            if cell.name != baseline and base:
                row[f"{key}_vs_{baseline}"] = paired_difference(
                    {r["seed"]: r[key] for r in mine}, {s: r[key] for s, r in base.items()}
                )
        for key in ("utilization", "effective_clusters", "distinct_prototypes", "kappa_median"):
            row[key] = mean_std([r["diagnostics"].get(key, math.nan) for r in mine])
        row["prototype_koleo"] = mean_std([r.get("prototype_koleo", math.nan) for r in mine])
        # Checks of the collapse monitor by status, all seeds together.
        statuses = [m["status"] for r in mine for m in r["history"].get("monitor", [])]
        row["monitor"] = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
        for key in ("kappa_p5", "kappa_p95", "kappa_ratio", "kappa_cv"):
            row[key] = mean_std([s[key] for s in spreads])
        if not cell.norm_last_layer:
            groups = [norm_group_accuracy(r["heldout"]) for r in mine]
            row["norm_groups"] = {
                key: [mean_std([g[key][i] for g in groups]) for i in range(NORM_GROUPS)]
                for key in ("accuracy", "mean_norm")
            }
            # Does accuracy rise with the norm? Highest range minus lowest, paired by seed.
            row["norm_groups"]["top_minus_bottom"] = paired_difference(
                {r["seed"]: g["accuracy"][-1] for r, g in zip(mine, groups)},
                {r["seed"]: g["accuracy"][0] for r, g in zip(mine, groups)},
            )
        out[cell.name] = row
    return out


def contrasts(runs: list[dict], pairs: tuple[tuple[str, str, str], ...]) -> list[dict]:
    """One factor of the grid at a time: for each ``(text, cell, reference)`` the paired
    difference ``cell - reference`` of k-NN and linear accuracy (see :func:`paired_difference`)."""

    def by_seed(name: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in runs if r["method"] == name}

    return [
        {
            "text": text,
            "cell": cell,
            "reference": ref,
            **{key: paired_difference(by_seed(cell, key), by_seed(ref, key)) for key in ("knn", "linear")},
        }
        for text, cell, ref in pairs
    ]


def format_contrasts(rows: list[dict], labels: dict[str, str]) -> str:
    """Markdown table of :func:`contrasts`, points with 95% t intervals."""
    lines = ["| factor | cell − reference | Δ k-NN [95% CI] | Δ linear [95% CI] |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['text']} | {labels[row['cell']]} − {labels[row['reference']]} | "
            f"{_ci(row['knn'])} | {_ci(row['linear'])} |"
        )
    return "\n".join(lines)


def _final_loss(run: dict) -> float:
    loss = [v for v in run["history"]["loss"] if v is not None and math.isfinite(v)]
    tail = loss[-max(1, len(loss) // 20) :]
    return statistics.fmean(tail) if tail else math.nan


def pm(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` of a :func:`~vmf_head.demo.report.mean_std` dict, times ``scale``."""
    if not stat or stat["n"] == 0:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _ci(diff: dict | None) -> str:
    if not diff or diff["n"] == 0:
        return "-"
    if diff["ci_low"] is None:
        return f"{100 * diff['mean']:+.1f}"
    return f"{100 * diff['mean']:+.1f} [{100 * diff['ci_low']:+.1f}, {100 * diff['ci_high']:+.1f}]"


def _flags(row: dict) -> str:
    n = len(row["seeds"])
    text = [f"{v}/{n} {k}" for k, v in row["flags"].items() if v]
    return ", ".join(text) if text else "none"


def format_table(summary: dict, baseline: str, out_dim: int) -> str:
    """Markdown table of every cell: accuracies in % (mean ± sample sd over seeds), paired
    difference against the baseline with its 95% t interval in points, diagnostics, flags."""
    head = [
        "cell",
        "prototypes",
        "vMF",
        "centering",
        "k-NN %",
        "Δ k-NN vs DINO [95% CI]",
        "linear %",
        "Δ linear vs DINO [95% CI]",
        f"used (of {out_dim})",
        "effective clusters",
        "distinct",
        "κ median",
        "κ p95/p5",
        "final loss",
        "flags",
        "CPU s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        cells = [
            row["label"],
            "L2-normalised" if row["norm_last_layer"] else "free",
            row["vmf"] or ("constant" if row["norm_last_layer"] else "no"),
            row["centering"],
            pm(row["knn"]),
            _ci(row.get(f"knn_vs_{baseline}")) if name != baseline else "(baseline)",
            pm(row["linear"]),
            _ci(row.get(f"linear_vs_{baseline}")) if name != baseline else "(baseline)",
            pm(row["utilization"], 1, 0),
            pm(row["effective_clusters"], 1, 0),
            pm(row["distinct_prototypes"], 1, 0),
            pm(row["kappa_median"], 1, 1),
            pm(row["kappa_ratio"], 1, 3),
            pm(row["final_loss"], 1, 2),
            _flags(row),
            pm(row["cpu_seconds"], 1, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _monitor(row: dict) -> str:
    counts = row.get("monitor", {})
    flagged = {k: v for k, v in counts.items() if k != "ok"}
    if not counts:
        return "-"
    return ", ".join(f"{v} {k}" for k, v in flagged.items()) + f" of {sum(counts.values())}" if flagged else "all ok"


def format_koleo_table(summary: dict, weights: dict[str, float], out_dim: int) -> str:
    """Markdown table of the KoLeo cells: accuracies in % (mean ± sd over seeds) and their paired
    difference against the cell without KoLeo (weight 0), prototype diagnostics, the final KoLeo of the
    teacher's prototypes, the collapse monitor's flagged checks, flags."""
    baseline = next(name for name, w in weights.items() if w == 0)
    head = [
        "cell",
        "KoLeo weight",
        "k-NN %",
        "Δ k-NN [95% CI]",
        "linear %",
        "Δ linear [95% CI]",
        f"used (of {out_dim})",
        "effective clusters",
        "distinct (cos ≤ 0.99)",
        "prototype KoLeo",
        "monitor checks not ok",
        "final loss",
        "flags",
        "CPU s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        cells = [
            row["label"],
            f"{weights[name]:g}",
            pm(row["knn"]),
            _ci(row.get(f"knn_vs_{baseline}")) if name != baseline else "(reference)",
            pm(row["linear"]),
            _ci(row.get(f"linear_vs_{baseline}")) if name != baseline else "(reference)",
            pm(row["utilization"], 1, 0),
            pm(row["effective_clusters"], 1, 0),
            pm(row["distinct_prototypes"], 1, 0),
            pm(row["prototype_koleo"], 1, 3),
            _monitor(row),
            pm(row["final_loss"], 1, 2),
            _flags(row),
            pm(row["cpu_seconds"], 1, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_norm_groups(summary: dict) -> str:
    """Markdown table of the Figure 2 analysis: k-NN accuracy % per percentile range of the
    assigned prototype's norm (mean ± sd over seeds), free-norm cells."""
    ranges = [f"{100 * g // NORM_GROUPS}-{100 * (g + 1) // NORM_GROUPS}%" for g in range(NORM_GROUPS)]
    lines = [
        "| cell | " + " | ".join(ranges) + " | highest − lowest range [95% CI] | mean norm, lowest → highest range |",
        "|" + "---|" * (NORM_GROUPS + 3),
    ]
    for row in summary.values():
        if "norm_groups" not in row:
            continue
        acc = [pm(s) for s in row["norm_groups"]["accuracy"]]
        norm = row["norm_groups"]["mean_norm"]
        lines.append(
            f"| {row['label']} | " + " | ".join(acc) + f" | {_ci(row['norm_groups']['top_minus_bottom'])} | "
            f"{norm[0]['mean']:.3f} → {norm[-1]['mean']:.3f} |"
        )
    return "\n".join(lines)


def format_probe(summary: dict) -> str:
    """Markdown table of the stability probe: per cell, flags over seeds, final loss, accuracies."""
    lines = [
        "| cell | runs | non-finite loss | collapsed | stuck at log K | peak loss | final loss | k-NN % | linear % "
        "| κ p95/p5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.values():
        f = row["flags"]
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {f['nonfinite']} | {f['collapsed']} | {f['stuck']} | "
            f"{pm(row['peak_loss'], 1, 2)} | {pm(row['final_loss'], 1, 2)} | {pm(row['knn'])} | {pm(row['linear'])} | "
            f"{pm(row['kappa_ratio'], 1, 3)} |"
        )
    return "\n".join(lines)


# The seed's Figure 1 groups bars by the prototype setting, one bar per centering.
GRID_GROUPS = (
    ("L2-normalised\nprototypes", lambda row: row["norm_last_layer"]),
    ("free norms,\nno vMF", lambda row: not row["norm_last_layer"] and row["vmf"] is None),
    ("free norms,\nvMF (exact)", lambda row: row["vmf"] == "exact"),
    ("free norms,\nvMF (approx)", lambda row: row["vmf"] == "approx"),
)
LINESTYLES = ("-", "--", "-.", ":")


def _grid_panel(ax, summary: dict, runs: list[dict], key: str, title: str) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    for g, (_, member) in enumerate(GRID_GROUPS):
        for name, row in summary.items():
            if not member(row):
                continue
            offset = -0.2 if row["centering"] == "logit" else 0.2
            stat = row[key]
            if stat["n"] == 0:
                continue
            ax.bar(
                g + offset,
                100 * stat["mean"],
                0.38,
                yerr=100 * (stat["std"] or 0.0),
                capsize=3,
                color="C0" if row["centering"] == "logit" else "C1",
                hatch=None if row["centering"] == "logit" else "//",
                edgecolor="black",
                alpha=0.8,
            )
            seeds = [100 * r[key] for r in runs if r["method"] == name]
            ax.plot([g + offset] * len(seeds), seeds, "k.", markersize=4)
    lows = [100 * r[key] for r in runs]
    ax.set_ylim(max(0.0, min(lows) - 3), min(100.0, max(lows) + 2))
    ax.set_xticks(range(len(GRID_GROUPS)), [g[0] for g in GRID_GROUPS], fontsize=8)
    ax.legend(
        handles=[
            Patch(facecolor="C0", edgecolor="black", label="logit centering"),
            Patch(facecolor="C1", hatch="//", edgecolor="black", label="probability centering"),
            Line2D([], [], color="black", marker=".", ls="", label="one seed"),
        ],
        fontsize=8,
    )
    ax.set(title=title, ylabel="accuracy %")


def plot(
    path: Path,
    summary: dict,
    runs: list[dict],
    probe_summary: dict,
    probe_runs: list[dict],
    baseline: str,
    out_dim: int,
    probe_out_dim: int,
    probe_text: str,
) -> None:
    """Six panels: the grid as the seed draws it (k-NN and linear; bars mean, whiskers sd, dots
    seeds), paired differences against DINO with 95% intervals, k-NN accuracy per percentile
    range of the assigned prototype's norm (the seed's Figure 2), and the stability probe's loss
    and effective-cluster curves (one line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10.5))
    ax_knn, ax_lin, ax_diff, ax_norm, ax_loss, ax_eff = axes.ravel()
    _grid_panel(ax_knn, summary, runs, "knn", "k-NN top-1 (k=20, T=0.07), held-out")
    _grid_panel(ax_lin, summary, runs, "linear", "linear probe, held-out")

    others = [n for n in summary if n != baseline]
    for j, (key, marker) in enumerate((("knn", "o"), ("linear", "s"))):
        for i, name in enumerate(others):
            d = summary[name].get(f"{key}_vs_{baseline}")
            if not d or d["n"] == 0:
                continue
            y = i + (-0.15 if j == 0 else 0.15)
            lo = 100 * (d["mean"] - d["ci_low"]) if d["ci_low"] is not None else 0.0
            hi = 100 * (d["ci_high"] - d["mean"]) if d["ci_high"] is not None else 0.0
            ax_diff.errorbar(
                100 * d["mean"],
                y,
                xerr=[[lo], [hi]],
                fmt=marker,
                color=f"C{j}",
                capsize=3,
                label=("k-NN" if key == "knn" else "linear probe") if i == 0 else None,
            )
    ax_diff.axvline(0, color="black", lw=1)
    ax_diff.set_yticks(range(len(others)), [textwrap.fill(summary[n]["label"], 18) for n in others], fontsize=8)
    ax_diff.invert_yaxis()
    ax_diff.set(title=f"paired difference vs {summary[baseline]['label']} (95% t interval)", xlabel="points")

    for i, row in enumerate(r for r in summary.values() if "norm_groups" in r):
        acc = row["norm_groups"]["accuracy"]
        ax_norm.errorbar(
            [g + 0.06 * (i - 1.5) for g in range(len(acc))],
            [100 * a["mean"] for a in acc],
            yerr=[100 * (a["std"] or 0.0) for a in acc],
            marker=MARKERS[i % len(MARKERS)],
            ls=LINESTYLES[i % len(LINESTYLES)],
            capsize=2,
            label=row["label"],
        )
    ax_norm.set_xticks(
        range(NORM_GROUPS), [f"{100 * g // NORM_GROUPS}-{100 * (g + 1) // NORM_GROUPS}" for g in range(NORM_GROUPS)]
    )
    ax_norm.set(
        title="k-NN accuracy by percentile range of the assigned\nprototype's norm (the seed's Figure 2)",
        xlabel="percentile range of ||w_k|| over held-out images",
        ylabel="accuracy %",
    )

    for i, name in enumerate(probe_summary):
        for j, run in enumerate(r for r in probe_runs if r["method"] == name):
            label = probe_summary[name]["label"] if j == 0 else None
            ax_loss.plot(
                run["history"]["loss"],
                color=f"C{i + 2}",
                ls=LINESTYLES[i % len(LINESTYLES)],
                lw=0.8,
                alpha=0.8,
                label=label,
            )
            ax_eff.plot(
                run["history"]["diag_step"],
                [d["effective_clusters"] for d in run["history"]["diag"]],
                color=f"C{i + 2}",
                ls=LINESTYLES[i % len(LINESTYLES)],
                lw=0.8,
                alpha=0.8,
                label=label,
            )
    ax_loss.axhline(math.log(probe_out_dim), color="grey", ls=":", label="log K")
    ax_loss.set(
        title=f"stability probe: loss per step, one line per seed\n({probe_text})", xlabel="step", ylabel="loss"
    )
    ax_eff.set_yscale("log")
    ax_eff.set(
        title="stability probe: effective clusters\nexp H(mean teacher probability), one line per seed",
        xlabel="step",
        ylabel="clusters",
    )
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"vmf-head ablation: the DINO-vMF paper's grid at demo scale, K = {out_dim}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
