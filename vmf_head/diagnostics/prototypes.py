"""Cheap health checks for a prototype head, to log every N steps of anyone's DINO / DINO-vMF training.

What each number says about the mixture model of Govindarajan et al. (ICLR 2023, "DINO as a von
Mises-Fisher mixture model"), with K prototypes ``w_k`` (rows of the head's last layer):

* ``prototype_utilization``: how many prototypes are the argmax (the MAP component) for at least one
  sample. Few used prototypes means most of the mixture is dead weight.
* ``effective_num_clusters``: ``exp(H(mean_n q_n))``, the exponential of the entropy of the batch-mean
  teacher probability. It equals K for perfectly balanced use and 1 for full collapse.
* ``kappa_stats``: min / median / max of the vMF precisions ``kappa_k = ||w_k|| / tau``. With
  DINO's ``norm_last_layer=True`` they are all ``1 / tau``.
* ``near_duplicate_pairs`` / ``count_distinct_prototypes``: partial prototype collapse, prototypes
  whose directions coincide (cosine above a threshold, 0.99 by default). The search is exact,
  in ``chunk_size x chunk_size`` tiles of the upper triangle, so peak memory is
  ``O(chunk_size^2 + K p)`` and never ``O(K^2)``; the cost is ``K^2 p`` multiply-adds (for
  K = 65536, p = 256: about 0.5 TFLOP, i.e. a fraction of a second on a GPU, tens of seconds on
  a laptop CPU: log it less often there).
* ``head_diagnostics`` bundles all of them into one dict of floats ready for a logger.

All functions run under ``torch.no_grad()`` and accept tensors on any device; they return Python
numbers (or an index tensor for the pairs).
"""

from __future__ import annotations

import torch

from .._validation import check_int, check_real, check_tensor

__all__ = [
    "count_distinct_prototypes",
    "effective_num_clusters",
    "head_diagnostics",
    "kappa_stats",
    "near_duplicate_pairs",
    "prototype_utilization",
]


def _check_matrix(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x, dims=2, shape="(N, K)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (N, K), got shape {tuple(x.shape)}")
    _check_finite(name, x)
    return x


def _check_finite(name: str, x: torch.Tensor) -> None:
    # Diagnostics read their inputs anyway (they return Python numbers): a NaN would give a number
    # that looks healthy (argmax of NaN rows, a NaN prototype counted as distinct).
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values (inf or NaN): a diagnostic of them would be meaningless")


@torch.no_grad()
def prototype_utilization(scores: torch.Tensor) -> int:
    """Number of prototypes that are the argmax of at least one row of ``scores``.

    Args:
        scores: (N, K) float tensor of logits or probabilities (any monotone transform of them
            per row gives the same answer), one row per sample.

    Returns:
        An int in [1, min(N, K)].
    """
    scores = _check_matrix("scores", scores)
    return int(torch.unique(scores.argmax(dim=1)).numel())


@torch.no_grad()
def effective_num_clusters(probs: torch.Tensor) -> float:
    """``exp(H(pbar))`` with ``pbar = mean_n probs[n]`` and ``H(p) = -sum_k p_k log p_k`` (nats).

    Args:
        probs: (N, K) float tensor of probabilities (rows sum to 1), e.g. the teacher's softmax
            output for a batch.

    Returns:
        A float in [1, K]: K when the batch uses every prototype equally on average, 1 when all
        mass sits on a single prototype.
    """
    probs = _check_matrix("probs", probs)
    if (probs < 0).any():
        raise ValueError("probs must be non-negative (pass softmax outputs, not logits)")
    if not bool(
        torch.allclose(probs.double().sum(dim=1), probs.new_ones(probs.shape[0], dtype=torch.float64), atol=1e-3)
    ):
        raise ValueError("probs must have rows that sum to 1 (pass softmax outputs)")
    pbar = probs.double().mean(dim=0)
    pbar = pbar / pbar.sum()
    # 0 log 0 = 0: xlogy handles the empty prototypes.
    entropy = -torch.special.xlogy(pbar, pbar).sum()
    return float(torch.exp(entropy))


@torch.no_grad()
def kappa_stats(norms: torch.Tensor, tau: float) -> dict[str, float]:
    """Min, median and max of the vMF precisions ``kappa_k = ||w_k|| / tau``.

    Args:
        norms: (K,) prototype norms ``||w_k||`` (e.g. ``head.prototype_norms()``).
        tau: the temperature of the branch (student 0.1, or the teacher's scheduled value), > 0.

    Returns:
        ``{"kappa_min": ..., "kappa_median": ..., "kappa_max": ...}`` (lower median for even K).
    """
    norms = check_tensor("norms", norms, dims=1, shape="(K,) of prototype norms")
    if norms.numel() == 0:
        raise ValueError("norms must be a non-empty 1-D tensor (K,) of prototype norms")
    _check_finite("norms", norms)
    if bool((norms < 0).any()):
        raise ValueError("norms has negative values: a prototype norm ||w_k|| is >= 0")
    tau = check_real("tau", tau, low=0.0, open_low=True)
    kappa = norms.detach().double() / tau
    return {"kappa_min": float(kappa.min()), "kappa_median": float(kappa.median()), "kappa_max": float(kappa.max())}


