"""Batches for CLM and FuseLLM training: the seeded order of texts per step, right-padded
tensors, and the loss of one batch against its fused teachers.

Shared by every training loop (single process, DDP and FSDP), so that all see the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from evoray.fusion import FusionError
from evoray.fusion.distill import fusellm_loss_batch, pad_teachers


def drop_short_texts(tok, texts: Sequence[str], min_tokens: int = 2) -> tuple[list[str], int]:
    """``(texts with at least min_tokens tokens of their own under tok, how many were not)``.

    Skipped rather than refused, since a corpus file of real text often holds a few such lines
    (a heading, a lone '.'): a text under two tokens has no prediction from one of its tokens
    to the next (only ``<bos> -> t`` and ``t -> <eos>``), so a source has nothing of the text
    to teach there, and CLM learns only where texts start and end.  An error if none remain.
    """
    kept = [t for t in texts if len(tok(t, add_special_tokens=False)["input_ids"]) >= min_tokens]
    if not kept:
        raise FusionError(
            f"all {len(texts)} training texts are shorter than two tokens of the target's "
            "tokenizer; give a corpus of sentences or paragraphs"
        )
    return kept, len(texts) - len(kept)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The text indices of each step: seeded shuffles of all ``n`` texts, one after another, so
    every text is seen once per pass and every rank derives the same batches from ``seed``."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def _pad_batch(ids_list, idx, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(ids_list[i]) for i in idx)
    ids = torch.zeros((len(idx), width), dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for b, i in enumerate(idx):
        ids[b, : len(ids_list[i])] = torch.tensor(ids_list[i])
        mask[b, : len(ids_list[i])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def batch_loss(model, ids_list, teachers, idx, lam, kind, temperature, device, autocast):
    """The loss of texts ``idx``: CLM alone without ``teachers``, else FuseLLM's
    ``lam * CLM + (1 - lam) * fusion`` against their fused teachers."""
    ids, mask, labels = _pad_batch(ids_list, idx, device)
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if teachers is None:
        return fusellm_loss_batch(logits, labels, None, None, None, 1.0, kind, temperature)
    v, ix, m = (t.to(device) for t in pad_teachers([teachers[i] for i in idx], ids.shape[1]))
    return fusellm_loss_batch(logits, labels, v, ix, m, lam, kind, temperature)
