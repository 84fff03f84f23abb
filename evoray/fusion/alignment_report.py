"""How well each source aligned to the target: shares of positions aligned and kept, and of
the vocabularies matched exactly, reported after ``build_teachers``.

Its own module because a weak alignment silently teaches little: the report is what tells a
user that a source's tokenizer is too far from the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evoray.fusion.sources import (
    load_tokenizer,
)


def alignment_quality(tgt_tok, source_paths: Sequence[str | Path], counts: dict) -> dict:
    """Shares from ``alignment_counts`` plus each source's ``vocab_match_shares``."""

    from evoray.fusion.align import vocab_match_shares
    from evoray.weights.sources import resolve_model_folder

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


def report_alignment(
    quality: dict,
    source_paths: Sequence[str | Path],
    positions: str,
    min_vocab_share: float,
    report=None,
) -> None:
    """Say ``alignment_quality`` per source through ``report``; a source that covers less than
    ``min_vocab_share`` of the target's vocabulary is a warning (``report``, else ``warnings``,
    attributed to ``build_teachers``'s caller)."""
    say = report or (lambda _msg: None)
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

                warnings.warn(msg, stacklevel=3)
    say(f"  positions with a fused teacher: {quality['teacher_share']:.1%} of target positions")