@torch.no_grad()
def near_duplicate_pairs(weights: torch.Tensor, threshold: float = 0.99, chunk_size: int = 2048) -> torch.Tensor:
    """All pairs of prototypes whose directions nearly coincide: ``cos(w_i, w_j) > threshold``.

    Exact (no sampling, no hashing). The cosine matrix is visited in ``chunk_size x chunk_size``
    tiles of its upper triangle, so at most one tile exists at a time.

    Args:
        weights: (K, p) prototypes, one per row (e.g. the head's ``last_layer.weight``); any
            float dtype, computed in float32 (float64 stays float64). Zero rows have no direction
            and are never reported.
        threshold: cosine similarity above which two prototypes count as duplicates, in (-1, 1).
        chunk_size: tile side; memory is ``chunk_size^2`` floats.

    Returns:
        (M, 2) int64 tensor on ``weights``' device, rows ``(i, j)`` with ``i < j``, sorted.
    """
    weights = _check_matrix("weights", weights)
    threshold = check_real("threshold", threshold, low=-1.0, high=1.0)
    if not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a number in (-1, 1), got {threshold!r}")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    w = weights.detach()
    if w.dtype != torch.float64:
        w = w.float()
    norms = w.norm(dim=1, keepdim=True)
    # A zero row gets cosine 0 with everything, so it never passes a positive threshold and never
    # produces NaN; for threshold <= 0 it is excluded explicitly below.
    u = w / norms.clamp_min(torch.finfo(w.dtype).tiny)
    valid = norms.squeeze(1) > 0
    k = w.shape[0]
    found = []
    for r0 in range(0, k, chunk_size):
        rows = u[r0 : r0 + chunk_size]
        for c0 in range(r0, k, chunk_size):
            sim = rows @ u[c0 : c0 + chunk_size].T
            hit = sim > threshold
            if c0 == r0:
                # Only strictly above the diagonal of a diagonal tile: i < j, and no self-pairs.
                hit = torch.triu(hit, diagonal=1)
            idx = hit.nonzero()
            if idx.numel():
                idx[:, 0] += r0
                idx[:, 1] += c0
                found.append(idx)
    if not found:
        return torch.empty(0, 2, dtype=torch.long, device=w.device)
    pairs = torch.cat(found)
    pairs = pairs[valid[pairs[:, 0]] & valid[pairs[:, 1]]]
    order = torch.argsort(pairs[:, 0] * k + pairs[:, 1])
    return pairs[order]


def _count_components(k: int, pairs: torch.Tensor) -> int:
    """Connected components of the graph on k nodes with the given edges (union-find)."""
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    components = k
    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
            components -= 1
    return components


@torch.no_grad()
def count_distinct_prototypes(weights: torch.Tensor, threshold: float = 0.99, chunk_size: int = 2048) -> int:
    """Number of distinct prototype directions: K minus what merging near-duplicates removes.

    Prototypes linked by a chain of ``cos > threshold`` pairs (see ``near_duplicate_pairs``) count
    once (connected components). Equals K when no two prototypes are near-duplicates.
    """
    pairs = near_duplicate_pairs(weights, threshold, chunk_size)
    return _count_components(weights.shape[0], pairs.cpu())


@torch.no_grad()
def head_diagnostics(
    teacher_logits: torch.Tensor,
    prototype_weights: torch.Tensor,
    tau: float,
    *,
    loss: float | torch.Tensor | None = None,
    duplicate_threshold: float = 0.99,
    chunk_size: int = 2048,
    with_duplicates: bool = True,
) -> dict[str, float]:
    """Every diagnostic of this module in one dict of floats (for a logger).

    Args:
        teacher_logits: (N, K) teacher logits at temperature ``tau`` (what the teacher puts into
            its softmax: ``w^T y / tau``, plus ``log C_p(||w||/tau)`` for DINO-vMF, after
            centering if you want the centred assignments). Utilisation uses their argmax, the
            effective number of clusters their softmax.
        prototype_weights: (K, p) prototypes (the head's ``last_layer.weight``).
        tau: the temperature ``teacher_logits`` were divided by; kappa = ||w_k|| / tau.
        loss: the current loss, copied into the dict when given.
        duplicate_threshold, chunk_size: passed to ``count_distinct_prototypes``.
        with_duplicates: skip the O(K^2 p) duplicate search when False (log it less often).

    Returns:
        Keys ``utilization``, ``effective_clusters``, ``kappa_min``, ``kappa_median``,
        ``kappa_max``, and when requested ``distinct_prototypes`` and ``loss``.
    """
    teacher_logits = _check_matrix("teacher_logits", teacher_logits)
    prototype_weights = _check_matrix("prototype_weights", prototype_weights)
    if teacher_logits.shape[1] != prototype_weights.shape[0]:
        raise ValueError(
            f"teacher_logits has {teacher_logits.shape[1]} columns but prototype_weights has "
            f"{prototype_weights.shape[0]} rows; both must be K"
        )
    out: dict[str, float] = {
        "utilization": float(prototype_utilization(teacher_logits)),
        "effective_clusters": effective_num_clusters(torch.softmax(teacher_logits.float(), dim=1)),
    }
    out.update(kappa_stats(prototype_weights.detach().float().norm(dim=1), tau))
    if with_duplicates:
        out["distinct_prototypes"] = float(
            count_distinct_prototypes(prototype_weights, duplicate_threshold, chunk_size)
        )
    if loss is not None:
        out["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return out
