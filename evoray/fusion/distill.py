"""Top-k extraction, source-to-target mapping, MinCE/AvgCE fusion and the sparse FuseLLM loss.

Distributions travel as ``(values, indices, mask)`` for one sequence: ``values`` [seq, k] are
logits over the kept slots (softmax over the slots gives the teacher distribution; a ``-inf``
value marks an empty slot), ``indices`` [seq, k] are vocabulary ids, ``mask`` [seq] bool says
which positions carry a distribution at all.  No dense [seq, V] teacher tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evoray.fusion import FusionError

Dist = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[0] == 0:
        raise FusionError(f"{name} must be a non-empty [seq, vocab] tensor, got {tuple(t.shape)}")


def topk_logits(logits: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per position (float32) and their vocab ids (int32): what is stored
    per source instead of the full [seq, V] logits."""
    _check_2d("logits", logits)
    if not 1 <= k <= logits.shape[-1]:
        raise FusionError(f"k must be in [1, {logits.shape[-1]}] (the vocab size), got {k}")
    values, indices = torch.topk(logits.detach().float(), k, dim=-1)
    return values, indices.to(torch.int32)


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position j's logits against gold ``labels[j + 1]``: shape [seq - 1],
    0 where the label is -100 (as ``F.cross_entropy(..., reduction='none')``)."""
    _check_2d("logits", logits)
    if labels.shape != logits.shape[:1]:
        raise FusionError(f"labels shape {tuple(labels.shape)} != [seq] = {logits.shape[0]}")
    return F.cross_entropy(
        logits[:-1].float(), labels[1:].long(), ignore_index=-100, reduction="none"
    )


def mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-token CE over the non-ignored shifted labels: a source's score for MinCE/AvgCE."""
    valid = labels[1:] != -100
    if not bool(valid.any()):
        raise FusionError("cannot score a sequence whose shifted labels are all -100")
    return float(per_token_ce(logits, labels)[valid].mean())


