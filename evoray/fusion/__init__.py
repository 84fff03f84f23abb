"""FuseLLM knowledge fusion (Wan et al., ICLR 2024, arXiv 2401.10491): pure, testable math.

Several *source* LLMs with different tokenizers teach one *target* model.  ``align`` maps the
sources' tokens and sequence positions onto the target's; ``distill`` keeps each source's top-k
next-token logits, fuses sources per sequence (MinCE / AvgCE) and computes the sparse fusion loss
``lam * CLM + (1 - lam) * fusion``.  Nothing here uses Ray or touches disk.
"""

from evoray.errors import EvorayError


class FusionError(EvorayError, ValueError):
    """Fusion inputs cannot be used: empty vocab/sequence, unalignable tokenizers, bad shapes."""


from evoray.fusion.align import align_sequences, normalize_token, vocab_map  # noqa: E402
from evoray.fusion.distill import (  # noqa: E402
    fuse_avg_ce,
    fuse_min_ce,
    fusellm_loss,
    fusion_loss,
    map_to_target,
    mean_ce,
    per_token_ce,
    topk_logits,
)

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
