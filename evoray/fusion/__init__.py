"""FuseLLM knowledge fusion (Wan et al., ICLR 2024, arXiv 2401.10491).

Several *source* LLMs with different tokenizers teach one *target* model.  Data flows:
``corpus`` (texts, tokenizers, tiny LMs) -> ``sources`` (each source's top-k logits and CE,
Parquet shards) -> ``align`` + ``distill`` (pure math: token/vocab alignment, MinCE / AvgCE,
the sparse loss ``lam * CLM + (1 - lam) * fusion``; no Ray, no disk) -> ``teachers`` (fused
teachers in a memory-mapped store, built by ``teacher_build``, reported on by
``alignment_report``) -> ``batches`` + ``data_parallel`` + ``train`` (the training loops) ->
``remote`` (Ray tasks,
Ray Train) -> ``fuse_config`` + ``fuse_cli`` (``evoray fuse``).  The math re-exported here
loads on first use.
"""

from evoray.errors import EvorayError


class FusionError(EvorayError, ValueError):
    """Fusion inputs cannot be used: empty vocab/sequence, unalignable tokenizers, bad shapes."""


_EXPORTS = {
    "align_sequences": "align",
    "normalize_token": "align",
    "vocab_map": "align",
    "fuse_avg_ce": "distill",
    "fuse_min_ce": "distill",
    "fusellm_loss": "distill",
    "fusion_loss": "distill",
    "map_to_target": "distill",
    "mean_ce": "distill",
    "per_token_ce": "distill",
    "topk_logits": "distill",
}


def __getattr__(name: str):
    """Re-exports load on first use, so ``evoray --help`` does not import torch."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"evoray.fusion.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'evoray.fusion' has no attribute {name!r}")


__all__ = [
    "FusionError",
    "align_sequences",
    "fuse_avg_ce",
    "fuse_min_ce",
    "fusellm_loss",
    "fusion_loss",
    "map_to_target",
    "mean_ce",
    "normalize_token",
    "per_token_ce",
    "topk_logits",
    "vocab_map",
]
