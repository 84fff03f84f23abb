"""Token alignment between two tokenizers (vocabularies and sequences).

Convention (``normalize_token``): a token is compared by its text with the word-boundary marker
removed, so GPT-2 byte-level ``'Ġthe'``, SentencePiece ``'▁the'`` and WordPiece ``'the'`` are all
``'the'`` and a WordPiece continuation ``'##ing'`` is ``'ing'``.  Boundaries are deliberately
dropped: tokenizers disagree on where spaces go, but agree on the characters in between.  A bare
marker (``'Ġ'``, ``'▁'``) normalises to ``''``: it carries no characters to align.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evoray.fusion import FusionError

_MARKERS = ("Ġ", "▁")


def normalize_token(tok: str) -> str:
    """Strip leading word-start markers ('Ġ', '▁', any number) or a WordPiece '##' prefix."""
    if tok.startswith("##") and len(tok) > 2:
        return tok[2:]
    i = 0
    while i < len(tok) and tok[i] in _MARKERS:
        i += 1
    return tok[i:]


def _levenshtein_bucket(s: str, codes: np.ndarray) -> np.ndarray:
    """Edit distance from ``s`` to each row of ``codes`` ([n, L] code points), vectorised.

    Row-by-row Wagner-Fischer over the chars of ``s``; the insertion recurrence
    ``cur[j] = min(tmp[j], cur[j-1] + 1)`` is a running minimum of ``tmp[j] - j`` plus ``j``.
    """
    n, length = codes.shape
    ar = np.arange(length + 1, dtype=np.int32)
    prev = np.broadcast_to(ar, (n, length + 1)).copy()
    for i, ch in enumerate(s, start=1):
        cost = (codes != ord(ch)).astype(np.int32)
        tmp = np.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)
        cur = np.concatenate([np.full((n, 1), i, dtype=np.int32), tmp], axis=1)
        prev = np.minimum.accumulate(cur - ar, axis=1) + ar
    return prev[:, length]


class _Nearest:
    """Nearest target token by edit distance; candidates bucketed by length, searched outward
    from the query's length and stopped once the length gap alone exceeds the best distance.

    Ties (common: 'cat' is one edit from both 'ca' and 'at') go to a target token that is a
    prefix of the query (what the target itself would emit first for that text), then to one
    with the same word-start status, then to the lowest id.
    """

    def __init__(self, entries: dict[tuple[str, bool], int]) -> None:
        by_len: dict[int, list[tuple[int, str, bool]]] = {}
        for (s, ws), i in entries.items():
            by_len.setdefault(len(s), []).append((i, s, ws))
        self.buckets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for length, items in by_len.items():
            items.sort()
            ids = np.array([i for i, _, _ in items], dtype=np.int64)
            codes = np.array([[ord(c) for c in s] for _, s, _ in items], dtype=np.int32)
            ws = np.array([w for _, _, w in items], dtype=bool)
            self.buckets[length] = (ids, codes.reshape(len(items), length), ws)
        self.cache: dict[tuple[str, bool], int] = {}

    def __call__(self, s: str, ws: bool) -> int:
        if (s, ws) in self.cache:
            return self.cache[(s, ws)]
        query = np.array([ord(c) for c in s], dtype=np.int32)
        best = (np.iinfo(np.int64).max,) * 4  # (distance, not prefix, ws mismatch, id)
        for length in sorted(self.buckets, key=lambda n: (abs(n - len(s)), n)):
            if abs(length - len(s)) > best[0]:
                break
            ids, codes, bucket_ws = self.buckets[length]
            dist = _levenshtein_bucket(s, codes).astype(np.int64)
            if length <= len(s):
                not_prefix = ~(codes == query[:length]).all(axis=1)
            else:
                not_prefix = np.ones(len(ids), dtype=bool)
            key = dist * 4 + not_prefix * 2 + (bucket_ws != ws)
            j = int(np.argmin(key))  # ids ascending: the first minimum is the lowest id
            best = min(
                best, (int(dist[j]), int(not_prefix[j]), int(bucket_ws[j] != ws), int(ids[j]))
            )
        self.cache[(s, ws)] = best[3]
        return best[3]


VOCAB_FALLBACKS = ("edit_distance", "prefix")


def vocab_map(
    src_vocab: dict[str, int], tgt_vocab: dict[str, int], fallback: str = "edit_distance"
) -> np.ndarray:
    """Map every source token id to a target token id (int32 array indexed by source id).

    Priority: the identical raw token; else the lowest target id with the same normalised text
    and word-start status ('▁cat' -> 'Ġcat' before 'cat'), then with the same text; else the
    target whose normalised text is nearest by Levenshtein distance (ties: see ``_Nearest``).
    ``fallback="prefix"`` first tries the longest target token (same word-start status) that
    the source token's text starts with: the token the target itself would emit first for that
    text ('▁house' -> '▁ho', where edit distance picks the suffix 'ouse'), which suits
    next-token distributions; edit distance remains for tokens with no such prefix.
    Whitespace-only tokens (a character tokenizer's ' ') normalise to '' and map to a bare
    word marker when the target has one.  Source ids missing from a non-contiguous vocab map
    to -1.
    """
    if not src_vocab or not tgt_vocab:
        side = "source" if not src_vocab else "target"
        raise FusionError(f"cannot align: the {side} vocabulary is empty")
    if fallback not in VOCAB_FALLBACKS:
        raise FusionError(f"vocab map fallback must be one of {VOCAB_FALLBACKS}, got {fallback!r}")
    entries: dict[tuple[str, bool], int] = {}
    norm_to_id: dict[str, int] = {}
    for tok, i in sorted(tgt_vocab.items(), key=lambda kv: kv[1]):
        norm = _norm(tok)
        entries.setdefault((norm, _ws(tok)), i)
        norm_to_id.setdefault(norm, i)
    out = np.full(max(src_vocab.values()) + 1, -1, dtype=np.int32)
    pending: list[tuple[int, str, bool]] = []
    for tok, i in src_vocab.items():
        if tok in tgt_vocab:
            out[i] = tgt_vocab[tok]
            continue
        norm, ws = _norm(tok), _ws(tok)
        if (norm, ws) in entries:
            out[i] = entries[(norm, ws)]
        elif norm in norm_to_id:
            out[i] = norm_to_id[norm]
        else:
            pending.append((i, norm, ws))
    if len(pending) == len(src_vocab):
        raise FusionError(
            "cannot align: no source token matches any target token, even after normalising "
            "word markers ('Ġ', '▁', '##'); the tokenizers do not share a script or alphabet"
        )
    nearest = _Nearest(entries)
    for i, norm, ws in pending:
        prefix = _longest_prefix(norm, ws, entries) if fallback == "prefix" else None
        out[i] = nearest(norm, ws) if prefix is None else prefix
    return out


def vocab_match_shares(src_vocab: dict[str, int], tgt_vocab: dict[str, int]) -> dict[str, float]:
    """How well two vocabularies pair up, before any edit-distance fallback: the share of source
    tokens ``vocab_map`` matches exactly (same raw token, or same text once word markers are
    normalised) and the share of the target's tokens that some source token matches so.  A
    low target share means the source's distributions are mostly mapped by approximation."""
    norm_to_ids: dict[str, list[int]] = {}
    for tok, i in tgt_vocab.items():
        norm_to_ids.setdefault(_norm(tok), []).append(i)
    exact, hit = 0, set()
    for tok in src_vocab:
        if tok in tgt_vocab:
            exact += 1
            hit.add(tgt_vocab[tok])
        elif _norm(tok) in norm_to_ids:
            exact += 1
            hit.update(norm_to_ids[_norm(tok)])
    return {
        "vocab_exact_share": exact / max(1, len(src_vocab)),
        "target_vocab_share": len(hit) / max(1, len(tgt_vocab)),
    }


def _longest_prefix(norm: str, ws: bool, entries: dict[tuple[str, bool], int]) -> int | None:
    for length in range(len(norm) - 1, 0, -1):
        hit = entries.get((norm[:length], ws))
        if hit is not None:
            return hit
    return None


def _norm(tok: str) -> str:
    return "" if tok and not tok.strip() else normalize_token(tok)


def _ws(tok: str) -> bool:
    return tok[:1] in (*_MARKERS, " ")


def _char_alignment(a: str, b: str) -> np.ndarray:
    """For each char of ``a``, the index of the char of ``b`` it is matched or substituted with
    on a minimum-edit-distance path (-1 where deleted).  Common prefix/suffix are matched
    directly, so the quadratic DP only covers the region where the texts differ."""
    out = np.full(len(a), -1, dtype=np.int64)
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[len(a) - 1 - q] == b[len(b) - 1 - q]:
        q += 1
    out[:p] = np.arange(p)
    if q:
        out[len(a) - q :] = np.arange(len(b) - q, len(b))
    mid_a, mid_b = a[p : len(a) - q], b[p : len(b) - q]
    m, n = len(mid_a), len(mid_b)
    if m == 0 or n == 0:
        return out
    if m * n > 50_000_000:
        raise FusionError(
            f"cannot align: the sequences differ over {m} x {n} characters; they do not look "
            "like tokenisations of the same text"
        )
    codes = np.array([ord(c) for c in mid_b], dtype=np.int32)
    ar = np.arange(n + 1, dtype=np.int32)
    table = np.empty((m + 1, n + 1), dtype=np.int32)
    table[0] = ar
    for i, ch in enumerate(mid_a, start=1):
        prev = table[i - 1]
        tmp = np.minimum(prev[1:] + 1, prev[:-1] + (codes != ord(ch)))
        cur = np.concatenate([[i], tmp]).astype(np.int32)
        table[i] = np.minimum.accumulate(cur - ar) + ar
    i, j = m, n
    while i > 0 and j > 0:
        diag = table[i - 1, j - 1] + (mid_a[i - 1] != mid_b[j - 1])
        if table[i, j] == diag:
            out[p + i - 1] = p + j - 1
            i, j = i - 1, j - 1
        elif table[i, j] == table[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return out


def align_sequences(src_tokens: list[str], tgt_tokens: list[str]) -> list[tuple[int, int]]:
    """Monotone ``(source position, target position)`` pairs whose distributions correspond.

    Both token lists are normalised and concatenated (whitespace dropped); a character-level
    edit-distance DP aligns the two texts (FuseLLM's reference runs a token-level DTW with an
    edit-distance cost instead; matching characters keeps char- vs subword-segmentations exact).
    A pair is kept where a source token and a target token *end* on aligned characters: the
    logits at a position predict what follows the text so far, so only span ends agree.
    Many-to-one therefore takes the last token of the longer span ("h e l l o" -> "hello"
    pairs 'o' with 'hello'), and inner tokens of a span stay unaligned (no distribution).
    """
    if not src_tokens or not tgt_tokens:
        side = "source" if not src_tokens else "target"
        raise FusionError(f"cannot align: the {side} token sequence is empty")

    def ends(tokens: list[str]) -> tuple[str, list[int]]:
        text, last = [], []
        pos = -1
        for tok in tokens:
            piece = "".join(normalize_token(tok).split())
            text.append(piece)
            pos += len(piece)
            last.append(pos if piece else -1)  # -1: no characters, never paired
        return "".join(text), last

    src_text, src_end = ends(src_tokens)
    tgt_text, tgt_end = ends(tgt_tokens)
    char_map = _char_alignment(src_text, tgt_text)
    tgt_pos_of_end = {e: j for j, e in enumerate(tgt_end) if e >= 0}
    pairs = []
    for i, e in enumerate(src_end):
        if e >= 0 and char_map[e] >= 0 and int(char_map[e]) in tgt_pos_of_end:
            pairs.append((i, tgt_pos_of_end[int(char_map[e])]))
    return pairs


TEACHER_POSITIONS = ("same_next", "all")


def keep_same_next(
    pairs: list[tuple[int, int]],
    src_ids: Sequence[int],
    tgt_ids: Sequence[int],
    vocab_map: np.ndarray,
) -> list[tuple[int, int]]:
    """The aligned pairs whose *next* tokens agree: source token ``i + 1`` maps (``vocab_map``)
    to target token ``j + 1``.  FuseLLM's condition for using a source's distribution: there
    both models are about to emit the same unit, so the source's alternatives are alternatives
    at the target's granularity.  Elsewhere (a character model at a word end, a coarser or finer
    split) the source's distribution is over different units and is better left out."""
    n_src, n_tgt = len(src_ids), len(tgt_ids)
    return [
        (i, j)
        for i, j in pairs
        if i + 1 < n_src and j + 1 < n_tgt and int(vocab_map[src_ids[i + 1]]) == tgt_ids[j + 1]
    ]
