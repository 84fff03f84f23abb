"""``evoray fuse CONFIG.yml``: FuseLLM end to end on tiny offline models.

Builds (``build: true``) a generated corpus, source LMs with different tokenizers and a target
LM, extracts the sources' top-k distributions (one Ray actor per source when Ray is running and
``use_ray`` is set), then trains the target twice from the same start: plain CLM and FuseLLM
(same steps, same batches), and prints held-out perplexities.  ``cli.build_parser`` registers
it with ``add_fuse_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evoray.fusion import FusionError

_SOURCE_DEFAULTS = {"tokenizer": "bpe", "vocab_size": 200, "hidden": 48, "layers": 2}
_SOURCE_DEFAULTS.update({"steps": 200, "lr": 3e-3, "seed": 1})
_TARGET_DEFAULTS = {"tokenizer": "bpe", "vocab_size": 120, "hidden": 32, "layers": 2}
_TARGET_DEFAULTS.update({"steps": 0, "lr": 3e-3, "seed": 0})
_FUSION_DEFAULTS = {"method": "avg_ce", "lam": 0.9, "kind": "ce", "k": 10, "steps": 100}
_FUSION_DEFAULTS.update({"lr": 3e-3, "batch_size": 8, "seed": 0})


def add_fuse_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``fuse`` subcommand on an ``add_subparsers()`` object."""
    f = subparsers.add_parser(
        "fuse",
        help="FuseLLM: fuse source LMs with different tokenizers into a target LM",
        description=(
            "Knowledge fusion (Wan et al., ICLR 2024): train a target LM on the fused top-k "
            "distributions of source LMs, and compare with plain CLM training."
        ),
    )
    f.add_argument("config", help="e.g. search_spaces/fusellm.yaml")
    f.add_argument("--out", type=Path, default=None, help="override output_dir of the config")
    f.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    f.set_defaults(func=_cmd_fuse)
    return f


def _tokenizer(spec: dict, texts: list[str]):
    from evoray.fusion.corpus import build_bpe_tokenizer, build_char_tokenizer

    if spec["tokenizer"] == "char":
        return build_char_tokenizer(texts)
    if spec["tokenizer"] == "bpe":
        return build_bpe_tokenizer(texts, int(spec["vocab_size"]))
    raise FusionError(f"tokenizer must be 'char' or 'bpe', got {spec['tokenizer']!r}")


def _build_model(spec: dict, train: list[str], path: Path) -> Path:
    """Build tokenizer + tiny LM, save, then train it ``steps`` CLM steps (in place)."""
    from evoray.fusion.corpus import make_tiny_lm
    from evoray.fusion.train import clm_train

    tok = _tokenizer(spec, train)
    model = make_tiny_lm(tok, int(spec["seed"]), int(spec["hidden"]), int(spec["layers"]))
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    if int(spec["steps"]) > 0:
        clm_train(
            path,
            train,
            steps=int(spec["steps"]),
            lr=float(spec["lr"]),
            seed=int(spec["seed"]),
            out_dir=path,
        )
    return path


def run_fuse(config: dict, out: Path | None = None, report=print) -> dict:
    """Run the whole experiment described by ``config``; returns the perplexities."""
    from evoray.fusion.corpus import make_corpus
    from evoray.fusion.sources import extract_all
    from evoray.fusion.train import clm_train, fuse_train, heldout_perplexity

    corpus = config.get("corpus", {})
    train, heldout = make_corpus(
        int(corpus.get("seed", 0)),
        int(corpus.get("n_train", 400)),
        int(corpus.get("n_heldout", 100)),
    )
    if not train or not heldout:
        raise FusionError("the corpus needs n_train > 0 and n_heldout > 0")
    out = Path(out or config.get("output_dir", "runs/fusellm"))
    build = bool(config.get("build", True))
    sources = config.get("sources") or []
    if not sources:
        raise FusionError("the config lists no sources")
    src_paths, names = [], []
    for i, raw in enumerate(sources):
        spec = {**_SOURCE_DEFAULTS, **raw}
        name = str(spec.get("name", f"source_{i}"))
        if build and "path" not in spec:
            report(f"building source {name} ({spec['tokenizer']}) ...")
            src_paths.append(_build_model(spec, train, out / "sources" / name))
        elif "path" in spec:
            src_paths.append(Path(spec["path"]))
        else:
            raise FusionError(f"source {name} has no path and build is false")
        names.append(name)
    tspec = {**_TARGET_DEFAULTS, **config.get("target", {})}
    if build and "path" not in tspec:
        report("building target ...")
        target = _build_model(tspec, train, out / "target_init")
    elif "path" in tspec:
        target = Path(tspec["path"])
    else:
        raise FusionError("the target has no path and build is false")
    fz = {**_FUSION_DEFAULTS, **config.get("fusion", {})}
    use_ray = bool(config.get("use_ray", False))
    report("extracting source distributions ...")
    dist_dirs = extract_all(src_paths, train, out / "distributions", int(fz["k"]), use_ray)
    common = {
        "steps": int(fz["steps"]),
        "lr": float(fz["lr"]),
        "seed": int(fz["seed"]),
        "batch_size": int(fz["batch_size"]),
    }
    report("training target: plain CLM ...")
    clm_train(target, train, out_dir=out / "target_clm", **common)
    report(f"training target: FuseLLM ({fz['method']}, lam={fz['lam']}) ...")
    fuse_train(
        target,
        src_paths,
        train,
        method=str(fz["method"]),
        lam=float(fz["lam"]),
        kind=str(fz["kind"]),
        k=int(fz["k"]),
        out_dir=out / "target_fused",
        dist_dirs=dist_dirs,
        **common,
    )
    result = {
        "sources": {
            n: heldout_perplexity(p, heldout) for n, p in zip(names, src_paths, strict=True)
        },
        "target_before": heldout_perplexity(target, heldout),
        "target_clm": heldout_perplexity(out / "target_clm", heldout),
        "target_fused": heldout_perplexity(out / "target_fused", heldout),
    }
    report("")
    report(f"{'model':<28} {'held-out perplexity':>20}")
    for n, ppl in result["sources"].items():
        report(f"{'source ' + n:<28} {ppl:>20.3f}")
    report(f"{'target before training':<28} {result['target_before']:>20.3f}")
    report(f"{'target after CLM':<28} {result['target_clm']:>20.3f}")
    report(f"{'target after FuseLLM':<28} {result['target_fused']:>20.3f}")
    report("(source perplexities are per token of their own tokenizers: not comparable)")
    return result


def _cmd_fuse(args: argparse.Namespace) -> int:
    import torch
    import yaml

    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    path = Path(args.config)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FusionError(f"cannot read fuse config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise FusionError(f"fuse config {path} must be a mapping")
    result = run_fuse(config, getattr(args, "out", None))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
