"""`vmf-head ablation --quick` end to end, its resumability, and its statistics against scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the ablation needs scikit-learn (demo extra)")
pytest.importorskip("matplotlib", reason="the ablation needs matplotlib (demo extra)")
pytest.importorskip("tqdm", reason="the ablation needs tqdm (demo extra)")
stats = pytest.importorskip("scipy.stats")

from vmf_head.__main__ import main as vmf_head_main  # noqa: E402
from vmf_head.demo import ablation  # noqa: E402
from vmf_head.demo import ablation_report as rep  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    # The commands set torch's thread count for the whole process (default 1); the rest of the
    # suite should keep its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite(x) -> bool:
    if isinstance(x, (bool, int)):
        return True
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return x is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert ablation.main(["--quick", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "ablation.json").read_text())


def test_cells_are_the_distinct_cells_of_the_grid():
    cells = ablation.CELLS
    assert len({(c.norm_last_layer, c.vmf, c.centering, c.mode) for c in cells}) == len({c.name for c in cells}) == 7
    free = {(c.vmf, c.centering) for c in cells if not c.norm_last_layer and c.mode == "exact"}
    assert free == {(v, c) for v in (False, True) for c in ("logit", "probability")}
    # Unit norms: the correction is a constant, so one cell per centering and no vMF variant.
    assert sorted(c.centering for c in cells if c.norm_last_layer) == ["logit", "probability"]
    assert not any(c.vmf for c in cells if c.norm_last_layer)
    assert [(c.norm_last_layer, c.vmf, c.centering) for c in cells if c.mode == "approx"] == [
        (False, True, "probability")
    ]


def test_quick_writes_finite_numbers_for_all_seven_cells(quick):
    out, result = quick
    assert list(result["summary"]) == [c.name for c in ablation.CELLS]
    assert result["seeds"] == [0, 1] and result["trained_here"] == 7 * 2 + 3 * 1
    assert result["environment"]["vmf_head"]
    for name, row in result["summary"].items():
        for key in ("knn", "linear", "utilization", "effective_clusters", "distinct_prototypes", "kappa_ratio"):
            assert row[key]["n"] == 2 and _finite(row[key]), (name, key)
        assert 0 <= row["knn"]["mean"] <= 1 and 0 <= row["linear"]["mean"] <= 1
        if name != "dino":
            for key in ("knn_vs_dino", "linear_vs_dino"):
                d = row[key]
                assert d["n"] == 2 and d["ci_low"] <= d["mean"] <= d["ci_high"], (name, key)
        if row["norm_last_layer"]:
            assert "norm_groups" not in row and row["kappa_ratio"]["mean"] == pytest.approx(1.0, abs=1e-5)
        else:
            groups = row["norm_groups"]
            assert _finite(groups["accuracy"]) and len(groups["accuracy"]) == rep.NORM_GROUPS
            assert groups["top_minus_bottom"]["n"] == 2 and _finite(groups["top_minus_bottom"]["ci_low"])
    assert [c["cell"] for c in result["contrasts"]] == [c[1] for c in ablation.CONTRASTS]
    free = next(c for c in result["contrasts"] if c["cell"] == "dino-free")
    assert free["knn"] == result["summary"]["dino-free"]["knn_vs_dino"]  # the same pairs, the same interval
    assert all(c[key]["n"] == 2 and _finite(c[key]["ci_low"]) for c in result["contrasts"] for key in ("knn", "linear"))
    assert len(result["random_init"]) == 2 and all(0 <= r["knn"] <= 1 for r in result["random_init"])
    assert set(result["probe"]) == {c.name for c in ablation.PROBE_CELLS}
    assert result["probe_config"]["lr"] == ablation.PROBE["lr"]
    for run in result["runs"] + result["probe_runs"]:
        assert _finite(run) and set(run["flags"]) == {"nonfinite", "collapsed", "stuck"}
    assert len(list((out / "runs").glob("*.json"))) == 14 and len(list((out / "probe").glob("*.json"))) == 3
    assert (out / "ablation.png").stat().st_size > 20_000


def test_a_cell_already_in_out_is_not_trained_again(quick, tmp_path, monkeypatch):
    out, first = quick
    for kind in ("runs", "probe"):
        (tmp_path / kind).mkdir()
        for f in (out / kind).glob("*.json"):
            (tmp_path / kind / f.name).write_text(f.read_text())
    (tmp_path / "runs" / "dino-vmf-seed1.json").unlink()
    from vmf_head.demo import train

    trained = []
    real = train.train_one
    monkeypatch.setattr(
        train, "train_one", lambda method, *a, **k: trained.append(method.name) or real(method, *a, **k)
    )
    assert ablation.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "ablation.json").read_text())
    assert trained == ["dino-vmf"] and again["trained_here"] == 1
    # Same seed, same data order, same initial weights: the retrained run reproduces the first.
    assert again["summary"]["dino-vmf"]["knn"] == first["summary"]["dino-vmf"]["knn"]
    assert again["summary"]["dino-vmf"]["linear"] == first["summary"]["dino-vmf"]["linear"]


def test_runs_of_another_configuration_are_refused(quick, tmp_path):
    out, _ = quick
    (tmp_path / "runs").mkdir()
    stored = json.loads((out / "runs" / "dino-seed0.json").read_text())
    stored["config"]["lr"] *= 2
    (tmp_path / "runs" / "dino-seed0.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit) as info:
        ablation.main(["--quick", "--no-progress", "--seeds", "1", "--probe-seeds", "0", "--out", str(tmp_path)])
    assert info.value.code == 2


def test_command_is_dispatched(capsys):
    with pytest.raises(SystemExit) as info:
        vmf_head_main(["ablation", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seeds", "--quick", "--out", "--threads", "--data", "--probe-seeds"):
        assert option in text
    assert vmf_head_main(["--help"]) == 0 and "ablation" in capsys.readouterr().out


@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_t_quantile_matches_scipy(level):
    for df in [*range(1, 41), 57, 100, 250]:
        assert rep.t_quantile(level, df) == pytest.approx(stats.t.ppf(0.5 + level / 2, df), rel=1e-9), df


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        a, b = rng.normal(0.9, 0.02, n), rng.normal(0.9, 0.02, n)
        got = rep.paired_difference(dict(enumerate(a)), dict(enumerate(b)))
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert got["n"] == n and got["mean"] == pytest.approx(float(np.mean(a - b)), abs=1e-15)
        assert got["std"] == pytest.approx(float(np.std(a - b, ddof=1)), rel=1e-12)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-15)
    # Pairs are matched by seed; a seed missing or non-finite on either side is dropped.
    got = rep.paired_difference({0: 0.9, 1: 0.8, 2: math.nan, 3: 0.7}, {1: 0.5, 0: 0.6, 2: 0.1, 4: 0.2})
    assert got["seeds"] == [0, 1] and got["mean"] == pytest.approx(0.3) and got["std"] == pytest.approx(0.0, abs=1e-15)
    one = rep.paired_difference({0: 0.9}, {0: 0.8})
    assert one["n"] == 1 and one["std"] is None and one["ci_low"] is None


def test_norm_groups_known_answer():
    # Ten images with norms 10..1 (so the order reverses); correct exactly when the norm is >= 6.
    norms = [float(10 - i) for i in range(10)]
    correct = [n >= 6 for n in norms]
    got = rep.norm_group_accuracy({"assigned_norm": norms, "knn_correct": correct}, n_groups=5)
    assert got["accuracy"] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert got["mean_norm"] == [1.5, 3.5, 5.5, 7.5, 9.5]


def _run(loss: list[float], utilization: int, diverged: bool = False) -> dict:
    return {"history": {"loss": loss}, "diagnostics": {"utilization": utilization}, "diverged": diverged}


def test_divergence_flags():
    k = 64
    log_k = math.log(k)
    assert rep.divergence_flags(_run([5.0, 4.0, 3.0], 10), k) == {
        "nonfinite": False,
        "collapsed": False,
        "stuck": False,
    }
    assert rep.divergence_flags(_run([5.0, math.nan], 10, diverged=True), k)["nonfinite"]
    assert rep.divergence_flags(_run([5.0, 0.01], 1), k)["collapsed"]
    assert rep.divergence_flags(_run([3.0] + [log_k - 0.001] * 40, 7), k)["stuck"]
    assert not rep.divergence_flags(_run([log_k] * 40 + [0.9 * log_k] * 40, 7), k)["stuck"]


def test_kappa_spread_matches_numpy():
    kappa = list(np.random.default_rng(1).uniform(5.0, 30.0, 101))
    got = rep.kappa_spread(kappa)
    p5, p95 = np.percentile(kappa, [5, 95])
    assert (got["kappa_p5"], got["kappa_p95"]) == pytest.approx((p5, p95), rel=1e-12)
    assert got["kappa_cv"] == pytest.approx(np.std(kappa) / np.mean(kappa), rel=1e-12)
    assert rep.kappa_spread([25.0] * 8)["kappa_ratio"] == 1.0


def test_long_tailed_quick_runs_the_koleo_cells_paired_and_resumes(tmp_path):
    argv = ["--quick", "--long-tailed", "--no-progress", "--out", str(tmp_path)]
    assert ablation.main(argv) == 0
    result = json.loads((tmp_path / "long_tailed.json").read_text())
    names = [c.name for c, _ in ablation.KOLEO_CELLS]
    assert list(result["summary"]) == names and result["trained_here"] == len(names) * 2
    assert [c["koleo_weight"] for c in result["cells"]] == [0.0, *ablation.KOLEO_WEIGHTS]
    counts = result["dataset"]["class_counts"]
    assert result["dataset"]["name"] == "digits-longtailed10" and counts[0] == round(10 * counts[-1], -1)
    for name, row in result["summary"].items():
        assert row["knn"]["n"] == 2 and _finite(row["prototype_koleo"]) and sum(row["monitor"].values()) > 0
        if name != ablation.KOLEO_BASELINE:
            assert row[f"knn_vs_{ablation.KOLEO_BASELINE}"]["n"] == 2
    assert [c["cell"] for c in result["contrasts"]] == names[1:]
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    stored = json.loads((tmp_path / "long_tailed" / f"{names[2]}-seed0.json").read_text())
    assert stored["config"]["koleo_weight"] == ablation.KOLEO_WEIGHTS[1] and (names[2], 0) in runs
    assert ablation.main(argv) == 0  # everything read back
    assert json.loads((tmp_path / "long_tailed.json").read_text())["trained_here"] == 0


def test_collapse_quick_and_its_timing(tmp_path):
    from vmf_head.demo import collapse

    assert vmf_head_main(["collapse", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "collapse.json").read_text())
    assert [r["name"] for r in result["rows"]] == [r.name for r in collapse.REPRODUCTIONS]
    assert all(r["timing"]["checks"] == 4 for r in result["rows"]) and len(list((tmp_path / "runs").glob("*"))) == 3
    # Known answers: K = 8 (log K = 2.079), checks every 2 steps, the loss window 2 steps.
    log_k = math.log(8)
    # Means of the 2-step windows ending at steps 2..8: 1.55, 1.835, 2.075, 1.54, 1.54, 2.079, 2.079;
    # 99% of log K is 2.059: met at step 4, and from step 7 to the end.
    loss = [1.5, 1.6, 2.07, 2.08, 1.0, 2.079, 2.079, 2.079]
    statuses = ["ok", "uniform", "ok", "uniform"]
    run = {"history": {"loss": loss, "monitor": [{"step": 2 * i + 2, "status": s} for i, s in enumerate(statuses)]}}
    t = collapse.timing(run, "uniform", 8, 2)
    assert (t["monitor_first"], t["monitor_from"], t["monitor_first_alarm"]) == (4, 8, "4 (uniform)")
    assert 2.075 > 0.99 * log_k > 1.835 and (t["loss_first"], t["loss_from"]) == (4, 7)
    assert t["checks_by_status"] == {"ok": 2, "uniform": 2}
    healthy = collapse.timing(run, "ok", 8, 2)
    assert healthy["monitor_first"] == 4 and healthy["loss_first"] == 4 and healthy["monitor_from"] is None
