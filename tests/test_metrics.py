"""Tests for the offline metrics (evoray.tasks.metrics) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evoray.tasks.metrics import accuracy, macro_f1, multilabel_f1, perplexity


def test_accuracy() -> None:
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0
    assert accuracy([1], [0]) == 0.0


@pytest.mark.parametrize(("preds", "refs"), [([0, 1], [0]), ([], [])])
def test_accuracy_rejects_bad_shapes(preds: list[int], refs: list[int]) -> None:
    with pytest.raises(ValueError, match="shapes"):
        accuracy(preds, refs)


# preds [0, 0, 1, 2] vs refs [0, 1, 1, 1]:
#   class 0: tp 1, fp 1, fn 0 -> F1 2/3;  class 1: tp 1, fp 0, fn 2 -> 1/2
#   class 2: tp 0, fp 1, fn 0 -> 0
PREDS, REFS = [0, 0, 1, 2], [0, 1, 1, 1]


def test_macro_f1_over_present_classes() -> None:
    assert macro_f1(PREDS, REFS) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_macro_f1_over_num_labels() -> None:
    # class 3 never appears: F1 0 when listed via num_labels
    assert macro_f1(PREDS, REFS, num_labels=4) == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert macro_f1(PREDS, REFS, num_labels=2) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_edges() -> None:
    assert macro_f1([1, 0, 1], [1, 0, 1]) == 1.0
    assert macro_f1([1, 1], [1, 1], num_labels=2) == 0.5  # absent class 0 scores 0
    assert macro_f1([1, 1], [1, 1]) == 1.0
    assert macro_f1([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError, match="num_labels"):
        macro_f1([0, 1], [0, 1], num_labels=0)
    with pytest.raises(ValueError, match="shapes"):
        macro_f1([0, 1], [0])


# Thresholded at 0.5 the scores predict [[1, 0], [0, 1], [1, 1]]; refs [[1, 0], [1, 1], [0, 0]]:
#   label 0: tp 1, fp 1, fn 1 -> F1 1/2;  label 1: tp 1, fp 1, fn 0 -> F1 2/3
#   micro: tp 2, fp 2, fn 1 -> 4/7
SCORES = np.array([[0.9, 0.2], [0.4, 0.6], [0.7, 0.8]])
LABELS = np.array([[1, 0], [1, 1], [0, 0]])


def test_multilabel_f1_micro_and_macro() -> None:
    assert multilabel_f1(SCORES, LABELS) == pytest.approx(4 / 7)
    assert multilabel_f1(SCORES, LABELS, average="macro") == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_multilabel_f1_threshold() -> None:
    # at 0.65: predictions [[1, 0], [0, 0], [1, 1]]: label 0 tp 1 fp 1 fn 1, label 1 tp 0 fp 1 fn 1
    assert multilabel_f1(SCORES, LABELS, threshold=0.65) == pytest.approx(2 / 6)
    # the threshold is inclusive
    assert multilabel_f1(np.array([[0.5]]), np.array([[1]])) == 1.0


def test_multilabel_f1_edges() -> None:
    none = np.zeros((2, 3))
    assert multilabel_f1(none, none) == 0.0  # nothing predicted, nothing to find
    assert multilabel_f1(np.ones((2, 3)), np.ones((2, 3)), average="macro") == 1.0
    with pytest.raises(ValueError, match="average"):
        multilabel_f1(SCORES, LABELS, average="weighted")
    with pytest.raises(ValueError, match="shapes"):
        multilabel_f1(SCORES[:, 0], LABELS[:, 0])
    with pytest.raises(ValueError, match="shapes"):
        multilabel_f1(SCORES, LABELS[:2])


def test_perplexity() -> None:
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(3 * math.log(4.0), 3) == pytest.approx(4.0)
    assert perplexity(10.0, 4) == pytest.approx(math.exp(2.5))
    assert perplexity(1e6, 1) == math.inf  # a broken merge: inf, not OverflowError
    with pytest.raises(ValueError, match="at least one"):
        perplexity(1.0, 0)
