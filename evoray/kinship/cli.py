"""``evoray kinship BASE M1 M2 [M3 ...]``: pairwise model kinship tables, heatmap and JSON.

Kept out of ``cli.py`` so the command's options live next to its code; ``cli.build_parser``
registers it with ``add_kinship_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from evoray.errors import EvorayError

# Start a local Ray for the CLI only when the reading is long enough to repay its start-up
# (a few seconds); an already running Ray (RAY_ADDRESS) is used for any size.
AUTO_PARALLEL_BYTES = 2 * 10**9


def add_kinship_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``kinship`` subcommand on an ``add_subparsers()`` object."""
    k = subparsers.add_parser(
        "kinship",
        help="pairwise kinship of fine-tunes of one base (Pearson, cosine, Euclidean)",
        description=(
            "Model kinship (Hu et al. 2024) of every pair of models: similarity of their weight "
            "deltas from BASE, computed exactly in one streaming pass over the checkpoints."
        ),
    )
    k.add_argument("base", help="base model: folder, .safetensors file or hub id")
    k.add_argument("models", nargs="+", help="two or more models fine-tuned from BASE")
    k.add_argument(
        "--metric",
        choices=["pearson", "cosine", "euclidean", "all"],
        default="all",
        help="metric(s) to print and plot (default: all)",
    )
    k.add_argument(
        "--per-layer",
        action="store_true",
        help="also print values per transformer block (plus embeddings and head)",
    )
    k.add_argument(
        "--png",
        type=Path,
        default=Path("kinship.png"),
        help="heatmap to write (default: kinship.png in the current folder)",
    )
    k.add_argument("--json", type=Path, default=None, help="also write all values as JSON")
    k.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle (.bin/.pt) weights; only for checkpoints you trust",
    )
    k.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="compare models whose weights hold NaN or Inf (their values print as nan); "
        "refused by default",
    )
    k.add_argument(
        "--no-parallel",
        action="store_true",
        help="read in this process only; by default Ray tasks read groups of tensors in parallel "
        "when Ray is running (RAY_ADDRESS) or the checkpoints total over 2 GB",
    )
    k.set_defaults(func=_cmd_kinship)
    return k


def _parallel_mode(args: argparse.Namespace) -> bool | None:
    if args.no_parallel:
        return False
    if os.environ.get("RAY_ADDRESS"):
        return True
    from evoray.weights.checkpoint import open_checkpoint

    total = 0
    for src in [args.base, *args.models]:
        with open_checkpoint(src, allow_pickle=args.allow_pickle) as ckpt:
            total += ckpt.nbytes
    return True if total >= AUTO_PARALLEL_BYTES and (os.cpu_count() or 1) > 1 else None


def _cmd_kinship(args: argparse.Namespace) -> int:
    """Print the kinship table(s), write the heatmap (and JSON); 0 on success."""
    from evoray.kinship.gram import METRICS
    from evoray.kinship.matrix import kinship_matrix
    from evoray.kinship.plot import heatmap

    if len(args.models) < 2:
        raise EvorayError(
            f"give at least two models besides the base (got {len(args.models)}): "
            "evoray kinship BASE M1 M2 [M3 ...]"
        )
    metrics = list(METRICS) if args.metric == "all" else [args.metric]
    result = kinship_matrix(
        args.base,
        args.models,
        metrics=metrics,
        per_layer=args.per_layer,
        allow_pickle=args.allow_pickle,
        parallel=_parallel_mode(args),
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"{len(args.models)} models, {result.n_elements:,} floating weights each\n")
    for m in metrics:
        print(result.format_table(m))
        print()
        if args.per_layer:
            print(result.format_layer_table(m))
            print()
    try:
        png = heatmap(result, metrics, args.png)
    except OSError as e:
        raise _write_error(args.png, e, "heatmap (--png)") from e
    except ValueError as e:  # matplotlib: "Format 'x' is not supported (supported formats: ...)"
        if "not supported" not in str(e):
            raise
        raise _write_error(args.png, e, "heatmap (--png)") from e
    print(f"heatmap written to {png.resolve()}")
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        except OSError as e:
            raise _write_error(args.json, e, "values (--json)") from e
        print(f"values written to {args.json.resolve()}")
    return 0


def _write_error(path: Path, exc: Exception, what: str) -> EvorayError:
    """One line naming the output file and what to do (full disk, unwritable, bad suffix)."""
    if isinstance(exc, ValueError):
        return EvorayError(
            f"cannot write the {what} {path}: {exc}; give a file name ending in .png, .pdf or .svg"
        )
    from evoray.weights.output_folder import write_error

    return EvorayError(f"cannot write the {what}: {write_error(path, exc)}")
