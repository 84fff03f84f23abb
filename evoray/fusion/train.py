"""FuseLLM continual training of a target model on fused source distributions.

``fuse_train`` aligns every source's stored top-k distributions to the target's tokens
(``align_sequences`` on token strings, ``vocab_map`` once per source), fuses them per sequence
(MinCE or AvgCE on each source's mean CE) and trains the target with
``lam * CLM + (1 - lam) * fusion``.  ``clm_train`` is the same loop with ``lam = 1`` and no
sources: the plain continual-training baseline.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
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
from evoray.fusion.distill import (
    fuse_avg_ce,
    fuse_min_ce,
    fusellm_loss_batch,
    map_to_target,
    pad_teachers,
)
from evoray.fusion.sources import (
    check_fits,
    encode_ids,
    extract_all,
    iter_source_rows,
    load_lm,
    model_name,
)
from evoray.fusion.teachers import TeacherStore, write_teacher_store
from evoray.weights.export import replace_folder

METHODS = {"avg_ce": fuse_avg_ce, "min_ce": fuse_min_ce}
CE_UNITS = ("token", "char")
EVAL_TEXTS = 512  # loss_before / loss_after are measured on the first this many texts


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
    for n, text in enumerate(texts, start=first):
        ids = encode_ids(tgt_tok, text)
        tgt_tokens = tgt_tok.convert_ids_to_tokens(ids)
        dists, ces = [], []
        for vmap, rows, d in streams:
            r = next(rows, None)
            if r is None or r["text"] != text:
                raise FusionError(
                    f"the distributions in {d} were extracted from other texts (text {n} "
                    f"{'is missing' if r is None else 'differs'}); extract them again"
                )
            pairs = align_sequences(r["tokens"], tgt_tokens)
            if positions == "same_next":
                pairs = keep_same_next(pairs, r["input_ids"], ids, vmap)
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
        yield ids, METHODS[method](dists, ces)
    if start is None:
        for _, rows, d in streams:
            if next(rows, None) is not None:
                raise FusionError(f"the distributions in {d} cover more texts than given")


def source_vocab_maps(tgt_tok, source_paths: Sequence[str | Path], fallback: str) -> list:
    """``checked_vocab_map`` source -> target for every source (computed once per distinct
    source: the edit-distance search is the slow part of alignment on large vocabularies)."""
    from transformers import AutoTokenizer

    from evoray.weights.checkpoint import resolve_model_folder

    maps: dict[str, np.ndarray] = {}
    for i, src in enumerate(source_paths):
        key = str(src)
        if key not in maps:
            src_tok = AutoTokenizer.from_pretrained(str(resolve_model_folder(key)))
            maps[key] = checked_vocab_map(
                src_tok, tgt_tok, name=f"source {i} ({src})", fallback=fallback
            )
    return [maps[str(src)] for src in source_paths]


def teacher_part_job(
    target_path: str | Path, texts: Sequence[str], start: int, path: str | Path, **kwargs
) -> dict:
    """One part of ``build_teachers``: texts ``start:start + len(texts)`` into ``path``."""
    from transformers import AutoTokenizer

    from evoray.weights.checkpoint import resolve_model_folder

    tok = AutoTokenizer.from_pretrained(str(resolve_model_folder(target_path)))
    rows = iter_fused_teachers(tok, texts, start=start, **kwargs)
    return {"path": write_teacher_store(path, rows), "texts": len(texts)}


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
) -> Path:
    """The fused teachers of ``texts`` as ``out_dir/part-NNNNN.arrow`` files (a
    ``TeacherStore`` folder), ``part_size`` texts each, built in parallel as Ray tasks with
    ``use_ray``.  Vocabulary maps are computed once here and shipped to every part.  The
    store is built once and shared by every training (and every data-parallel rank)."""
    from transformers import AutoTokenizer

    from evoray.fusion.remote import run_jobs
    from evoray.weights.checkpoint import resolve_model_folder

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
    tok = AutoTokenizer.from_pretrained(str(resolve_model_folder(target_path)))
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
    run_jobs(jobs, use_ray=use_ray, num_cpus=num_cpus)
    if report:
        report(f"  fused teachers: {len(jobs)} part(s), {len(texts)} texts in {out_dir}")
    return out_dir


def fused_teachers(*args, **kwargs) -> tuple[list[list[int]], list[tuple]]:
    """``iter_fused_teachers`` collected: (target ids per text, fused teacher per text)."""
    pairs = list(iter_fused_teachers(*args, **kwargs))
    return [ids for ids, _ in pairs], [t for _, t in pairs]


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
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


def _batch(ids_list, idx, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(ids_list[i]) for i in idx)
    ids = torch.zeros((len(idx), width), dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for b, i in enumerate(idx):
        ids[b, : len(ids_list[i])] = torch.tensor(ids_list[i])
        mask[b, : len(ids_list[i])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _batch_loss(model, ids_list, teachers, idx, lam, kind, temperature, device, autocast):
    ids, mask, labels = _batch(ids_list, idx, device)
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if teachers is None:
        return fusellm_loss_batch(logits, labels, None, None, None, 1.0, kind, temperature)
    v, ix, m = (t.to(device) for t in pad_teachers([teachers[i] for i in idx], ids.shape[1]))
    return fusellm_loss_batch(logits, labels, v, ix, m, lam, kind, temperature)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU.  An explicit ``cuda`` without a GPU is an
    error (a CPU build of torch, or no GPU given to this process), not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionError(
            f"device {device!r} asked for but torch sees no GPU here (torch {torch.__version__}; "
            "a CPU build, or no GPU assigned to this process); use device: auto or cpu"
        )
    return dev


PRECISIONS = ("fp32", "bf16")


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise FusionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def save_model(model, tok, out_dir: str | Path) -> Path:
    """Save model + tokenizer so that ``out_dir`` is always whole: written beside it, then
    renamed over it (a crash mid-save leaves the previous folder, not a torn one).  Entries of
    an existing ``out_dir`` the save does not write (``distributions/``) are carried over."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if out_dir.exists():
        for entry in out_dir.iterdir():
            if not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)
    replace_folder(tmp, out_dir)
    return out_dir


