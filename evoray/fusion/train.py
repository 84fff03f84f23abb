"""FuseLLM continual training: the loop that trains a target on ``lam * CLM + (1 - lam) *
fusion`` against fused teachers (``fuse_train``), the same loop with ``lam = 1`` and no sources
as the baseline (``clm_train``), crash-safe saving, and held-out perplexity to compare them.

Teachers come from ``teacher_build``, batches from ``batches``, DDP/FSDP set-up from
``data_parallel``: one loop serves a single process and every Ray Train rank.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from evoray.fusion import FusionError
from evoray.fusion.batches import batch_loss, batch_order
from evoray.fusion.data_parallel import (
    DATA_PARALLEL,
    fully_shard_layers,
    memory_per_rank,
    unsharded_copy,
)
from evoray.fusion.sources import (
    check_fits,
    encode_ids,
    extract_all,
    load_lm,
    model_name,
)
from evoray.fusion.teacher_build import iter_fused_teachers
from evoray.fusion.teachers import TeacherStore, write_teacher_store
from evoray.weights.output_folder import replace_folder

EVAL_TEXTS = 512  # loss_before / loss_after are measured on the first this many texts


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
    """AdamW on the padded batches of ``batch_order``; weights stay float32 (``bf16`` autocasts
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
        fully_shard_layers(model)
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
                float(batch_loss(model, ids_list, teachers, b, *args)) * len(b) for b in eval_idx
            )
        if sharded:  # FSDP2 keeps the root unsharded after a forward without backward; the
            model.reshard()  # optimizer must see (and step) the sharded parameters
        return total / len(probe)

    before = full_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for idx in batch_order(len(ids_list), batch_size, steps, seed):
        loss = batch_loss(trained, ids_list, teachers, idx[rank::world], *args)
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
    memory = memory_per_rank(model, opt, world)
    terms = None
    if loss_terms and teachers is not None:  # each term alone, unweighted, after training
        args = (1.0, kind, temperature, dev, autocast)
        clm_term = full_loss()
        args = (0.0, kind, temperature, dev, autocast)
        terms = {"clm": clm_term, "fusion": full_loss()}
    if sharded:
        full = unsharded_copy(model)  # a collective: every rank takes part
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
