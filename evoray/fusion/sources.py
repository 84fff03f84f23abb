"""Source-model distributions for FuseLLM: top-k logits per sequence, Parquet shards, Ray actors.

Each source model runs once over the corpus; per sequence it keeps the token strings, the top-k
logits (float32) and their ids (int32) at every position, and the per-token CE against the
gold next token.  Sequences are never padded: batches group sequences of identical length.
Shards store one row per sequence with flat ``list<float32>`` / ``list<int32>`` columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from evoray.fusion import FusionError
from evoray.fusion.distill import per_token_ce, topk_logits

SHARD_NAME = "shard-00000.parquet"


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


@torch.no_grad()
def source_distributions(
    model, tokenizer, texts: Sequence[str], k: int = 10, *, batch_size: int = 16
) -> list[dict]:
    """Per text, in order: ``text``, ``tokens`` (strings), ``input_ids`` (int32 [seq]),
    ``values`` (float32 [seq, k]), ``indices`` (int32 [seq, k]), ``ce`` (float32 [seq - 1])
    and ``mean_ce``.  Top-k is taken on the model's device; batches only hold equal lengths."""
    if not texts:
        raise FusionError("no texts to extract source distributions from")
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_ids(tokenizer, t) for t in texts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    rows: list[dict | None] = [None] * len(texts)
    for length in sorted(by_len):
        members = by_len[length]
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits
            for b, i in enumerate(chunk):
                values, indices = topk_logits(logits[b], k)
                ce = per_token_ce(logits[b], ids[b])
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


def read_shards(directory: str | Path) -> list[dict]:
    """All rows of ``directory/shard-*.parquet`` in shard order, arrays reshaped to [seq, k]."""
    files = sorted(Path(directory).glob("shard-*.parquet"))
    if not files:
        raise FusionError(f"no shard-*.parquet files in {directory}")
    rows = []
    for f in files:
        for r in pq.read_table(f).to_pylist():
            k = r["k"]
            rows.append(
                {
                    "text": r["text"],
                    "tokens": r["tokens"],
                    "input_ids": np.asarray(r["input_ids"], dtype=np.int32),
                    "values": np.asarray(r["values"], dtype=np.float32).reshape(-1, k),
                    "indices": np.asarray(r["indices"], dtype=np.int32).reshape(-1, k),
                    "ce": np.asarray(r["ce"], dtype=np.float32),
                    "mean_ce": r["mean_ce"],
                }
            )
    return rows


class SourceWorker:
    """One source model: loads it once and writes its distributions for a list of texts.
    A plain class; wrap with ``ray.remote(SourceWorker)`` to run it as an actor."""

    def __init__(self, model_path: str | Path, k: int = 10, device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evoray.fusion.remote import quiet_transformers

        quiet_transformers()
        torch.set_num_threads(1)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path)).to(self.device).eval()
        self.k = k

    def run(self, texts: Sequence[str], out_path: str | Path) -> str:
        rows = source_distributions(self.model, self.tokenizer, list(texts), self.k)
        return str(write_shard(rows, out_path))


def extract_all(
    sources: Sequence[str | Path],
    texts: Sequence[str],
    out_dir: str | Path,
    k: int = 10,
    use_ray: bool = True,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> list[Path]:
    """Write ``out_dir/source_<i>/shard-00000.parquet`` for every source model path; returns the
    per-source folders.  With ``use_ray`` and Ray initialised, one actor per source reserving
    ``num_cpus``/``num_gpus`` (each is killed when done, so more sources than GPUs queue instead
    of waiting forever); else in-process."""
    if not texts:
        raise FusionError("no texts to extract source distributions from")
    if not sources:
        raise FusionError("no source models given")
    out_dir = Path(out_dir)
    dirs = [out_dir / f"source_{i}" for i in range(len(sources))]
    texts = list(texts)
    import ray

    if use_ray and ray.is_initialized():
        from evoray.fusion.remote import check_capacity

        check_capacity(num_cpus, num_gpus)
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(SourceWorker)
        pending = {}
        for src, d in zip(sources, dirs, strict=True):
            actor = actor_cls.remote(str(src), k)
            pending[actor.run.remote(texts, str(d / SHARD_NAME))] = actor
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ray.get(done[0])
            ray.kill(pending.pop(done[0]))
    else:
        for src, d in zip(sources, dirs, strict=True):
            SourceWorker(src, k).run(texts, d / SHARD_NAME)
    return dirs
