"""The fused teachers of a corpus: every source's top-k distributions aligned to the target's
tokens and fused per text (MinCE or AvgCE), streamed into a ``TeacherStore``.

Apart from training because the store is built once and shared by every training run and
every data-parallel rank; ``build_teachers`` builds it in parts as Ray tasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from evoray.fusion import FusionError
from evoray.fusion.align import (
    TEACHER_POSITIONS,
    align_sequences,
    keep_same_next,
    normalize_token,
    vocab_map,
)
from evoray.fusion.alignment_report import alignment_quality, report_alignment
from evoray.fusion.distill import (
    fuse_avg_ce,
    fuse_min_ce,
    map_to_target,
)
from evoray.fusion.sources import (
    encode_ids,
    iter_source_rows,
    load_tokenizer,
)
from evoray.fusion.teachers import write_teacher_store

METHODS = {"avg_ce": fuse_avg_ce, "min_ce": fuse_min_ce}
CE_UNITS = ("token", "char")


def per_char_ce(ce, text: str) -> float:
    """Total CE of a ``<bos> text <eos>`` sequence per character (the eos counts as one)."""
    return float(np.sum(np.asarray(ce, dtype=np.float64))) / (len(text) + 1)


def _content_vocab(tokenizer) -> set[str]:
    specials = set(tokenizer.all_special_tokens)
    return {normalize_token(t) for t in tokenizer.get_vocab() if t not in specials} - {""}


def checked_vocab_map(src_tok, tgt_tok, name: str = "source", fallback: str = "edit_distance"):
    """``vocab_map`` source -> target, after checking that the two share at least one
    non-special token (specials like '<s>' alone would make any pair look alignable)."""
    if not _content_vocab(src_tok) & _content_vocab(tgt_tok):
        raise FusionError(
            f"cannot align {name} with the target: their tokenizers share no token (special "
            "tokens aside) even after normalising word markers; they do not cover the same text"
        )
    return vocab_map(src_tok.get_vocab(), tgt_tok.get_vocab(), fallback)


def iter_fused_teachers(
    tgt_tok,
    texts: Sequence[str],
    source_paths: Sequence[str | Path],
    dist_dirs,
    method: str,
    vocab_fallback: str = "edit_distance",
    positions: str = "same_next",
    ce_unit: str = "token",
    *,
    start: int | None = None,
    vocab_maps: Sequence[np.ndarray] | None = None,
    stats: dict | None = None,
    min_weight: float = 0.0,
) -> Iterator[tuple[list[int], tuple]]:
    """Per text, in order: its target ids and the fused ``(values, indices, mask)``.

    Streams: each source's shards are read one at a time (``iter_source_rows``), so memory does
    not grow with the corpus.  ``positions="same_next"`` (FuseLLM's rule) uses a source's
    distribution only where the source's next token maps to the target's next token
    (``keep_same_next``); ``"all"`` uses it at every pair of aligned token ends.  ``ce_unit``
    scores sources for MinCE/AvgCE by mean CE per token (FuseLLM) or per character of the text
    (``"char"``: the total NLL of the text spread over its characters, comparable across
    tokenizers of different granularity, where a character model's per-token CE is low only
    because its tokens are small).

    ``start``: ``texts`` are the corpus's texts ``start:start + len(texts)`` (one part of a
    parallel build; the shards are read from there); None: the whole corpus, and the shards
    must hold exactly these texts.  ``vocab_maps``: precomputed per source (else computed here).
    ``stats`` (a dict) is filled with counts for alignment quality (``alignment_counts``).
    ``min_weight``: AvgCE's ``fuse_avg_ce`` threshold (positions whose present sources hold
    less of the sequence's weight get no teacher).
    """
    if method not in METHODS:
        raise FusionError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if ce_unit not in CE_UNITS:
        raise FusionError(f"ce_unit must be one of {CE_UNITS}, got {ce_unit!r}")
    if positions not in TEACHER_POSITIONS:
        raise FusionError(f"positions must be one of {TEACHER_POSITIONS}, got {positions!r}")
    if vocab_maps is None:
        vocab_maps = source_vocab_maps(tgt_tok, source_paths, vocab_fallback)
    first = start or 0
    stop = None if start is None else first + len(texts)
    streams = [
        (vmap, iter_source_rows(d, first, stop), d)
        for vmap, d in zip(vocab_maps, dist_dirs, strict=True)
    ]
    counts = alignment_counts(len(streams)) if stats is None else stats
    if not counts:
        counts.update(alignment_counts(len(streams)))
    for n, text in enumerate(texts, start=first):
        ids = encode_ids(tgt_tok, text)
        tgt_tokens = tgt_tok.convert_ids_to_tokens(ids)
        dists, ces = [], []
        counts["positions"] += len(ids) - 1  # positions that predict a next token
        for s, (vmap, rows, d) in enumerate(streams):
            r = next(rows, None)
            if r is None or r["text"] != text:
                raise FusionError(
                    f"the distributions in {d} were extracted from other texts (text {n} "
                    f"{'is missing' if r is None else 'differs'}); extract them again"
                )
            pairs = align_sequences(r["tokens"], tgt_tokens)
            counts["aligned"][s] += sum(1 for _, j in pairs if j + 1 < len(ids))
            if positions == "same_next":
                pairs = keep_same_next(pairs, r["input_ids"], ids, vmap)
            counts["kept"][s] += sum(1 for _, j in pairs if j + 1 < len(ids))
            dists.append(
                map_to_target(
                    torch.from_numpy(r["values"]),
                    torch.from_numpy(r["indices"]),
                    vmap,
                    pairs,
                    len(ids),
                )
            )
            ces.append(r["mean_ce"] if ce_unit == "token" else per_char_ce(r["ce"], r["text"]))
        fused = (
            fuse_avg_ce(dists, ces, min_weight) if method == "avg_ce" else fuse_min_ce(dists, ces)
        )
        counts["teacher"] += int(fused[2][:-1].sum())
        yield ids, fused
    if start is None:
        for _, rows, d in streams:
            if next(rows, None) is not None:
                raise FusionError(f"the distributions in {d} cover more texts than given")


def alignment_counts(n_sources: int) -> dict:
    """Zeroed counters ``iter_fused_teachers`` fills: target positions that predict a token,
    per source those with an aligned distribution (``aligned``) and those ``positions`` keeps
    (``kept``), and those with a fused teacher at all (``teacher``)."""
    return {"positions": 0, "aligned": [0] * n_sources, "kept": [0] * n_sources, "teacher": 0}


def add_counts(total: dict, part: dict) -> dict:
    """Sum two ``alignment_counts`` dicts (parts of a parallel build)."""
    if not total:
        total.update({k: (list(v) if isinstance(v, list) else v) for k, v in part.items()})
        return total
    for k, v in part.items():
        if isinstance(v, list):
            total[k] = [a + b for a, b in zip(total[k], v, strict=True)]
        else:
            total[k] += v
    return total


def source_vocab_maps(tgt_tok, source_paths: Sequence[str | Path], fallback: str) -> list:
    """``checked_vocab_map`` source -> target for every source (computed once per distinct
    source: the edit-distance search is the slow part of alignment on large vocabularies)."""

    from evoray.weights.sources import resolve_model_folder

    maps: dict[str, np.ndarray] = {}
    for i, src in enumerate(source_paths):
        key = str(src)
        if key not in maps:
            src_tok = load_tokenizer(resolve_model_folder(key))
            maps[key] = checked_vocab_map(
                src_tok, tgt_tok, name=f"source {i} ({src})", fallback=fallback
            )
    return [maps[str(src)] for src in source_paths]


def teacher_part_job(
    target_path: str | Path, texts: Sequence[str], start: int, path: str | Path, **kwargs
) -> dict:
    """One part of ``build_teachers``: texts ``start:start + len(texts)`` into ``path``."""

    from evoray.weights.sources import resolve_model_folder

    tok = load_tokenizer(resolve_model_folder(target_path))
    counts: dict = {}
    rows = iter_fused_teachers(tok, texts, start=start, stats=counts, **kwargs)
    return {"path": write_teacher_store(path, rows), "texts": len(texts), "counts": counts}


def build_teachers(
    target_path: str | Path,
    source_paths: Sequence[str | Path],
    texts: Sequence[str],
    dist_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "avg_ce",
    vocab_fallback: str = "edit_distance",
    positions: str = "same_next",
    ce_unit: str = "token",
    part_size: int = 2048,
    use_ray: bool = False,
    num_cpus: float = 1,
    report=None,
    min_vocab_share: float = 0.2,
    stats: dict | None = None,
    min_weight: float = 0.0,
) -> Path:
    """The fused teachers of ``texts`` as ``out_dir/part-NNNNN.arrow`` files (a
    ``TeacherStore`` folder), ``part_size`` texts each, built in parallel as Ray tasks with
    ``use_ray``.  Vocabulary maps are computed once here and shipped to every part.  The
    store is built once and shared by every training (and every data-parallel rank).

    Alignment quality per source goes to ``report`` (and into ``stats``, if given): the share
    of target positions with an aligned source distribution, the share ``positions`` keeps, and
    the shares of the source's vocabulary matched exactly and of the target's it covers so;
    a target share under ``min_vocab_share`` is also a warning (``report``, else ``warnings``).
    """

    from evoray.fusion.remote import run_jobs
    from evoray.weights.sources import resolve_model_folder

    texts = list(texts)
    if not texts:
        raise FusionError("the training corpus is empty")
    if part_size < 1:
        raise FusionError(f"part_size must be >= 1, got {part_size}")
    for d in dist_dirs:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(d).glob("shard-*.parquet"))
        if rows != len(texts):
            raise FusionError(
                f"the distributions in {d} hold {rows} texts, the corpus {len(texts)}; extract "
                "them again for this corpus"
            )
    tok = load_tokenizer(resolve_model_folder(target_path))
    maps = source_vocab_maps(tok, source_paths, vocab_fallback)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.arrow"):
        old.unlink()
    common = {
        "target_path": target_path,
        "source_paths": source_paths,
        "dist_dirs": dist_dirs,
        "method": method,
        "vocab_fallback": vocab_fallback,
        "positions": positions,
        "ce_unit": ce_unit,
        "vocab_maps": maps,
        "min_weight": min_weight,
    }
    jobs = [
        (
            teacher_part_job,
            {
                **common,
                "texts": texts[a : a + part_size],
                "start": a,
                "path": out_dir / f"part-{a // part_size:05d}.arrow",
            },
        )
        for a in range(0, len(texts), part_size)
    ]
    results = run_jobs(jobs, use_ray=use_ray, num_cpus=num_cpus)
    counts: dict = {}
    for r in results:
        add_counts(counts, r["counts"])
    quality = alignment_quality(tok, source_paths, counts)
    if stats is not None:
        stats.update(quality)
    say = report or (lambda _msg: None)
    say(f"  fused teachers: {len(jobs)} part(s), {len(texts)} texts in {out_dir}")
    report_alignment(quality, source_paths, positions, min_vocab_share, report)
    return out_dir


def fused_teachers(*args, **kwargs) -> tuple[list[list[int]], list[tuple]]:
    """``iter_fused_teachers`` collected: (target ids per text, fused teacher per text)."""
    pairs = list(iter_fused_teachers(*args, **kwargs))
    return [ids for ids, _ in pairs], [t for _, t in pairs]
