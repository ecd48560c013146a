"""vmf_head.diagnostics.CollapseMonitor on synthetic teachers whose collapse starts at a known step: when
it flags them, what it reports (against scipy and the one-off diagnostics on the same rows), that it
reads nothing to the host between checks, and its errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sync_ops import count_syncs

from vmf_head.diagnostics import (
    STATUSES,
    CollapseMonitor,
    CollapseReport,
    CollapseWarning,
    count_distinct_prototypes,
    effective_num_clusters,
    prototype_utilization,
)

K, N = 256, 64


def healthy(gen: torch.Generator, n: int = N, k: int = K) -> torch.Tensor:
    """A working teacher: every image has its own fairly sharp target, the batch spread over the prototypes."""
    logits = torch.randn(n, k, generator=gen)
    logits[torch.arange(n), torch.randint(k, (n,), generator=gen)] += 6.0
    return torch.softmax(logits, dim=1)


def uniform(gen: torch.Generator, n: int = N, k: int = K) -> torch.Tensor:
    """Uniform collapse: every target (nearly) flat, whatever the image."""
    return torch.softmax(0.01 * torch.randn(n, k, generator=gen), dim=1)


def one_hot(gen: torch.Generator, n: int = N, k: int = K) -> torch.Tensor:
    """One-hot collapse: every image sent to prototype 7."""
    logits = torch.randn(n, k, generator=gen)
    logits[:, 7] += 30.0
    return torch.softmax(logits, dim=1)


def _run(monitor: CollapseMonitor, steps: int, onset: int, collapsed) -> dict[int, CollapseReport]:
    gen = torch.Generator().manual_seed(0)
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        for step in range(1, steps + 1):
            report = monitor.step(collapsed(gen) if step >= onset else healthy(gen))
            assert (report is None) == (step % monitor.every != 0)
            if report is not None:
                reports[step] = report
    return reports


@pytest.mark.parametrize("collapsed, status", [(uniform, "uniform"), (one_hot, "one-hot")])
@pytest.mark.parametrize("onset", [101, 150, 199])
def test_flags_a_collapse_within_one_check_of_its_onset(collapsed, status, onset):
    every = 50
    reports = _run(CollapseMonitor(every), 400, onset, collapsed)
    first_whole_window = every * math.ceil((onset - 1) / every) + every  # the first check seeing only collapse
    for step, report in reports.items():
        if step < onset:
            assert report.status == "ok", (step, report)
        elif step >= first_whole_window:
            assert report.status == status, (step, report)
    flagged = min(step for step, r in reports.items() if r.status != "ok")
    assert onset <= flagged <= first_whole_window
    assert reports[400].streak == (400 - flagged) // every + 1


def test_stays_ok_on_healthy_teachers():
    monitor = CollapseMonitor(10)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(K, 16, generator=gen)
    reports = [monitor.step(healthy(gen), prototypes=w, kappa=torch.full((K,), 25.0)) for _ in range(100)]
    reports = [r for r in reports if r is not None]
    assert len(reports) == 10 and all(r.status == "ok" and not r.warnings for r in reports)
    assert reports[-1].distinct_prototypes == K and reports[-1].streak == 10


def test_warnings_say_what_happens_and_what_cures_it():
    gen = torch.Generator().manual_seed(2)
    for collapsed, status, cures in [
        (uniform, "uniform", ("teacher temperature", "learning rate")),
        (one_hot, "one-hot", ("teacher temperature", "centering", "learning rate")),
    ]:
        monitor = CollapseMonitor(2)
        with pytest.warns(CollapseWarning) as caught:
            for _ in range(4):
                monitor.step(collapsed(gen))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and all(m.startswith(f"{status} collapse at step") for m in messages)
        assert all(cure in messages[0] for cure in cures)
        assert "since step 2" in messages[1]  # a collapse that persists says so
    # Partial: most prototypes near-duplicates of a few; the cure is KoLeo on the prototypes.
    w = torch.randn(8, 16, generator=gen).repeat(K // 8, 1) + 1e-4 * torch.randn(K, 16, generator=gen)
    monitor = CollapseMonitor(1)
    with pytest.warns(CollapseWarning, match="KoLeo") as caught:
        report = monitor.step(healthy(gen), prototypes=w)
    assert report.status == "partial" and report.distinct_prototypes == 8
    assert "only 8 of the 256 prototypes are distinct" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: the report has them, no warning is emitted
        assert CollapseMonitor(1, warn=False).step(uniform(gen)).warnings


def test_partial_when_the_mass_sits_on_few_prototypes():
    # Every image on one of 8 prototypes of 256: exp(H(pbar)) = 8 < sqrt(256) = 16, but not one-hot.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(N, K, generator=gen)
    logits[torch.arange(N), torch.arange(N) % 8] += 30.0
    report = CollapseMonitor(1, warn=False).step(torch.softmax(logits, dim=1))
    assert report.status == "partial" and report.effective_clusters == pytest.approx(8.0, rel=1e-3)
    assert "teacher temperature" in report.warnings[0] and "KoLeo" not in report.warnings[0]
    assert report.prototypes_used == 8


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(2, 40), st.integers(0, 2**31 - 1))
def test_a_check_reports_the_rows_since_the_previous_check(sizes, k, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.softmax(3 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1) for n in sizes]
    if sum(sizes) == 0:
        return
    prototypes = torch.randn(k, 3, generator=gen, dtype=torch.float64)
    kappa = 10 * torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    monitor = CollapseMonitor(len(batches), warn=False)
    for batch in batches[:-1]:
        assert monitor.step(batch) is None
    report = monitor.step(batches[-1], prototypes=prototypes, kappa=kappa)
    rows = torch.cat(batches)
    assert report.samples == sum(sizes) and report.num_prototypes == k and report.log_k == math.log(k)
    assert report.effective_clusters == pytest.approx(effective_num_clusters(rows), rel=1e-9)
    assert report.prototypes_used == prototype_utilization(rows)
    per_row = scipy.stats.entropy(rows.numpy(), axis=1)
    assert report.mean_sample_entropy == pytest.approx(float(per_row.mean()), rel=1e-9, abs=1e-12)
    assert report.largest_share == pytest.approx(float(rows.mean(dim=0).max()), rel=1e-9)
    assert report.distinct_prototypes == count_distinct_prototypes(prototypes)
    assert report.duplicate_degrees == pytest.approx(math.degrees(math.acos(0.99)))
    p5, p50, p95 = np.percentile(kappa.numpy(), [5, 50, 95])
    assert (report.kappa_median, report.kappa_p95_p5) == pytest.approx((p50, p95 / p5), rel=1e-12)
    assert (report.kappa_min, report.kappa_max) == (float(kappa.min()), float(kappa.max()))
    assert report.status in STATUSES


def test_due_and_steps_without_probabilities():
    # A loss that computes the teacher's probabilities only when the next call checks.
    monitor = CollapseMonitor(3, warn=False)
    gen = torch.Generator().manual_seed(4)
    seen = []
    for _ in range(9):
        seen.append(monitor.due)
        report = monitor.step(healthy(gen) if monitor.due else None)
        assert (report is None) == (not seen[-1])
        if report is not None:
            assert report.samples == N  # only the check step's rows
    assert seen == [False, False, True] * 3 and monitor.steps == 9
    with pytest.raises(ValueError, match="no teacher_probs were given since the previous check"):
        CollapseMonitor(1).step(None)


def test_no_host_sync_between_checks():
    monitor = CollapseMonitor(5, warn=False)
    gen = torch.Generator().manual_seed(5)
    probs, w, kappa = healthy(gen), torch.randn(K, 8, generator=gen), torch.rand(K, generator=gen)
    for _ in range(4):
        report, syncs = count_syncs(monitor.step, probs, prototypes=w, kappa=kappa)
        assert report is None and not syncs, syncs
    report, syncs = count_syncs(monitor.step, probs, prototypes=w, kappa=kappa)
    assert report is not None and syncs  # the check reads its accumulators, once


def test_reports_go_to_the_log_and_are_floats():
    logged = []
    monitor = CollapseMonitor(2, log=logged.append, warn=False)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        monitor.step(healthy(gen), kappa=torch.full((K,), 10.0))
    assert [r.step for r in logged] == [2, 4]
    scalars = logged[-1].scalars()
    assert all(isinstance(v, float) for v in scalars.values())
    assert scalars["status"] == 0.0 and scalars["samples"] == 2 * N and "distinct_prototypes" not in scalars
    assert scalars["batch_mean_entropy_ratio"] == pytest.approx(logged[-1].batch_mean_entropy / math.log(K))
    record = json.loads(json.dumps(logged[-1].as_dict()))
    assert record["status"] == "ok" and record["step"] == 4 and record["kappa_p95_p5"] == 1.0


NAN = float("nan")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: CollapseMonitor(0), ValueError, "every must be an int >= 1"),
        (lambda: CollapseMonitor(log="tensorboard"), TypeError, "log must be a callable"),
        (lambda: CollapseMonitor(one_hot_entropy=0.6), ValueError, "one_hot_entropy <= partial_entropy"),
        (lambda: CollapseMonitor(uniform_entropy=1.5), ValueError, "uniform_entropy must be"),
        (lambda: CollapseMonitor(duplicate_cosine=1.0), ValueError, "duplicate_cosine must be"),
        (lambda: CollapseMonitor().step(torch.ones(4) / 4), ValueError, "teacher_probs must be 2-D"),
        (lambda: CollapseMonitor().step(torch.ones(2, 4, dtype=torch.long)), TypeError, "floating dtype"),
        (lambda: CollapseMonitor().step(torch.ones(3, 1)), ValueError, "K >= 2 columns"),
        (lambda: CollapseMonitor(1).step(torch.randn(3, 4)), ValueError, "must be probabilities"),
        (lambda: CollapseMonitor(1).step(torch.ones(3, 4)), ValueError, "rows summing to 4"),
        (lambda: CollapseMonitor(1).step(torch.full((3, 4), NAN)), ValueError, "non-finite"),
        (lambda: CollapseMonitor(1).step(torch.ones(3, 4) / 4, prototypes=torch.ones(5, 2)), ValueError, "5 rows"),
        (
            lambda: CollapseMonitor(1).step(torch.ones(3, 4) / 4, kappa=torch.ones(4, 1)),
            ValueError,
            "kappa must be 1-D",
        ),
        (lambda: CollapseMonitor(1).step(torch.ones(3, 4) / 4, kappa=-torch.ones(4)), ValueError, "non-negative"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_columns_must_stay_the_same():
    monitor = CollapseMonitor(5)
    monitor.step(torch.ones(2, 4) / 4)
    with pytest.raises(ValueError, match="K=6 columns, but earlier steps had K=4"):
        monitor.step(torch.ones(2, 6) / 6)
