"""vmf_head.diagnostics on constructed inputs whose answers are known by construction or computed
independently (numpy brute force, scipy entropy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmf_head.diagnostics import (
    count_distinct_prototypes,
    effective_num_clusters,
    head_diagnostics,
    kappa_stats,
    near_duplicate_pairs,
    prototype_utilization,
)


def test_utilization_counts_distinct_argmax():
    k = 10
    winners = [0, 0, 3, 5, 5, 5, 9]
    scores = torch.rand(len(winners), k)  # in [0, 1): the planted 2.0 wins every row
    scores[torch.arange(len(winners)), torch.tensor(winners)] = 2.0
    assert prototype_utilization(scores) == 4
    # Monotone transforms of a row (softmax of logits, say) do not change the answer.
    assert prototype_utilization(torch.softmax(scores / 0.04, dim=1)) == 4


def test_effective_clusters_known_values():
    k = 16
    assert effective_num_clusters(torch.full((5, k), 1.0 / k)) == pytest.approx(k, rel=1e-12)
    one_hot = torch.zeros(4, k)
    one_hot[:, 7] = 1.0
    assert effective_num_clusters(one_hot) == pytest.approx(1.0, rel=1e-12)
    # Half the batch on prototype 2, half on prototype 11: two clusters.
    half = torch.zeros(6, k)
    half[:3, 2] = 1.0
    half[3:, 11] = 1.0
    assert effective_num_clusters(half) == pytest.approx(2.0, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(2, 40), st.integers(0, 2**31 - 1))
def test_effective_clusters_matches_scipy_entropy(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)
    expected = math.exp(scipy.stats.entropy(probs.numpy().mean(axis=0)))
    assert effective_num_clusters(probs) == pytest.approx(expected, rel=1e-10)
    assert 1.0 - 1e-9 <= effective_num_clusters(probs) <= k + 1e-9


def test_kappa_stats():
    norms = torch.tensor([3.0, 1.0, 4.0, 2.0])
    stats = kappa_stats(norms, tau=0.5)
    # kappa = norms / tau = [6, 2, 8, 4]; lower median of the sorted [2, 4, 6, 8] is 4.
    assert stats == {"kappa_min": 2.0, "kappa_median": 4.0, "kappa_max": 8.0}
    assert kappa_stats(torch.ones(7), tau=0.1)["kappa_median"] == pytest.approx(10.0)


def _brute_force_pairs(w: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    norms = np.linalg.norm(w, axis=1)
    out = set()
    for i in range(len(w)):
        for j in range(i + 1, len(w)):
            if norms[i] > 0 and norms[j] > 0 and w[i] @ w[j] / (norms[i] * norms[j]) > threshold:
                out.add((i, j))
    return out


def _planted(k: int, p: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, p, generator=gen, dtype=torch.float64)
    # Near-duplicates: scaled copies with a little noise (cosine about 0.9999), one chain 3-17-29
    # (17 and 29 both copy 3, so they duplicate each other too), and a zero prototype.
    for src, dst in ((3, 17), (3, 29), (40, 41), (0, k - 1)):
        w[dst] = 2.5 * w[src] + 1e-3 * torch.randn(p, generator=gen, dtype=torch.float64)
    w[10] = 0.0
    return w


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 50, 4096])
def test_near_duplicate_pairs_matches_brute_force(chunk_size):
    w = _planted(50, 12, seed=0)
    found = near_duplicate_pairs(w, threshold=0.99, chunk_size=chunk_size)
    assert found.dtype == torch.long and found.shape[1] == 2
    assert set(map(tuple, found.tolist())) == _brute_force_pairs(w.numpy(), 0.99)
    assert {(3, 17), (3, 29), (17, 29), (40, 41), (0, 49)} == set(map(tuple, found.tolist()))
    # Rows are (i, j) with i < j, sorted.
    assert found.tolist() == sorted(found.tolist())


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 40),
    st.integers(2, 6),
    st.integers(1, 45),
    st.sampled_from([-0.5, 0.0, 0.5, 0.9]),
    st.integers(0, 2**31 - 1),
)
def test_near_duplicate_pairs_property(k, p, chunk_size, threshold, seed):
    # Low dimension and low thresholds give many pairs, exercising tile edges.
    w = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[seed % k] = 0.0
    found = near_duplicate_pairs(w, threshold=threshold, chunk_size=chunk_size)
    assert set(map(tuple, found.tolist())) == _brute_force_pairs(w.numpy(), threshold)


def test_near_duplicate_float32_and_none():
    w = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].float()  # orthonormal rows
    assert near_duplicate_pairs(w).shape == (0, 2)
    assert count_distinct_prototypes(w) == 32


def test_count_distinct_prototypes_merges_chains():
    w = _planted(50, 12, seed=1)
    # Components: {3, 17, 29}, {40, 41}, {0, 49}; every other prototype alone.
    assert count_distinct_prototypes(w, chunk_size=8) == 50 - 2 - 1 - 1


def test_head_diagnostics_bundle():
    k, p = 8, 4
    w = torch.zeros(k, p)
    w[:, 0] = torch.arange(1, k + 1, dtype=torch.float32)  # all parallel: one distinct direction
    logits = torch.full((6, k), -5.0)
    logits[:3, 2] = 5.0
    logits[3:, 6] = 5.0
    out = head_diagnostics(logits, w, tau=0.5, loss=torch.tensor(1.25))
    assert out["utilization"] == 2
    assert out["distinct_prototypes"] == 1
    assert (out["kappa_min"], out["kappa_max"]) == (2.0, 16.0)
    assert out["loss"] == 1.25
    # Two equally used, nearly one-hot components: a little above 2 effective clusters.
    probs = torch.softmax(logits, dim=1).double().numpy()
    assert out["effective_clusters"] == pytest.approx(math.exp(scipy.stats.entropy(probs.mean(axis=0))), rel=1e-6)
    assert "distinct_prototypes" not in head_diagnostics(logits, w, tau=0.5, with_duplicates=False)


@pytest.mark.parametrize(
    "call",
    [
        lambda: prototype_utilization(torch.zeros(3)),
        lambda: prototype_utilization(torch.zeros(3, 4, dtype=torch.long)),
        lambda: effective_num_clusters(torch.tensor([[-0.5, 1.5]])),
        lambda: kappa_stats(torch.ones(3), tau=0.0),
        lambda: kappa_stats(torch.ones(2, 2), tau=0.1),
        lambda: near_duplicate_pairs(torch.ones(3, 2), threshold=1.0),
        lambda: near_duplicate_pairs(torch.ones(3, 2), chunk_size=0),
        lambda: head_diagnostics(torch.zeros(2, 3), torch.ones(4, 2), tau=0.1),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises((ValueError, TypeError)):
        call()


NAN = float("nan")


@pytest.mark.parametrize(
    "call, match",
    [
        # each of these returned a healthy-looking number before (1 used prototype, 2 distinct, zeros)
        (lambda: prototype_utilization(torch.full((4, 3), NAN)), "scores has non-finite values"),
        (lambda: effective_num_clusters(torch.full((2, 3), NAN)), "probs has non-finite values"),
        (lambda: effective_num_clusters(torch.zeros(2, 3)), "rows that sum to 1"),
        (lambda: count_distinct_prototypes(torch.tensor([[1.0, 0.0], [NAN, 1.0]])), "weights has non-finite"),
        (lambda: kappa_stats(torch.ones(3), tau=float("inf")), "tau must be a finite number"),
        (lambda: kappa_stats(torch.tensor([1.0, NAN]), tau=0.1), "norms has non-finite"),
        (lambda: kappa_stats(torch.tensor([1.0, -1.0]), tau=0.1), "norms has negative values"),
        (lambda: kappa_stats(torch.ones(3), tau="0.1"), "tau must be a real number"),
        (lambda: head_diagnostics(torch.full((2, 3), NAN), torch.ones(3, 2), tau=0.1), "teacher_logits has non-finite"),
    ],
)
def test_degenerate_inputs_are_errors_not_numbers(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
