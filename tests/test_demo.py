"""The demo end to end at a tiny budget, and its evaluation pieces against independent references."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (demo extra)")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (demo extra)")
pytest.importorskip("tqdm", reason="the demo needs tqdm (demo extra)")

import vmf_head
from vmf_head.demo import main
from vmf_head.demo.data import LONG_TAIL_RATIO, MultiCrop, load_digits, load_image_folder, long_tailed
from vmf_head.demo.evaluate import knn_accuracy

# Smaller than --quick: the point is that every stage runs and writes finite numbers.
TINY = [
    "--quick",
    "--epochs",
    "1",
    "--batch-size",
    "96",
    "--local-crops",
    "1",
    "--prototypes",
    "32",
    "--hidden-dim",
    "32",
    "--bottleneck-dim",
    "16",
    "--width",
    "4",
    "--train-images",
    "192",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The commands set torch's thread count for the whole process (default 1); the rest of the
    # suite should keep its own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _all_finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_all_finite(v) for v in x)
    return x is not None


def test_demo_end_to_end(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    for label in ("DINO", "DINO, free norms", "DINO-vMF", "random init", "raw pixels", "k-NN top-1 %"):
        assert label in printed
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert set(result["summary"]) == {"pixels", "random-init", "dino", "dino-free", "dino-vmf"}
    assert len(result["runs"]) == 6 and result["seeds"] == [0, 1]
    for run in result["runs"]:
        assert not run["diverged"]
        assert 0.0 <= run["knn"] <= 1.0 and 0.0 <= run["linear"] <= 1.0
        assert _all_finite(run["diagnostics"]) and _all_finite(run["kappa"]) and _all_finite(run["history"]["loss"])
        assert len(run["kappa"]) == 32
        assert 1 <= run["diagnostics"]["utilization"] <= 32
        assert 1.0 <= run["diagnostics"]["effective_clusters"] <= 32.0 + 1e-6
    for name in ("dino", "dino-free", "dino-vmf"):
        row = result["summary"][name]
        assert row["knn"]["n"] == 2 and math.isfinite(row["knn"]["std"])
    # DINO's prototypes keep norm 1, so every teacher kappa is 1 / tau_t (the demo's teacher
    # temperature is constant by default).
    dino = next(r for r in result["runs"] if r["method"] == "dino")
    tau_t = result["config"]["teacher_temp"]
    assert result["config"]["warmup_teacher_temp"] == tau_t
    assert dino["kappa"] == pytest.approx([1 / tau_t] * 32, rel=1e-5)


def test_demo_on_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("bright", "dark")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 80, size=(10, 12, 3)) + (170 if c == 0 else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    data = load_image_folder(tmp_path / "data", size=8)
    assert data.class_names == ["bright", "dark"] and data.flip
    assert data.train_images.shape[1:] == (3, 8, 8) and len(data.train_labels) + len(data.test_labels) == 12
    assert (
        main(
            [
                *TINY,
                "--methods",
                "dino-vmf",
                "--data",
                str(tmp_path / "data"),
                "--image-size",
                "8",
                "--batch-size",
                "8",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["dataset"]["classes"] == ["bright", "dark"]
    # One seed has no spread: null, not 0.0; the JSON names the package version.
    assert result["summary"]["dino-vmf"]["knn"]["n"] == 1 and result["summary"]["dino-vmf"]["knn"]["std"] is None
    assert result["environment"]["vmf_head"] == vmf_head.__version__ and result["environment"]["threads"] == 1


def test_koleo_and_the_collapse_monitor_in_the_training_loop(tmp_path):
    def run(weight: str, out: str) -> dict:
        # Two epochs: the prototypes are frozen in the first (DINO's freeze_last_layer), trained in the second.
        argv = [*TINY, "--methods", "dino-vmf", "--epochs", "2", "--monitor-every", "1", "--koleo-weight", weight]
        assert main([*argv, "--long-tailed", "--out", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "results.json").read_text())

    with_koleo, without = run("0.5", "koleo"), run("0", "none")
    assert with_koleo["dataset"]["name"] == f"digits-longtailed{LONG_TAIL_RATIO:g}"
    assert with_koleo["config"]["koleo_weight"] == 0.5 and without["config"]["koleo_weight"] == 0.0
    a, b = with_koleo["runs"][0], without["runs"][0]
    assert len(a["history"]["koleo"]) == len(a["history"]["loss"]) == 4 and "koleo" not in b["history"]
    assert _all_finite(a["history"]["koleo"]) and _all_finite(a["prototype_koleo"])
    # Same seed, same data: the loss curves agree until the prototypes move, then KoLeo changes them.
    assert a["history"]["loss"][:3] == b["history"]["loss"][:3] and a["history"]["loss"][3] != b["history"]["loss"][3]
    reports = a["history"]["monitor"]
    assert [r["step"] for r in reports] == [1, 2, 3, 4] and all(
        r["status"] in vmf_head.diagnostics.STATUSES for r in reports
    )
    assert all(r["num_prototypes"] == 32 and r["distinct_prototypes"] <= 32 and "kappa_p95_p5" in r for r in reports)


def test_long_tailed_thins_the_training_split_geometrically():
    data = load_digits()
    lt = long_tailed(data, 10.0)
    n = int(torch.bincount(data.train_labels).min())
    assert torch.bincount(lt.train_labels).tolist() == [round(n * 10 ** (-c / 9)) for c in range(10)]
    assert torch.equal(lt.test_images, data.test_images) and torch.equal(lt.test_labels, data.test_labels)
    # Kept images are training images, with their own labels.
    flat = data.train_images.flatten(1)
    for image, label in zip(lt.train_images.flatten(1)[:50], lt.train_labels[:50]):
        matches = (flat == image).all(dim=1).nonzero().squeeze(1)
        assert len(matches) >= 1 and label in data.train_labels[matches]
    assert long_tailed(data, 1.0).train_labels.numel() == 10 * n
    with pytest.raises(ValueError, match="long-tail ratio must be a finite number >= 1"):
        long_tailed(data, 0.5)


def test_bad_options_exit_with_a_message(tmp_path, capsys):
    for argv in (
        ["--methods", "dino,simclr"],
        ["--seeds", "0"],
        ["--data", str(tmp_path / "missing")],
        ["--bottleneck-dim", "1"],
        ["--koleo-weight", "-1"],
        ["--monitor-every", "0"],
        ["--long-tailed", "0.5"],
    ):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--out", str(tmp_path)])
        assert info.value.code == 2
    assert "--methods" in capsys.readouterr().err


def test_cli_dispatch_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "vmf_head", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--quick", "--seeds", "--data", "--device", "--out", "--prototypes", "--methods", "--koleo-weight"):
        assert option in out


def test_digits_split_is_stratified_and_disjoint():
    data = load_digits(test_fraction=0.25, seed=0)
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert data.train_images.shape[1:] == (1, 8, 8) and not data.flip
    assert float(data.train_images.min()) >= 0.0 and float(data.train_images.max()) <= 1.0
    for c in range(10):
        n_test, n_all = (
            int((data.test_labels == c).sum()),
            int((data.test_labels == c).sum() + (data.train_labels == c).sum()),
        )
        assert abs(n_test - 0.25 * n_all) <= 1
    # No image of the held-out split is also a training image (the same pixels can recur in
    # the data set itself, so compare by count: all 1,797 rows are accounted for once).
    assert len(torch.cat([data.train_images, data.test_images])) == 1797


def test_multicrop_shapes_and_standardisation():
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    aug = MultiCrop(16, 8, 3, mean=mean, std=std, flip=False, jitter=0.0, noise=0.0)
    x = torch.rand(5, 1, 8, 8)
    crops = aug(x, torch.Generator().manual_seed(0))
    assert [c.shape for c in crops] == [(5, 1, 16, 16)] * 2 + [(5, 1, 8, 8)] * 3
    # A constant image stays constant under crops and resampling: (c - mean) / std everywhere.
    const = torch.full((2, 1, 8, 8), 0.75)
    for crop in aug(const, torch.Generator().manual_seed(1)):
        assert torch.allclose(crop, torch.full_like(crop, (0.75 - 0.5) / 0.25), atol=1e-6)


def _knn_reference(train_f, train_y, test_f, test_y, k, t):
    a = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    b = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
    correct = 0
    for i in range(len(b)):
        sims = a @ b[i]
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = {}
        for j in nearest:
            votes[train_y[j]] = votes.get(train_y[j], 0.0) + math.exp(sims[j] / t)
        correct += max(votes, key=votes.get) == test_y[i]
    return correct / len(b)


def test_knn_known_answer_and_reference():
    # Two tight clusters on opposite sides: every query is classified by its side.
    train = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.05], [-1.0, -0.05]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[2.0, 0.0], [-3.0, 0.2]])
    assert knn_accuracy(train, labels, queries, torch.tensor([0, 1]), k=2) == 1.0
    assert knn_accuracy(train, labels, queries, torch.tensor([1, 0]), k=2) == 0.0
    # Weighted votes: one very close neighbour of class 1 beats two far ones of class 0 at small T.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert knn_accuracy(train, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.05]]), torch.tensor([1]), k=3) == 1.0
    rng = np.random.default_rng(3)
    tf, sf = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
    ty, sy = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    got = knn_accuracy(torch.tensor(tf), torch.tensor(ty), torch.tensor(sf), torch.tensor(sy), k=7, temperature=0.07)
    assert got == pytest.approx(_knn_reference(tf, ty, sf, sy, 7, 0.07))
