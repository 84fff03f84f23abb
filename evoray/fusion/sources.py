"""Source-model distributions for FuseLLM: top-k logits per sequence, Parquet shards, Ray actors.

Each source model runs once over the corpus; per sequence it keeps the token strings, the top-k
logits (float32) and their ids (int32) at every position, and the per-token CE against the
gold next token.  Batches group sequences of neighbouring lengths (``length_batches``), with
bounded padding.
Shards store one row per sequence with flat ``list<float32>`` / ``list<int32>`` columns.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from evoray.fusion import FusionError
from evoray.fusion.distill import per_token_ce, topk_logits

SHARD_NAME = "shard-00000.parquet"  # the first shard of a source


_FLAG_NOTES = {
    "--allow-pickle": (
        "evoray fuse reads safetensors weights only (it does not load pickle): if you trust "
        "the checkpoint, load it with transformers and save it again with "
        "save_pretrained(folder, safe_serialization=True)."
    ),
    "--trust-remote-code": (
        "evoray fuse does not run a model's own Python code: use a model whose architecture "
        "transformers supports natively."
    ),
}


@contextlib.contextmanager
def fuse_checkpoint_errors() -> Iterator[None]:
    """Checkpoint errors as ``evoray fuse`` can act on them: the checkpoint module's hints name
    flags of other commands (``--allow-pickle``, ``--trust-remote-code``) that ``evoray fuse``
    lacks; those sentences are replaced by what to do instead."""
    from evoray.errors import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        text = str(exc)
        flags = [f for f in _FLAG_NOTES if f in text]
        if not flags:
            raise
        text = text.replace(" or (with --allow-pickle) a .bin/.pt/.pth file", "")
        kept = [s for s in re.split(r"(?<=\.) ", text) if not any(f in s for f in flags)]
        raise CheckpointError(" ".join([*kept, *(_FLAG_NOTES[f] for f in flags)])) from None


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in a model folder; a FusionError naming the folder and the files
    looked for when there is none (fusion aligns the models' token strings, so every source
    and the target need their own tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FusionError(
            f"model folder {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "fusion aligns each model's own tokens, so save the model's tokenizer there with "
            "tokenizer.save_pretrained(folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FusionError(
            f"cannot load the tokenizer of model folder {folder} ({type(exc).__name__}: {exc}); "
            "save a complete tokenizer there with tokenizer.save_pretrained(folder)"
        ) from None


def load_lm(path: str | Path):
    """``(causal LM, tokenizer)`` from a folder or hub id, through evoray's checkpoint checks
    (missing path, pickle-only weights, custom code, a missing tokenizer are clear errors, not
    tracebacks)."""
    from transformers import AutoModelForCausalLM

    from evoray.weights.loading import load_model
    from evoray.weights.sources import resolve_model_folder

    with fuse_checkpoint_errors():
        folder = resolve_model_folder(path)  # once: a hub id is looked up a single time
        tok = load_tokenizer(folder)  # before the weights: the cheaper check first
        model = load_model(folder, model_cls=AutoModelForCausalLM)
    return model, tok


def encode_ids(tokenizer, text: str) -> list[int]:
    """``<bos> text <eos>`` ids; FusionError if the tokenizer lacks bos or eos."""
    for name in ("bos", "eos"):
        if getattr(tokenizer, f"{name}_token_id") is None:
            raise FusionError(
                f"the tokenizer has no {name} token; fusion wraps each sequence in bos/eos "
                f"(set {name}_token when saving the tokenizer)"
            )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def model_name(model) -> str:
    """Where a model was loaded from, for messages ('model' if unknown)."""
    return getattr(getattr(model, "config", None), "name_or_path", "") or "model"


def check_fits(model, sequences: Sequence[Sequence[int]], who: str) -> None:
    """FusionError naming the text when a ``<bos> text <eos>`` sequence is longer than the
    model's positions (it would crash or silently wrap inside the model)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not sequences or not isinstance(limit, int):
        return
    lengths = [len(s) for s in sequences]
    longest = max(lengths)
    if longest > limit:
        raise FusionError(
            f"{who}: text {lengths.index(longest)} is {longest} tokens with bos/eos, over the "
            f"model's {limit} positions (max_position_embeddings); split long texts, e.g. into "
            "paragraphs, before fusing"
        )


