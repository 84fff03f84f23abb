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
    load_tokenizer,
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

    from evoray.weights.checkpoint import resolve_model_folder

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

    from evoray.weights.checkpoint import resolve_model_folder

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
    for i, (src, q) in enumerate(zip(source_paths, quality["sources"], strict=True)):
        say(
            f"  alignment, source {i} ({Path(src).name}): {q['aligned_share']:.1%} of target "
            f"positions aligned, {q['kept_share']:.1%} of those kept ({positions}); vocabulary: "
            f"{q['vocab_exact_share']:.1%} of the source's tokens mapped exactly, covering "
            f"{q['target_vocab_share']:.1%} of the target's"
        )
        if q["target_vocab_share"] < min_vocab_share:
            msg = (
                f"source {i} ({src}) maps exactly onto only "
                f"{q['target_vocab_share']:.1%} of the target's vocabulary (under "
                f"fusion.min_vocab_share {min_vocab_share:.0%}): where the target's next token "
                "has no exact counterpart among the source's, the source's distribution is "
                "over other units (edit-distance neighbours) or left out; a source with a "
                "closer tokenizer teaches more"
            )
            if report:
                report(f"warning: {msg}")
            else:
                import warnings

                warnings.warn(msg, stacklevel=2)
    say(f"  positions with a fused teacher: {quality['teacher_share']:.1%} of target positions")
    return out_dir


def alignment_quality(tgt_tok, source_paths: Sequence[str | Path], counts: dict) -> dict:
    """Shares from ``alignment_counts`` plus each source's ``vocab_match_shares``."""

    from evoray.fusion.align import vocab_match_shares
    from evoray.weights.checkpoint import resolve_model_folder

    total = max(1, counts["positions"])
    out = []
    for i, src in enumerate(source_paths):
        src_tok = load_tokenizer(resolve_model_folder(src))
        aligned = counts["aligned"][i]
        out.append(
            {
                "aligned_share": aligned / total,
                "kept_share": counts["kept"][i] / max(1, aligned),
                "teacher_share_source": counts["kept"][i] / total,
                **vocab_match_shares(src_tok.get_vocab(), tgt_tok.get_vocab()),
            }
        )
    return {"sources": out, "teacher_share": counts["teacher"] / total, "counts": counts}


def fused_teachers(*args, **kwargs) -> tuple[list[list[int]], list[tuple]]:
    """``iter_fused_teachers`` collected: (target ids per text, fused teacher per text)."""
    pairs = list(iter_fused_teachers(*args, **kwargs))
    return [ids for ids, _ in pairs], [t for _, t in pairs]


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


def save_model(model, tok, out_dir: str | Path, *, carry_over: bool = True) -> Path:
    """Save model + tokenizer so that ``out_dir`` is always whole: written beside it, then
    renamed over it (a crash mid-save leaves the previous folder, not a torn one).  Entries of
    an existing ``out_dir`` the save does not write (``distributions/``) are carried over,
    unless ``carry_over`` is False (a fresh build: nothing of the old folder stays)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if out_dir.exists() and carry_over:
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
    loss_terms=False,
    data_parallel="ddp",
    activation_checkpointing=False,
) -> dict:
    """AdamW on the padded batches of ``_batches``; weights stay float32 (``bf16`` autocasts
    the forward pass).  ``ids_list`` and ``teachers`` are indexable per text (lists, or a
    ``TeacherStore`` and its ``ids``).  Saves model + tokenizer to ``out_dir``.

    ``dist=(rank, world)`` inside a torch.distributed process group (Ray Train): the model is
    wrapped in DistributedDataParallel (``data_parallel="ddp"``) or sharded with FSDP2's
    ``fully_shard`` per decoder layer (``"fsdp"``: parameters, gradients and AdamW state split
    over the ranks), each rank takes every ``world``-th sequence of each batch (so the
    averaged gradient is the whole batch's), and rank 0 saves the full model.
    ``activation_checkpointing`` recomputes each layer's activations in the backward pass.
    The result has ``memory``: per rank, the bytes of its parameters, gradients and AdamW
    state (its shards under FSDP) and its peak resident memory.
    """
    check_fits(model, ids_list, f"target {model_name(model)}")
    rank, world = dist or (0, 1)
    if batch_size % world:
        raise FusionError(f"batch_size {batch_size} must be a multiple of the {world} workers")
    if data_parallel not in DATA_PARALLEL:
        raise FusionError(f"data_parallel must be one of {DATA_PARALLEL}, got {data_parallel!r}")
    dev = resolve_device(device)
    autocast = _autocast(dev, precision)
    torch.manual_seed(seed)
    model.to(dev)
    if activation_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = model
    sharded = world > 1 and data_parallel == "fsdp"
    if sharded:
        _fully_shard(model)
    elif world > 1:
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
        if sharded:  # FSDP2 keeps the root unsharded after a forward without backward; the
            model.reshard()  # optimizer must see (and step) the sharded parameters
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
    memory = _memory_per_rank(model, opt, world)
    terms = None
    if loss_terms and teachers is not None:  # each term alone, unweighted, after training
        args = (1.0, kind, temperature, dev, autocast)
        clm_term = full_loss()
        args = (0.0, kind, temperature, dev, autocast)
        terms = {"clm": clm_term, "fusion": full_loss()}
    if sharded:
        full = _unsharded(model)  # a collective: every rank takes part
        if rank == 0:
            save_model(full, tok, out_dir)
    elif rank == 0:
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
        "memory": memory,
        **({"terms_after": terms} if terms else {}),
    }


DATA_PARALLEL = ("ddp", "fsdp")


def _decoder_layers(model) -> list:
    """The repeated blocks FSDP shards one by one (Llama ``model.layers``, GPT-2
    ``transformer.h``); empty for an unknown layout (then the model is one unit)."""
    for path in ("model.layers", "transformer.h"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return list(obj)
    return []


def _fully_shard(model) -> None:
    """FSDP2 in place: each decoder layer its own unit, then the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def _unsharded(model):
    """A plain CPU copy of an FSDP2-sharded model (gathered on every rank, kept on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if torch.distributed.get_rank() != 0:
        return None
    full = AutoModelForCausalLM.from_config(model.config)
    full.load_state_dict(state)
    return full


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
    return local.numel() * local.element_size()


def _memory_per_rank(model, opt, world: int) -> list[dict]:
    """Per rank: bytes of parameters, gradients and optimizer state held there, and the peak
    resident memory of the process (``ru_maxrss``); gathered to every rank."""
    import resource

    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(
        _local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    mine = {
        "param_bytes": params,
        "grad_bytes": grads,
        "optimizer_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if world == 1:
        return [mine]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


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
    loss_terms: bool = False,
    data_parallel: str = "ddp",
    activation_checkpointing: bool = False,
    min_weight: float = 0.0,
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
    every ``log_every`` steps.  ``loss_terms``: also ``terms_after``, the CLM and fusion terms
    alone (unweighted) after training, to compare their scales.  ``data_parallel``,
    ``activation_checkpointing``: see ``_train_loop``; ``min_weight``: see ``fuse_avg_ce``.
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
            tok,
            texts,
            source_paths,
            dist_dirs,
            method,
            vocab_fallback,
            positions,
            ce_unit,
            min_weight=min_weight,
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
            loss_terms=loss_terms,
            data_parallel=data_parallel,
            activation_checkpointing=activation_checkpointing,
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
    data_parallel: str = "ddp",
    activation_checkpointing: bool = False,
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
        data_parallel=data_parallel,
        activation_checkpointing=activation_checkpointing,
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
