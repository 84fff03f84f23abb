"""Per-model statistics for data-aware merging: diagonal Fisher and RegMean Gram matrices.

Fisher merging (Matena & Raffel, 2022) weights each parameter by how much the model's
predictions depend on it; RegMean (Jin et al., 2023) solves, per linear layer, for the weight
that best reproduces every model's outputs on its own inputs, which only needs the Gram matrix
of those inputs. Both are computed once per model on a small split and then fixed for a whole
population search (Evolver), so ``cached_statistics`` keeps them on disk keyed by the model's
files, the split and the settings.

Tensors come back float32 on the CPU, keyed by parameter name as in the model's
``state_dict`` (and so as in its checkpoint and ``Layout``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from evoray.errors import ConfigError, EvorayError
from evoray.population.mergers import TRANSPOSED_GRAM
from evoray.tasks.evaluation import EncodedSplit

log = logging.getLogger(__name__)

FISHER_MODES = ("expected", "empirical")
STAT_KINDS = ("fisher", "regmean")
CACHE_VERSION = 2  # 2: GPT-2 Conv1D Grams
# Most per-example gradients held at once by a causal LM's Fisher (float32 bytes).
GRAD_BUDGET_BYTES = 1 << 30
# Files whose names, sizes and mtimes identify a model folder's weights (and its config, which
# can change what the same weights compute, e.g. the number of labels).
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILE_NAMES = ("config.json",)


def _rows(split: EncodedSplit, n_examples: int | None) -> int:
    if n_examples is not None and n_examples < 1:
        raise ConfigError(f"n_examples must be a positive number of rows, got {n_examples}")
    if len(split) == 0:
        raise ConfigError("cannot compute statistics on an empty split")
    return len(split) if n_examples is None else min(n_examples, len(split))


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ConfigError("the model has no parameters to compute statistics for") from None


def fisher_diagonal(
    model: nn.Module,
    split: EncodedSplit,
    *,
    n_examples: int | None = None,
    mode: str | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over examples of ``(d log p(y|x))^2``.

    A split with 2-D ``labels`` (a causal LM's token ids, -100 where no loss is taken) goes to
    ``causal_lm_fisher`` (gold tokens, ``batch_size`` rows per forward). Otherwise the model is
    a sequence classifier, as below; ``mode`` defaults to ``"expected"`` for it.

    ``mode="expected"`` takes the exact expectation over labels under the model's own
    ``p(y|x)`` (the true Fisher, as in Matena & Raffel); ``"empirical"`` uses the gold label.
    The first ``n_examples`` rows are used (all if ``None``).

    Per-example gradients come from a plain loop, one forward per example with its trailing
    padding cut off and one backward per label. ``torch.func.vmap`` is not used because
    transformers' mask construction branches on the mask's values, which vmap refuses; the
    loop works for any model and is exact: about 1.2 s (expected, 2 labels) or 0.8 s
    (empirical) for 128 examples of the default zoo's 300k-parameter BERT on one CPU thread.
    Floating buffers in the ``state_dict`` get zeros, so a Fisher merge averages them; a tied
    parameter appears under each of its names.
    """
    if split.labels.dim() == 2:
        if mode not in (None, "empirical"):
            raise ConfigError(
                f"Fisher mode {mode!r} is not available for causal LMs (the expectation over "
                "the vocabulary at every position is intractable); use 'empirical' (gold tokens)"
            )
        return causal_lm_fisher(model, split, n_examples=n_examples, batch_size=batch_size)
    mode = mode or "expected"
    if mode not in FISHER_MODES:
        raise ConfigError(f"Fisher mode {mode!r} is unknown; use one of {list(FISHER_MODES)}")
    n = _rows(split, n_examples)
    device = _device(model)
    params = list(model.parameters())
    # On each parameter's own device: a model spread over several GPUs has several.
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    requires = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for b in range(n):
                mask = split.attention_mask[b]
                keep = int(mask.nonzero().max()) + 1 if mask.any() else mask.numel()
                logits = model(
                    input_ids=split.input_ids[b : b + 1, :keep].to(device),
                    attention_mask=mask[None, :keep].to(device),
                ).logits
                logp = logits.reshape(-1).float().log_softmax(-1)
                if mode == "empirical":
                    y = int(split.labels[b])
                    if not 0 <= y < logp.numel():
                        raise ConfigError(
                            f"label {y} of row {b} is outside the model's {logp.numel()} labels"
                        )
                    targets = [(y, 1.0)]
                else:
                    probs = logp.detach().exp().tolist()
                    targets = list(enumerate(probs))
                for k, (y, weight) in enumerate(targets):
                    grads = torch.autograd.grad(
                        logp[y],
                        params,
                        retain_graph=k < len(targets) - 1,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    for a, g in zip(acc, grads, strict=True):
                        a.add_(g.float().square(), alpha=weight)
    finally:
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return _by_name(model, params, acc, n)


def _by_name(
    model: nn.Module, params: list[nn.Parameter], acc: list[torch.Tensor], n: int
) -> dict[str, torch.Tensor]:
    """Accumulated squared gradients / n, keyed by every parameter name (tied ones too) and
    zeros for floating buffers."""
    by_param = {id(p): a.div_(n).cpu() for p, a in zip(params, acc, strict=True)}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        f = by_param[id(p)]
        out[name] = f.clone() if id(p) in seen else f  # clones: safetensors refuses shared memory
        seen.add(id(p))
    for name, t in model.state_dict().items():
        if name not in out and t.is_floating_point():
            out[name] = torch.zeros(t.shape, dtype=torch.float32)
    return out


def _lm_targets(split: EncodedSplit, sl: slice, device: torch.device):
    """Inputs, position ids, next-token targets and their validity for rows ``sl`` of a
    causal-LM split (as in ``lm_perplexity``: a target counts if it is a label and the
    position predicting it is real text; positions follow the mask, so left padding is fine)."""
    ids = split.input_ids[sl].to(device)
    mask = split.attention_mask[sl].to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = split.labels[sl, 1:].to(device)
    valid = (targets != -100) & (mask[:, :-1] == 1)
    return ids, mask, positions, targets, valid


def causal_lm_fisher(
    model: nn.Module,
    split: EncodedSplit,
    *,
    n_examples: int | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of a causal LM: mean over texts of ``(d log p(text))^2``,
    where ``log p(text)`` sums the log-likelihoods of its labelled tokens (labels != -100).

    Batched on the model's device: one forward per ``batch_size`` rows, and the rows'
    per-example gradients from vectorised backwards (``is_grads_batched``) of as many rows as
    fit ``GRAD_BUDGET_BYTES`` (1 GiB) of gradients, one row at a time for larger models. Ops
    without a vmap batching rule fall back to one backward per row (same result).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n = _rows(split, n_examples)
    device = _device(model)
    params = list(model.parameters())
    # On each parameter's own device: a model spread over several GPUs has several.
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    requires = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                ids, mask, positions, targets, valid = _lm_targets(split, sl, device)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
                logp = logits[:, :-1].float().log_softmax(-1)
                token_ll = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                seq_ll = (token_ll * valid).sum(-1)  # (rows,)
                for grads in _per_row_grads(seq_ll, params):
                    for a, g in zip(acc, grads, strict=True):
                        a.add_(g.float().square().sum(0))
    finally:
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return _by_name(model, params, acc, n)


def _per_row_grads(values: torch.Tensor, params: list[nn.Parameter]):
    """Per-row gradients of ``values`` (1-D) w.r.t. ``params``, in chunks of
    ``(rows, *shape)`` that hold at most ``GRAD_BUDGET_BYTES`` of gradients (one row at a time
    for a model larger than that)."""
    rows = values.shape[0]
    numel = sum(p.numel() for p in params)
    per = max(1, min(rows, GRAD_BUDGET_BYTES // max(1, 4 * numel)))
    eye = torch.eye(rows, dtype=values.dtype, device=values.device)
    done = 0
    try:
        while per > 1 and done < rows:
            stop = min(done + per, rows)
            grads = torch.autograd.grad(
                values,
                params,
                grad_outputs=eye[done:stop],
                is_grads_batched=True,
                retain_graph=True,  # later chunks (or the fallback) need the graph
                allow_unused=True,
                materialize_grads=True,
            )
            done = stop
            yield grads
    except RuntimeError as e:  # an op without a vmap batching rule
        log.debug("batched per-example gradients failed (%s); one backward per row", e)
    for r in range(done, rows):
        grads = torch.autograd.grad(
            values[r],
            params,
            retain_graph=r < rows - 1,
            allow_unused=True,
            materialize_grads=True,
        )
        yield tuple(g.unsqueeze(0) for g in grads)


def regmean_grams(
    model: nn.Module,
    split: EncodedSplit,
    *,
    n_examples: int | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Gram matrices ``X^T X`` of the inputs of every ``nn.Linear``, keyed ``<module>.weight``.

    Rows of ``X`` are the input vectors of non-padding tokens (positions where the attention
    mask is 0 are dropped; a linear applied once per example, like a classification head, gets
    one row per example). The sum is divided by the number of examples, so models scored on
    splits of different sizes are comparable; RegMean's merge is invariant to a common scale.
    GPT-2's ``Conv1D`` (weight stored ``(in, out)``) gets its Gram under
    ``<module>.weight:in_rows`` (``TRANSPOSED_GRAM``), which RegMean applies from the left.
    A causal-LM split (2-D ``labels``) is run with position ids from its attention mask, so
    left-padded rows give the rows of their unpadded text; every non-padding token is a row
    (prompt tokens too: they are inputs of the layers all the same).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n = _rows(split, n_examples)
    device = _device(model)
    grams: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    warned: set[str] = set()

    def hook_for(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            mask = current["mask"]
            if x.dim() >= 3 and x.shape[:2] == mask.shape:
                rows = x[mask]
            else:
                if x.shape[:-1] != mask.shape[:1] and key not in warned:
                    warned.add(key)
                    log.warning(
                        "%s: input of shape %s does not line up with the batch %s; all its "
                        "rows (padding included) go into the Gram",
                        key,
                        list(x.shape),
                        list(mask.shape),
                    )
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.float()
            grams[key].addmm_(rows.T, rows)

        return hook

    handles = []
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Linear):
            width = module.in_features
        elif _is_conv1d(module):
            key, width = key + TRANSPOSED_GRAM, module.weight.shape[0]
        else:
            continue
        if key not in grams:
            grams[key] = torch.zeros(width, width, dtype=torch.float32, device=device)
            handles.append(module.register_forward_pre_hook(hook_for(key), with_kwargs=True))
    if not grams:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layers to compute Grams for")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                mask = split.attention_mask[sl].to(device)
                current["mask"] = mask.bool()
                extra = {}
                if split.labels.dim() == 2:  # a causal LM: positions follow the mask
                    extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                model(input_ids=split.input_ids[sl].to(device), attention_mask=mask, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: g.div_(n).cpu() for k, g in grams.items()}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear layer with its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


# -- cache ------------------------------------------------------------------------------------


def model_fingerprint(model_path: str | os.PathLike) -> str:
    """Cheap identity of a model's weights: names, sizes and mtimes of its weight files.

    Reading and hashing gigabytes per lookup would cost more than some statistics; a rewritten
    file changes its mtime (nanoseconds) and usually its size, which is what invalidates.
    """
    path = Path(model_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            f
            for f in path.iterdir()
            if f.is_file()
            and (f.name.endswith(_MODEL_FILE_SUFFIXES) or f.name in _MODEL_FILE_NAMES)
        )
    else:
        raise ConfigError(f"model path {path} does not exist; give the model folder")
    if not any(f.name.endswith(_MODEL_FILE_SUFFIXES) for f in files):
        raise ConfigError(
            f"{path} holds no weight files (*.safetensors, *.bin); give the model folder"
        )
    parts = []
    for f in files:
        st = f.stat()
        parts.append([f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def split_fingerprint(split: EncodedSplit) -> str:
    """Content hash of an encoded split, for use in ``split_name`` when its origin is unclear."""
    h = hashlib.sha256()
    for t in (split.input_ids, split.attention_mask, split.labels):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_key(kind: str, model_path: Path, split_name: str, settings: Mapping[str, Any]) -> str:
    return json.dumps(
        {
            "version": CACHE_VERSION,
            "kind": kind,
            "model": model_fingerprint(model_path),
            "split": split_name,
            "settings": dict(settings),
        },
        sort_keys=True,
        default=str,
    )


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write next to ``file`` and rename over it, so readers never see half a file."""
    seen: set[int] = set()
    clean = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        clean[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=metadata)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_statistics(
    kind: str,
    model_path: str | os.PathLike,
    split_name: str,
    compute: Callable[[], Mapping[str, torch.Tensor]],
    cache_dir: str | os.PathLike,
    *,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one model, from ``cache_dir`` if present, else ``compute()`` and store.

    The file is keyed by ``kind``, the model's files (``model_fingerprint``), ``split_name``
    (name it so different data gets different names, e.g. ``"books/dev"`` or with
    ``split_fingerprint``) and ``settings`` (anything that changes the result: mode,
    n_examples). A cache file that cannot be read is recomputed with a warning.
    """
    if kind not in STAT_KINDS:
        raise ConfigError(f"statistics kind {kind!r} is unknown; use one of {list(STAT_KINDS)}")
    cache_dir = Path(cache_dir)
    key = _cache_key(kind, Path(model_path), split_name, settings or {})
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    file = cache_dir / f"{kind}-{digest}.safetensors"
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                # The full key guards against a (very unlikely) digest collision.
                if (f.metadata() or {}).get("key") != key:
                    raise EvorayError("its key does not match")
                cached = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            log.debug("statistics %s for %s loaded from %s", kind, model_path, file)
            return cached
        except Exception as e:  # corrupt or foreign file: recompute rather than crash
            log.warning("statistics cache %s is unreadable (%s); recomputing", file, e)
    result = compute()
    if not isinstance(result, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in result.values()
    ):
        raise EvorayError(
            f"computing {kind} statistics returned {type(result).__name__}, not tensors"
        )
    out = {k: v.detach().cpu() for k, v in result.items()}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(out, file, {"key": key})
    except OSError as e:
        log.warning("could not write statistics cache %s (%s); continuing without it", file, e)
    return out