def length_batches(
    lengths: Sequence[int], batch_size: int = 16, max_pad: float = 0.2
) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` texts of neighbouring lengths
    (sorted), a batch closed when right-padding to its longest text would make more than
    ``max_pad`` of its tokens padding (0: only equal lengths share a batch).  Sorting keeps
    padding small on real corpora, where few texts have exactly the same length."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        trial = [*current, i]
        width = lengths[i]  # sorted: the newest is the longest
        pad = width * len(trial) - sum(lengths[j] for j in trial)
        if current and (len(trial) > batch_size or pad > max_pad * width * len(trial)):
            batches.append(current)
            trial = [i]
        current = trial
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def source_distributions(
    model, tokenizer, texts: Sequence[str], k: int = 10, *, batch_size: int = 16,
    max_pad: float = 0.2,
) -> list[dict]:  # fmt: skip
    """Per text, in order: ``text``, ``tokens`` (strings), ``input_ids`` (int32 [seq]),
    ``values`` (float32 [seq, k]), ``indices`` (int32 [seq, k]), ``ce`` (float32 [seq - 1])
    and ``mean_ce``.  Top-k is taken on the model's device.  Texts are batched by length
    (``length_batches``: right padding under an attention mask, at most ``max_pad`` of a
    batch's tokens); only each text's own positions are kept."""
    if not texts:
        raise FusionError("no texts to extract source distributions from")
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_ids(tokenizer, t) for t in texts]
    check_fits(model, encoded, f"source {model_name(model)}")
    rows: list[dict | None] = [None] * len(texts)
    for chunk in length_batches([len(e) for e in encoded], batch_size, max_pad):
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, i in enumerate(chunk):
            ids[b, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[b, : len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        logits = model(input_ids=ids, attention_mask=mask if padded else None).logits
        for b, i in enumerate(chunk):
            n = len(encoded[i])
            values, indices = topk_logits(logits[b, :n], k)
            ce = per_token_ce(logits[b, :n], ids[b, :n])
            rows[i] = {
                "text": texts[i],
                "tokens": tokenizer.convert_ids_to_tokens(encoded[i]),
                "input_ids": np.asarray(encoded[i], dtype=np.int32),
                "values": values.cpu().numpy().astype(np.float32),
                "indices": indices.cpu().numpy().astype(np.int32),
                "ce": ce.float().cpu().numpy(),
                "mean_ce": float(ce.double().mean()),
            }
    return rows  # type: ignore[return-value]


_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("input_ids", pa.list_(pa.int32())),
        ("k", pa.int32()),
        ("values", pa.list_(pa.float32())),
        ("indices", pa.list_(pa.int32())),
        ("ce", pa.list_(pa.float32())),
        ("mean_ce", pa.float64()),
    ]
)


def write_shard(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows from ``source_distributions`` to one Parquet file, atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = {name: [] for name in _SCHEMA.names}
    for r in rows:
        values = np.asarray(r["values"], dtype=np.float32)
        indices = np.asarray(r["indices"], dtype=np.int32)
        if values.shape != indices.shape or values.ndim != 2:
            raise FusionError(f"values {values.shape} / indices {indices.shape} must be [seq, k]")
        cols["text"].append(r["text"])
        cols["tokens"].append(list(r["tokens"]))
        cols["input_ids"].append(np.asarray(r["input_ids"], dtype=np.int32))
        cols["k"].append(values.shape[1])
        cols["values"].append(values.reshape(-1))
        cols["indices"].append(indices.reshape(-1))
        cols["ce"].append(np.asarray(r["ce"], dtype=np.float32))
        cols["mean_ce"].append(float(r["mean_ce"]))
    table = pa.table(cols, schema=_SCHEMA)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def iter_source_rows(
    directory: str | Path, start: int = 0, stop: int | None = None
) -> Iterator[dict]:
    """Rows ``start:stop`` of ``directory/shard-*.parquet`` in shard order, arrays reshaped to
    [seq, k], with one shard in memory at a time (shards before ``start`` are skipped by their
    row counts, unread)."""
    files = sorted(Path(directory).glob("shard-*.parquet"))
    if not files:
        raise FusionError(f"no shard-*.parquet files in {directory}")
    offset = 0
    for f in files:
        if stop is not None and offset >= stop:
            return
        n = pq.ParquetFile(f).metadata.num_rows
        if offset + n <= start:
            offset += n
            continue
        lo, hi = max(0, start - offset), n if stop is None else min(n, stop - offset)
        offset += n
        for r in pq.read_table(f).slice(lo, hi - lo).to_pylist():
            k = r["k"]
            yield {
                "text": r["text"],
                "tokens": r["tokens"],
                "input_ids": np.asarray(r["input_ids"], dtype=np.int32),
                "values": np.asarray(r["values"], dtype=np.float32).reshape(-1, k),
                "indices": np.asarray(r["indices"], dtype=np.int32).reshape(-1, k),
                "ce": np.asarray(r["ce"], dtype=np.float32),
                "mean_ce": r["mean_ce"],
            }


def read_shards(directory: str | Path) -> list[dict]:
    """All rows of ``directory/shard-*.parquet`` in shard order (``iter_source_rows``)."""
    return list(iter_source_rows(directory))


class SourceWorker:
    """One source model: loads it once and writes its distributions for a list of texts.
    A plain class; wrap with ``ray.remote(SourceWorker)`` to run it as an actor."""

    def __init__(self, model_path: str | Path, k: int = 10, device: str | None = None) -> None:
        from evoray.fusion.remote import quiet_transformers

        quiet_transformers()
        torch.set_num_threads(1)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tokenizer = load_lm(model_path)
        self.model = model.to(self.device).eval()
        self.k = k

    def run(self, texts: Sequence[str], out_path: str | Path) -> str:
        rows = source_distributions(self.model, self.tokenizer, list(texts), self.k)
        return str(write_shard(rows, out_path))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _complete_shard(path: Path, texts: Sequence[str]) -> bool:
    """Whether ``path`` is a finished shard of exactly ``texts`` (shards are written atomically,
    so a present file is whole; the text check catches a shard of another corpus)."""
    if not path.is_file():
        return False
    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist() == list(texts)
    except (OSError, pa.ArrowException):
        return False


def extract_all(
    sources: Sequence[str | Path],
    texts: Sequence[str],
    out_dir: str | Path,
    k: int = 10,
    use_ray: bool = True,
    num_cpus: float = 1,
    num_gpus: float = 0,
    *,
    shard_size: int = 2048,
    workers_per_source: int = 1,
    report=None,
) -> list[Path]:
    """Write ``out_dir/source_<i>/shard-NNNNN.parquet`` (``shard_size`` texts each, in order)
    for every source model path; returns the per-source folders.

    Shards already there for the same texts are kept, so a crashed extraction resumes where it
    stopped; stale shards of a longer corpus are removed.  With ``use_ray`` and Ray initialised
    each source gets ``workers_per_source`` actors reserving ``num_cpus``/``num_gpus`` that share
    its shards (a source's actors are killed when it is done, so more sources than GPUs queue
    instead of waiting forever); else one model per source runs here.  ``report`` (a callable)
    hears one line per finished shard.
    """
    if not texts:
        raise FusionError("no texts to extract source distributions from")
    if not sources:
        raise FusionError("no source models given")
    if shard_size < 1 or workers_per_source < 1:
        raise FusionError("shard_size and workers_per_source must be >= 1")
    out_dir = Path(out_dir)
    dirs = [out_dir / f"source_{i}" for i in range(len(sources))]
    texts = list(texts)
    chunks = [texts[i : i + shard_size] for i in range(0, len(texts), shard_size)]
    todo: list[list[int]] = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("shard-*.parquet"):
            if stale.name not in {shard_name(c) for c in range(len(chunks))}:
                stale.unlink()
        todo.append(
            [c for c in range(len(chunks)) if not _complete_shard(d / shard_name(c), chunks[c])]
        )
    say = report or (lambda _msg: None)
    import ray

    if use_ray and ray.is_initialized():
        _extract_on_ray(sources, dirs, chunks, todo, k, num_cpus, num_gpus, workers_per_source, say)
    else:
        for i, (src, d) in enumerate(zip(sources, dirs, strict=True)):
            if not todo[i]:
                continue
            worker = SourceWorker(src, k)
            for c in todo[i]:
                worker.run(chunks[c], d / shard_name(c))
                say(f"  source {i}: {shard_name(c)} ({len(chunks[c])} texts)")
    return dirs


def _extract_on_ray(sources, dirs, chunks, todo, k, num_cpus, num_gpus, per_source, say) -> None:
    import ray

    from evoray.errors import ray_get
    from evoray.fusion.remote import check_capacity

    check_capacity(num_cpus, num_gpus)
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(SourceWorker)
    queues = {i: list(todo[i]) for i in range(len(sources)) if todo[i]}
    actors = {
        i: [actor_cls.remote(str(sources[i]), k) for _ in range(min(per_source, len(q)))]
        for i, q in queues.items()
    }
    pending: dict = {}

    def feed(i: int, actor) -> None:
        c = queues[i].pop(0)
        pending[actor.run.remote(chunks[c], str(dirs[i] / shard_name(c)))] = (i, actor, c)

    for i, group in actors.items():
        for actor in group:
            feed(i, actor)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i, actor, c = pending.pop(done[0])
        ray_get(done[0])
        say(f"  source {i}: {shard_name(c)} ({len(chunks[c])} texts)")
        if queues[i]:
            feed(i, actor)
        elif not any(j == i for j, _, _ in pending.values()):
            for a in actors[i]:
                ray.kill(a)