def _train_loop(
    model,
    tok,
    ids_list,
    teachers,
    *,
    lam,
    kind,
    temperature,
    steps,
    lr,
    seed,
    batch_size,
    out_dir,
    device="auto",
    precision="fp32",
    log_every=0,
    dist=None,
) -> dict:
    """AdamW on the padded batches of ``_batches``; weights stay float32 (``bf16`` autocasts
    the forward pass).  ``ids_list`` and ``teachers`` are indexable per text (lists, or a
    ``TeacherStore`` and its ``ids``).  Saves model + tokenizer to ``out_dir``.

    ``dist=(rank, world)`` inside a torch.distributed process group (Ray Train): the model is
    wrapped in DistributedDataParallel, each rank takes every ``world``-th sequence of each
    batch (so the averaged gradient is the whole batch's), and rank 0 saves.
    """
    check_fits(model, ids_list, f"target {model_name(model)}")
    rank, world = dist or (0, 1)
    if batch_size % world:
        raise FusionError(f"batch_size {batch_size} must be a multiple of the {world} workers")
    dev = resolve_device(device)
    autocast = _autocast(dev, precision)
    torch.manual_seed(seed)
    model.to(dev)
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    probe = list(range(min(len(ids_list), EVAL_TEXTS)))
    eval_idx = [probe[i : i + 32] for i in range(0, len(probe), 32)]
    args = (lam, kind, temperature, dev, autocast)

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(
                float(_batch_loss(model, ids_list, teachers, b, *args)) * len(b) for b in eval_idx
            )
        return total / len(probe)

    before = full_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for idx in _batches(len(ids_list), batch_size, steps, seed):
        loss = _batch_loss(trained, ids_list, teachers, idx[rank::world], *args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        shown = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(shown)  # the batch's loss, as a single process sees it
            shown /= world
        losses.append(float(shown))
        if rank == 0 and log_every and (len(losses) % log_every == 0 or len(losses) == steps):
            window = losses[-log_every:]
            print(
                f"  {Path(out_dir).name}: step {len(losses)}/{steps}, "
                f"loss {sum(window) / len(window):.4f}",
                flush=True,
            )
    after = full_loss()
    if rank == 0:
        save_model(model.to("cpu"), tok, out_dir)
    if world > 1:
        torch.distributed.barrier()  # the folder is whole before any rank returns
    out_dir = Path(out_dir)
    return {
        "out_dir": out_dir,
        "loss_before": before,
        "loss_after": after,
        "losses": losses,
        "device": str(dev),
    }


def fuse_train(
    target_path: str | Path,
    source_paths: Sequence[str | Path],
    texts: Sequence[str],
    *,
    method: str = "avg_ce",
    lam: float = 0.9,
    kind: str = "ce",
    temperature: float = 1.0,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 8,
    k: int = 10,
    out_dir: str | Path,
    dist_dirs: Sequence[str | Path] | None = None,
    use_ray: bool = False,
    device: str = "auto",
    precision: str = "fp32",
    vocab_fallback: str = "edit_distance",
    positions: str = "same_next",
    ce_unit: str = "token",
    log_every: int = 0,
    dist: tuple[int, int] | None = None,
    teachers: str | Path | None = None,
) -> dict:
    """Train the target at ``target_path`` with FuseLLM on ``texts``; save it to ``out_dir``.

    ``dist_dirs`` are the sources' shard folders (from ``extract_all`` over the same texts, in
    ``source_paths`` order); without them the distributions are extracted first into
    ``out_dir/distributions``.  The fused teachers are streamed into a memory-mapped
    ``TeacherStore`` beside ``out_dir`` (removed afterwards), so memory does not grow with the
    corpus; ``teachers`` names a store already built by ``build_teachers`` instead (then the
    distribution and fusion arguments are not used).  Returns ``out_dir``, the FuseLLM loss on
    the first ``EVAL_TEXTS`` texts before and after training (``loss_before`` /
    ``loss_after``) and the per-step losses; with ``log_every`` it prints the mean loss of
    every ``log_every`` steps.
    """
    texts = list(texts)
    if not texts:
        raise FusionError("the training corpus is empty")
    if not source_paths:
        raise FusionError("fuse_train needs at least one source model; use clm_train for none")
    if not 0.0 <= lam <= 1.0:
        raise FusionError(f"lam must be in [0, 1], got {lam}")
    model, tok = load_lm(target_path)
    out_dir = Path(out_dir)
    store_path = None  # a store built here, removed afterwards
    if teachers is not None:
        store = TeacherStore(teachers)
        if len(store) != len(texts):
            raise FusionError(
                f"the teacher store {teachers} holds {len(store)} texts, the corpus {len(texts)}"
            )
    else:
        if dist_dirs is None:
            dist_dirs = extract_all(
                source_paths, texts, out_dir / "distributions", k=k, use_ray=use_ray
            )
        rank = dist[0] if dist else 0
        store_path = out_dir.with_name(f".{out_dir.name}.teachers-{rank}.arrow")  # per rank
        rows = iter_fused_teachers(
            tok, texts, source_paths, dist_dirs, method, vocab_fallback, positions, ce_unit
        )
        store = TeacherStore(write_teacher_store(store_path, rows))
    try:
        return _train_loop(
            model,
            tok,
            store.ids,
            store,
            lam=lam,
            kind=kind,
            temperature=temperature,
            steps=steps,
            lr=lr,
            seed=seed,
            batch_size=batch_size,
            out_dir=out_dir,
            device=device,
            precision=precision,
            log_every=log_every,
            dist=dist,
        )
    finally:
        del store  # unmap before removing the file
        if store_path is not None:
            store_path.unlink(missing_ok=True)


def clm_train(
    target_path: str | Path,
    texts: Sequence[str],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 8,
    out_dir: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    log_every: int = 0,
    dist: tuple[int, int] | None = None,
) -> dict:
    """Plain causal-LM continual training (``lam = 1``, no sources), same loop and batches as
    ``fuse_train``: the baseline FuseLLM is compared against."""
    texts = list(texts)
    if not texts:
        raise FusionError("the training corpus is empty")
    model, tok = load_lm(target_path)
    ids_list = [np.asarray(encode_ids(tok, t), dtype=np.int32) for t in texts]
    return _train_loop(
        model,
        tok,
        ids_list,
        None,
        lam=1.0,
        kind="ce",
        temperature=1.0,
        steps=steps,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        out_dir=out_dir,
        device=device,
        precision=precision,
        log_every=log_every,
        dist=dist,
    )


def heldout_perplexity(model_path: str | Path, texts: Sequence[str], device: str = "cpu") -> float:
    """Token perplexity of the model on ``<bos> text <eos>`` sequences (its own tokenizer)."""
    from evoray.tasks.evaluation import EncodedSplit, lm_perplexity

    if not texts:
        raise FusionError("no held-out texts to score")
    model, tok = load_lm(model_path)
    model.to(resolve_device(device))
    rows = [encode_ids(tok, t) for t in texts]
    check_fits(model, rows, f"{model_path} (held-out texts)")
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    split = EncodedSplit(ids, mask, ids.masked_fill(mask == 0, -100))
    return lm_perplexity(model, split, batch_size=32)["perplexity"]


def perplexity_job(model_path: str | Path, texts: Sequence[str], device: str = "auto") -> dict:
    """``heldout_perplexity`` as a ``run_jobs`` job (a dict, with the device used)."""
    dev = str(resolve_device(device))
    return {"perplexity": heldout_perplexity(model_path, texts, dev), "device": dev}
