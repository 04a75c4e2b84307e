"""ROC AUC of a binary classifier, from histograms that add up across workers.

The exact AUC ranks every eval sample, which needs all of them in one place. Instead each
worker counts the positive-class probabilities of its samples into AUC_BINS equal-width bins,
one histogram per true class; the training loop sums the histograms over the workers (one
all-reduce of a fixed-size tensor, like its other metrics) and the AUC is read off the sums:
the chance that a random positive scores above a random negative, a positive and a negative
in the same bin counting one half. That equals the rank-based AUC (ties counted half) up to
the pairs whose probabilities differ by less than one bin, 1/1024 wide: the answer is off by
at most half the share of positive-negative pairs that share a bin.
"""

from __future__ import annotations

import torch

__all__ = ["AUC_BINS", "roc_auc", "score_histogram"]

AUC_BINS = 1024


def score_histogram(
    positive_probability: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """(2, AUC_BINS) float64 counts on the inputs' device: row 0 the negatives', row 1 the
    positives'. A sample counts `weight` (default 1; 0 leaves it out)."""
    index = (positive_probability.float() * AUC_BINS).long().clamp(0, AUC_BINS - 1)
    counts = torch.zeros(2 * AUC_BINS, dtype=torch.float64, device=index.device)
    if weight is None:
        weight = torch.ones(len(index), dtype=torch.float64, device=index.device)
    # index_add_ rather than bincount: a bincount's size depends on the data, which on a GPU
    # makes the host wait for it.
    counts.index_add_(0, labels.long() * AUC_BINS + index, weight.double())
    return counts.reshape(2, AUC_BINS)


def roc_auc(histogram: torch.Tensor) -> float | None:
    """The AUC of summed histograms; None without a sample of each class."""
    negatives, positives = histogram[0], histogram[1]
    pairs = negatives.sum() * positives.sum()
    if pairs == 0:
        return None
    below = torch.cumsum(negatives, 0) - negatives  # negatives in lower bins than each bin
    wins = (positives * (below + 0.5 * negatives)).sum()
    return float(wins / pairs)
