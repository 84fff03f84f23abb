"""Scoring models on task splits: batched forward passes over pre-tokenised tensors.

Search evaluates thousands of offspring on the same dev sets, so each split is tokenised once
(``encode``) and every evaluation is only forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from evoray.tasks.metrics import accuracy, macro_f1, perplexity


@dataclass(frozen=True)
class EncodedSplit:
    """One split as padded tensors; rows sorted by nothing, padding to the split's longest."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> EncodedSplit:
        return EncodedSplit(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )

    def subset(self, start: int, stop: int) -> EncodedSplit:
        """Rows ``start:stop`` (views, no copy)."""
        sl = slice(start, stop)
        return EncodedSplit(self.input_ids[sl], self.attention_mask[sl], self.labels[sl])

    def take(self, rows: Sequence[int]) -> EncodedSplit:
        """The given rows, in that order (a copy): racing's shuffled slices."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        return EncodedSplit(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def encode(tokenizer, dataset: Dataset, *, max_length: int = 64) -> EncodedSplit:
    """Tokenise a ``text``/``label`` split once."""
    if len(dataset) == 0:
        raise ValueError("cannot encode an empty split")
    enc = tokenizer(
        list(dataset["text"]),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return EncodedSplit(enc["input_ids"], enc["attention_mask"], torch.tensor(dataset["label"]))


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, split: EncodedSplit, *, batch_size: int = 512
) -> torch.Tensor:
    """Classification logits for every row (model in eval mode, no autograd)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(
            input_ids=split.input_ids[sl].to(device),
            attention_mask=split.attention_mask[sl].to(device),
        ).logits
        out.append(logits.float().cpu())
    return torch.cat(out)


def classification_scores(
    model: torch.nn.Module, split: EncodedSplit, *, batch_size: int = 512
) -> dict[str, float]:
    """Accuracy and macro-F1 of a sequence classifier on one split."""
    logits = predict_logits(model, split, batch_size=batch_size)
    preds = logits.argmax(-1).numpy()
    refs = split.labels.cpu().numpy()
    n_labels = logits.shape[-1]
    return {
        "accuracy": accuracy(preds, refs),
        "macro_f1": macro_f1(preds, refs, num_labels=n_labels),
    }


def mean_score(scores: dict[str, dict[str, float]], metric: str = "accuracy") -> float:
    """Average of one metric over domains (the fitness of multi-domain selection)."""
    if not scores:
        raise ValueError("no scores to average")
    return float(np.mean([s[metric] for s in scores.values()]))


def encode_lm(tokenizer, texts: list[str], *, max_length: int = 128) -> EncodedSplit:
    """Tokenise texts once for ``lm_perplexity``; ``labels`` are the ids with padding at -100.

    Padding is done here, on the tokenizer's side, rather than by the tokenizer: causal-LM
    tokenizers often have no pad token, and setting one would change the caller's tokenizer.
    The pad id only fills masked slots, so any id works.
    """
    if not texts:
        raise ValueError("cannot encode an empty list of texts")
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    width = max(len(row) for row in ids)
    if width == 0:
        raise ValueError("every text tokenised to nothing; nothing to score")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, sl] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return EncodedSplit(input_ids, attention_mask, labels)


@torch.no_grad()
def lm_perplexity(
    model: torch.nn.Module, split: EncodedSplit, *, batch_size: int = 8
) -> dict[str, float]:
    """Token-level perplexity of a causal LM: exp(sum of NLL / number of predicted tokens).

    Exact over the split, not a mean of per-batch means, so it does not depend on batch size or
    padding. Position ids are passed from the attention mask so that left-padded rows see the
    same positions as unpadded ones. Labels at -100 (padding, or a prompt the caller masked)
    are not predicted. Returns ``perplexity``, ``nll`` (mean nats per token) and ``tokens``.
    """
    if split.labels.shape != split.input_ids.shape:
        raise ValueError(
            f"labels {tuple(split.labels.shape)} must match input_ids "
            f"{tuple(split.input_ids.shape)}; encode causal-LM text with encode_lm"
        )
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    n_tokens = 0
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        mask = split.attention_mask[sl].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=split.input_ids[sl].to(device), attention_mask=mask, position_ids=positions
        ).logits
        # A target counts only if it is a label and the position predicting it is real text:
        # a left-padded row's first token is not predicted, as in the unpadded row.
        targets = split.labels[sl, 1:].to(device)
        valid = (targets != -100) & (mask[:, :-1] == 1)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1][valid].float(), targets[valid], reduction="sum"
        )
        total_nll += float(nll.double())
        n_tokens += int(valid.sum())
    return {
        "perplexity": perplexity(total_nll, n_tokens),
        "nll": total_nll / n_tokens,
        "tokens": n_tokens,
    }
