"""Evaluation as in DINO and the DINO-vMF paper: k-NN and linear probe on frozen backbone features.

* k-NN (DINO's ``eval_knn.py``): features are L2-normalised, every test sample takes its k = 20
  most cosine-similar training samples and each neighbour votes for its label with weight
  ``exp(cos / T)``, T = 0.07; top-1 accuracy of the weighted vote.
* Linear probe: a multinomial logistic regression on the frozen, standardised features of the
  training split, accuracy on the test split (scikit-learn's L-BFGS; DINO trains a linear layer
  with SGD on ImageNet, which at this scale converges to the same kind of classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Backbone features (N, D) of already preprocessed images, in eval mode, float32 on the CPU."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = torch.cat(
        [backbone(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )
    backbone.train(was_training)
    return out


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    n_classes: int | None = None,
) -> torch.Tensor:
    """Labels (M,) int64 predicted by the temperature-weighted cosine k-NN vote.

    Args:
        train_features: (N, D) memory bank; train_labels: (N,) int64 in [0, C).
        test_features: (M, D) queries.
        k: neighbours per query (clipped to N). temperature: T of the vote weights exp(cos / T).
        n_classes: C (default: the largest training label + 1).
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError("train_features and test_features must have the same feature dimension")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    n_classes = int(train_labels.max()) + 1 if n_classes is None else n_classes
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    sim, idx = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], n_classes)
    votes.scatter_add_(1, train_labels[idx], torch.exp(sim / temperature))
    return votes.argmax(dim=1)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (in [0, 1]) of :func:`knn_predict` against ``test_labels`` (M,)."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, k, temperature, n_classes)
    return float((pred == test_labels).float().mean())


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    max_iter: int = 1000,
) -> float:
    """Test accuracy (in [0, 1]) of an L2-regularised multinomial logistic regression fitted on
    the standardised training features (mean and std of the training split)."""
    from sklearn.linear_model import LogisticRegression

    mean = train_features.mean(dim=0, keepdim=True)
    std = train_features.std(dim=0, keepdim=True).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).double().numpy()
    x_test = ((test_features - mean) / std).double().numpy()
    clf = LogisticRegression(C=1.0, max_iter=max_iter)
    clf.fit(x_train, train_labels.numpy())
    return float((clf.predict(x_test) == test_labels.numpy()).mean())
