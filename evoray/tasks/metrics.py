"""Offline metrics: accuracy, macro-F1, multi-label F1, perplexity.

``evaluate.load("accuracy")`` fetches its script from the hub and fails offline, so the metrics
selection depends on are plain, tested functions over numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of exact matches."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.size == 0:
        raise ValueError(
            f"need equal non-empty shapes, got {predictions.shape} and {references.shape}"
        )
    return float((predictions == references).mean())


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def macro_f1(
    predictions: np.ndarray, references: np.ndarray, num_labels: int | None = None
) -> float:
    """Mean of per-class F1 over ``range(num_labels)`` if given, else over the classes present
    in predictions or references.

    A class with no predictions and no references scores F1 0, so passing ``num_labels``
    penalises a split that lacks a class; leave it out to average only what is there.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    accuracy(predictions, references)  # shape checks
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    classes = (
        np.arange(num_labels)
        if num_labels is not None
        else np.union1d(np.unique(predictions), references)
    )
    p = predictions[None, :] == classes[:, None]
    r = references[None, :] == classes[:, None]
    tp = (p & r).sum(1)
    return float(_f1(tp, (p & ~r).sum(1), (~p & r).sum(1)).mean())


def multilabel_f1(
    scores: np.ndarray, references: np.ndarray, threshold: float = 0.5, average: str = "micro"
) -> float:
    """F1 of a multi-label problem: ``scores`` (n, k) probabilities, ``references`` (n, k) 0/1."""
    scores, references = np.asarray(scores), np.asarray(references).astype(bool)
    if scores.shape != references.shape or scores.ndim != 2:
        raise ValueError(f"need equal (n, k) shapes, got {scores.shape} and {references.shape}")
    p = scores >= threshold
    tp, fp, fn = (p & references).sum(0), (p & ~references).sum(0), (~p & references).sum(0)
    if average == "micro":
        return float(_f1(tp.sum(), fp.sum(), fn.sum()))
    if average == "macro":
        return float(_f1(tp, fp, fn).mean())
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token); inf, not OverflowError, for a
    model so broken (e.g. a bad merge during search) that the mean exceeds ~709 nats."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


# Higher is better for fitness; these are negated when a task's fitness metric names them.
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "loss"})

_HF_METRICS: dict[str, object] = {}


def hf_metric(source: str):
    """An ``evaluate`` metric, loaded once per process: a local module path (a ``.py`` file or
    its folder; works offline) or a hub name (network). Errors name the source."""
    if source not in _HF_METRICS:
        try:
            import evaluate
        except ImportError:
            raise ImportError(
                f"metric {source!r} needs the 'evaluate' package: pip install evaluate"
            ) from None
        try:
            _HF_METRICS[source] = evaluate.load(source)
        except Exception as exc:  # evaluate raises several types for a bad name/path
            raise ValueError(
                f"cannot load evaluate metric {source!r} ({exc}); give a local metric module "
                "path (offline) or an evaluate hub name (online)"
            ) from None
    return _HF_METRICS[source]


def hf_metric_scores(source: str, predictions: list, references: list) -> dict[str, float]:
    """The numeric results of an ``evaluate`` metric's ``compute``, by their own names."""
    out = hf_metric(source).compute(predictions=predictions, references=references) or {}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float, np.number))}