def _merge_slots(logp: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the probability of slots sharing a vocab id (per row); returns log-probs with
    ``-inf`` (index 0) in the freed slots, so KL sees the true teacher distribution."""
    idx = idx.long()
    order = torch.argsort(idx, dim=-1)
    sidx = torch.gather(idx, -1, order)
    sp = torch.gather(logp, -1, order).double().exp()
    new = torch.ones_like(sidx, dtype=torch.bool)
    new[:, 1:] = sidx[:, 1:] != sidx[:, :-1]
    group = torch.cumsum(new.long(), dim=-1) - 1
    mass = torch.zeros_like(sp).scatter_add_(-1, group, sp)
    out_idx = torch.zeros_like(sidx).scatter_(-1, group, sidx)
    return mass.log().float(), out_idx.to(torch.int32)


def map_to_target(
    values: torch.Tensor,
    indices: torch.Tensor,
    vocab_map: np.ndarray,
    alignment: Sequence[tuple[int, int]],
    tgt_len: int,
) -> Dist:
    """Move one source sequence's top-k onto the target: the distribution at source position i
    goes to target position j for each aligned ``(i, j)``, ids translated by ``vocab_map``.

    Returns ``(values, target_indices, mask)`` of shapes [tgt_len, k], [tgt_len, k], [tgt_len];
    values are log-probs renormalised over the k slots (source ids mapping to the same target id
    are merged); unaligned target positions have ``mask`` False and ``-inf`` values.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise FusionError(f"values {tuple(values.shape)} / indices {tuple(indices.shape)} differ")
    table = torch.as_tensor(np.asarray(vocab_map), dtype=torch.long)
    if int(indices.max()) >= len(table):
        raise FusionError(f"source id {int(indices.max())} outside vocab_map of size {len(table)}")
    k = values.shape[1]
    out_v = torch.full((tgt_len, k), float("-inf"))
    out_i = torch.zeros((tgt_len, k), dtype=torch.int32)
    mask = torch.zeros(tgt_len, dtype=torch.bool)
    if not alignment:
        return out_v, out_i, mask
    src_pos = torch.tensor([i for i, _ in alignment])
    tgt_pos = torch.tensor([j for _, j in alignment])
    if int(src_pos.max()) >= values.shape[0] or int(tgt_pos.max()) >= tgt_len:
        raise FusionError("alignment refers to positions beyond the given sequences")
    mapped = table[indices[src_pos].long()]
    if bool((mapped < 0).any()):
        raise FusionError("vocab_map has no target id (-1) for a kept source token")
    logp = torch.log_softmax(values[src_pos].float(), dim=-1)
    merged_v, merged_i = _merge_slots(logp, mapped)
    out_v[tgt_pos], out_i[tgt_pos], mask[tgt_pos] = merged_v, merged_i, True
    return out_v, out_i, mask


def _check_sources(dists: Sequence[Dist], ce: Sequence[float]) -> None:
    if not dists:
        raise FusionError("no source distributions to fuse")
    if len(dists) != len(ce):
        raise FusionError(f"{len(dists)} source distributions but {len(ce)} CE scores")
    seq = dists[0][0].shape[0]
    if any(d[0].shape[0] != seq for d in dists):
        raise FusionError("source distributions cover different target lengths")


def fuse_min_ce(dists: Sequence[Dist], ce: Sequence[float]) -> Dist:
    """FuseLLM MinCE: the whole sequence takes the distribution of the source with the lowest
    mean CE on it (ties: the first source)."""
    _check_sources(dists, ce)
    return dists[int(np.argmin(np.asarray(ce, dtype=np.float64)))]


def fuse_avg_ce(dists: Sequence[Dist], ce: Sequence[float], min_weight: float = 0.0) -> Dist:
    """FuseLLM AvgCE: a mixture of the sources, weighted ``w_s = softmax(-ce)_s``.

    At each position the weights are renormalised over the sources that have a distribution
    there: ``p(v) = sum_s w_s p_s(v) / sum_s w_s``.  The union of all sources' slots is kept
    (k_total = sum of k) and returned as log-probs; positions no source covers stay masked.
    ``min_weight`` > 0 also masks positions where the sources present hold less than that share
    of the weight: there the sources that know the text best are absent, and renormalising
    would hand the position to sources that do not know it (a teacher worse than none).
    """
    _check_sources(dists, ce)
    w = torch.softmax(-torch.as_tensor(list(ce), dtype=torch.float64), dim=0)
    masks = torch.stack([d[2] for d in dists]).double()  # [S, seq]
    present = masks * w[:, None]
    total = present.sum(0)
    mask = (total > 0) & (total >= min_weight)
    log_w = (present / total.clamp_min(1e-300)).log()  # [S, seq], -inf where absent
    parts_v, parts_i = [], []
    for s, (v, i, _) in enumerate(dists):
        logp = torch.log_softmax(v.double(), dim=-1).nan_to_num(nan=float("-inf"))
        parts_v.append(logp + log_w[s][:, None])
        parts_i.append(i.long())
    merged_v, merged_i = _merge_slots(torch.cat(parts_v, -1), torch.cat(parts_i, -1))
    merged_v[~mask] = float("-inf")
    return merged_v, merged_i, mask


def fusion_loss(
    student_logits: torch.Tensor,
    fused_values: torch.Tensor,
    fused_indices: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "ce",
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse distillation loss of the student towards the fused teacher, mean over positions.

    Teacher ``p = softmax(fused_values / T)`` over its k slots (values are logits or log-probs;
    both give the same renormalised distribution).  Student ``log q = log_softmax(logits / T)``
    over the full vocab, gathered at the k ids.  ``kind="ce"``: ``-sum p log q``;
    ``kind="kl"``: ``sum p (log p - log q)``.  Positions count where ``mask`` is True and, if
    ``labels`` are given, ``labels[j + 1] != -100`` (the last position then never counts).
    No T^2 scaling (FuseLLM uses T = 1).  Returns 0 (with a graph) if nothing counts.
    """
    _check_2d("student_logits", student_logits)
    seq = student_logits.shape[0]
    if fused_values.shape != fused_indices.shape or fused_values.shape[:1] != (seq,):
        raise FusionError(
            f"fused values {tuple(fused_values.shape)} / indices {tuple(fused_indices.shape)} "
            f"must both be [seq={seq}, k]"
        )
    if mask.shape != (seq,):
        raise FusionError(f"mask shape {tuple(mask.shape)} != [seq] = ({seq},)")
    if kind not in ("ce", "kl"):
        raise FusionError(f"kind must be 'ce' or 'kl', got {kind!r}")
    if temperature <= 0:
        raise FusionError(f"temperature must be > 0, got {temperature}")
    valid = mask.bool().clone()
    if labels is not None:
        if labels.shape != (seq,):
            raise FusionError(f"labels shape {tuple(labels.shape)} != [seq] = ({seq},)")
        valid[:-1] &= labels[1:] != -100
        valid[-1] = False
    if not bool(valid.any()):
        return student_logits.sum() * 0.0
    s = student_logits[valid].float() / temperature
    log_q = torch.gather(torch.log_softmax(s, dim=-1), -1, fused_indices[valid].long())
    log_p = torch.log_softmax(fused_values[valid].float() / temperature, dim=-1)
    p = log_p.exp()
    per_pos = -(p * log_q).sum(-1)
    if kind == "kl":
        per_pos = per_pos + torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return per_pos.mean()


def fusellm_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    fused_values: torch.Tensor,
    fused_indices: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 0.9,
    kind: str = "ce",
    temperature: float = 1.0,
) -> torch.Tensor:
    """FuseLLM objective ``lam * L_CLM + (1 - lam) * L_Fusion`` (the paper's lambda = 0.9)."""
    if not 0.0 <= lam <= 1.0:
        raise FusionError(f"lam must be in [0, 1], got {lam}")
    valid = labels[1:] != -100
    if not bool(valid.any()):
        raise FusionError("all shifted labels are -100: nothing to train on")
    clm = per_token_ce(student_logits, labels)[valid].mean()
    if lam == 1.0:
        return clm
    fusion = fusion_loss(
        student_logits, fused_values, fused_indices, mask, kind, temperature, labels=labels
    )
    return lam * clm + (1.0 - lam) * fusion


def pad_teachers(teachers: Sequence[Dist], width: int) -> Dist:
    """Stack per-sequence teachers into ``[B, width, K]`` (K = the largest k): empty slots get
    ``-inf`` values, positions beyond a sequence get ``mask`` False."""
    if not teachers:
        raise FusionError("no teacher distributions to stack")
    k = max(t[0].shape[1] for t in teachers)
    values = torch.full((len(teachers), width, k), float("-inf"))
    indices = torch.zeros((len(teachers), width, k), dtype=torch.int32)
    mask = torch.zeros((len(teachers), width), dtype=torch.bool)
    for b, (v, i, m) in enumerate(teachers):
        n, kb = v.shape
        if n > width:
            raise FusionError(f"teacher {b} covers {n} positions, more than the width {width}")
        values[b, :n, :kb], indices[b, :n, :kb], mask[b, :n] = v, i, m
    return values, indices, mask


def fusellm_loss_batch(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    fused_values: torch.Tensor | None,
    fused_indices: torch.Tensor | None,
    mask: torch.Tensor | None,
    lam: float = 0.9,
    kind: str = "ce",
    temperature: float = 1.0,
) -> torch.Tensor:
    """``fusellm_loss`` for a padded batch in one pass: the mean over sequences of each
    sequence's ``lam * CLM + (1 - lam) * fusion`` (so it equals the per-sequence loop).

    ``student_logits`` [B, T, V]; ``labels`` [B, T] with -100 on padding; teachers from
    ``pad_teachers`` ([B, T, K], [B, T, K], [B, T]) or all None when ``lam == 1``.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise FusionError(
            f"student logits {tuple(student_logits.shape)} must be [B, T, V] and labels "
            f"{tuple(labels.shape)} [B, T]"
        )
    if not 0.0 <= lam <= 1.0:
        raise FusionError(f"lam must be in [0, 1], got {lam}")
    if kind not in ("ce", "kl"):
        raise FusionError(f"kind must be 'ce' or 'kl', got {kind!r}")
    if temperature <= 0:
        raise FusionError(f"temperature must be > 0, got {temperature}")
    shifted = labels[:, 1:]
    valid = shifted != -100  # [B, T-1]
    counts = valid.sum(-1)
    if bool((counts == 0).any()):
        raise FusionError("a sequence has all shifted labels -100: nothing to train on")
    logits = student_logits[:, :-1].float()
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        shifted.reshape(-1).long(),
        ignore_index=-100,
        reduction="none",
    ).view_as(shifted)
    clm = (ce * valid).sum(-1) / counts
    if lam == 1.0:
        return clm.mean()
    if fused_values is None or fused_indices is None or mask is None:
        raise FusionError("lam < 1 needs fused teacher values, indices and mask")
    width = student_logits.shape[1]
    if fused_values.shape[:2] != (labels.shape[0], width) or mask.shape != labels.shape:
        raise FusionError(
            f"teachers {tuple(fused_values.shape)} / mask {tuple(mask.shape)} must cover the "
            f"batch [B={labels.shape[0]}, T={width}]"
        )
    use = mask[:, :-1].bool() & valid  # position j predicts token j + 1
    log_q = torch.gather(
        torch.log_softmax(logits / temperature, dim=-1), -1, fused_indices[:, :-1].long()
    )
    tv = fused_values[:, :-1].float() / temperature
    log_p = torch.log_softmax(torch.where(use[..., None], tv, torch.zeros_like(tv)), dim=-1)
    p = torch.where(use[..., None], log_p.exp(), torch.zeros_like(log_p))
    per_pos = -(p * log_q).sum(-1)
    if kind == "kl":
        per_pos = per_pos + torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    n_use = use.sum(-1)
    fusion = torch.where(n_use > 0, (per_pos * use).sum(-1) / n_use.clamp_min(1), 0.0)
    return (lam * clm + (1.0 - lam) * fusion).mean()
