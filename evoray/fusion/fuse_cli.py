"""``evoray fuse CONFIG.yml``: FuseLLM end to end on tiny offline models.

Builds a generated corpus, source LMs with different tokenizers and a target LM (those without
a ``path``), extracts the sources' top-k distributions, then trains the target twice from the
same start: plain CLM and FuseLLM (same steps, same batches), and prints held-out perplexities.
With ``use_ray`` every build, extraction and training is a Ray task reserving ``resources``
(``num_gpus: 1`` puts each on its own GPU).  ``cli.build_parser`` registers it with
``add_fuse_parser(sub)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evoray.errors import ConfigError

if TYPE_CHECKING:
    from evoray.fusion.fuse_config import FuseConfig, ModelSpec


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
    f.add_argument(
        "--address", default=None, help="Ray address for use_ray (default: RAY_ADDRESS or local)"
    )
    f.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (use_ray)")
    f.add_argument(
        "--use-ray", action="store_true", help="override use_ray: true (run every step on Ray)"
    )
    f.add_argument(
        "--no-dashboard",
        action="store_true",
        help="with use_ray: start a local Ray without its dashboard (default: on, at 127.0.0.1)",
    )
    f.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="override resources.num_gpus (e.g. 1: each source and each training on a GPU)",
    )
    f.set_defaults(func=_cmd_fuse)
    return f


def _tokenizer(spec: ModelSpec, texts: list[str]):
    from evoray.fusion.corpus import (
        build_bpe_tokenizer,
        build_bytelevel_tokenizer,
        build_char_tokenizer,
    )

    if spec.tokenizer == "char":
        return build_char_tokenizer(texts)
    if spec.tokenizer == "bytelevel":
        return build_bytelevel_tokenizer(texts, spec.vocab_size)
    return build_bpe_tokenizer(texts, spec.vocab_size)


def build_model(spec: ModelSpec, texts: list[str], path: str | Path) -> dict:
    """Build ``spec``'s tokenizer + tiny LM on ``texts``, save it to ``path``, then train it
    ``spec.steps`` CLM steps in place.  A job for ``run_jobs`` (returns a dict).  A folder
    already at ``path`` is replaced whole: no file of an earlier build is mixed in."""
    from evoray.fusion.corpus import make_tiny_lm
    from evoray.fusion.train import clm_train, save_model

    tok = _tokenizer(spec, texts)
    model = make_tiny_lm(tok, spec.seed, spec.hidden, spec.layers, spec.arch)
    path = save_model(model, tok, path, carry_over=False)
    if spec.steps > 0:
        clm_train(path, texts, steps=spec.steps, lr=spec.lr, seed=spec.seed, out_dir=path)
    return {"out_dir": path}


def build_texts(spec: ModelSpec, train: list[str], heldout: list[str]) -> list[str]:
    """What a built model learns from: its own ``domain``'s generated text, else ``train``."""
    if spec.domain is None:
        return train
    from evoray.fusion.corpus import source_texts

    return source_texts(spec.domain, spec.texts or 2000, spec.seed, heldout)


def run_fuse(cfg: FuseConfig, out: Path | None = None, report=print) -> dict:
    """Run the whole experiment described by ``cfg``; returns the perplexities.

    With ``cfg.use_ray`` (Ray initialised by the caller) building the models, extracting the
    sources' distributions and the two target trainings each run as Ray tasks with
    ``cfg.resources``; else everything runs here, one step after the other.
    """
    from evoray.fusion.batches import drop_short_texts
    from evoray.fusion.corpus import load_corpus
    from evoray.fusion.remote import run_data_parallel, run_jobs
    from evoray.fusion.sources import extract_all, fuse_checkpoint_errors, load_tokenizer
    from evoray.fusion.teacher_build import build_teachers
    from evoray.fusion.train import clm_train, fuse_train, perplexity_job
    from evoray.weights.sources import resolve_model_folder

    res, fz = cfg.resources, cfg.fusion
    cfg.check_data_parallel()
    train, heldout = load_corpus(cfg.corpus)
    out = Path(out or cfg.output_dir)
    ray_opts = {"use_ray": cfg.use_ray, "num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    models = [*cfg.sources, cfg.target]
    folders = [out / "sources" / s.name for s in cfg.sources] + [out / "target_init"]
    for m in models:  # a missing folder, hub id or tokenizer fails here, before any work
        if m.path is not None:
            with fuse_checkpoint_errors():
                load_tokenizer(resolve_model_folder(m.path))
    to_build = [(m, f) for m, f in zip(models, folders, strict=True) if m.path is None]
    if to_build:
        report(f"building {', '.join(m.name for m, _ in to_build)} ...")
        run_jobs(
            [
                (build_model, {"spec": m, "texts": build_texts(m, train, heldout), "path": f})
                for m, f in to_build
            ],
            **ray_opts,
        )
    paths = [f if m.path is None else m.path for m, f in zip(models, folders, strict=True)]
    src_paths, target = paths[:-1], paths[-1]
    with fuse_checkpoint_errors():
        target_tok = load_tokenizer(resolve_model_folder(target))
    n_texts = len(train)
    train, dropped = drop_short_texts(target_tok, train)
    if dropped:
        report(
            f"skipped {dropped} of {n_texts} training texts shorter than two tokens (target "
            "tokenizer): no token-to-token prediction in them to fuse"
        )
    report("extracting source distributions ...")
    ex = cfg.extraction
    dist_dirs = extract_all(
        src_paths,
        train,
        out / "distributions",
        fz.k,
        **ray_opts,
        shard_size=ex.shard_size,
        workers_per_source=ex.workers_per_source,
        report=report,
    )
    common = {
        "steps": fz.steps,
        "lr": fz.lr,
        "seed": fz.seed,
        "batch_size": fz.batch_size,
        "device": fz.device,
        "precision": fz.precision,
        "log_every": max(1, fz.steps // 5),
        "data_parallel": res.data_parallel,
        "activation_checkpointing": fz.activation_checkpointing,
    }
    report("building fused teachers ...")
    teachers = build_teachers(
        target,
        src_paths,
        train,
        dist_dirs,
        out / "teachers",
        method=fz.method,
        vocab_fallback=fz.vocab_map,
        positions=fz.positions,
        ce_unit=fz.ce_unit,
        part_size=ex.shard_size,
        use_ray=cfg.use_ray,
        num_cpus=res.num_cpus,
        report=report,
        min_vocab_share=fz.min_vocab_share,
        min_weight=fz.min_weight,
    )
    fused = {"lam": fz.lam, "kind": fz.kind, "temperature": fz.temperature, "teachers": teachers}
    report(f"training target: plain CLM and FuseLLM ({fz.method}, lam={fz.lam:g}) ...")
    clm_job = {"target_path": target, "texts": train, "out_dir": out / "target_clm", **common}
    fuse_job = {"target_path": target, "source_paths": src_paths, "texts": train, **common}
    fuse_job.update(fused, out_dir=out / "target_fused")
    jobs = [(clm_train, clm_job), (fuse_train, fuse_job)]
    if res.train_workers > 1:
        trained = [
            run_data_parallel(
                job,
                workers=res.train_workers,
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                storage_path=out / "ray_train",
            )
            for job in jobs
        ]
    else:
        trained = run_jobs(jobs, **ray_opts)
    report("held-out perplexities ...")
    scored = [*src_paths, target, out / "target_clm", out / "target_fused"]
    ppl = [
        r["perplexity"]
        for r in run_jobs(
            [
                (perplexity_job, {"model_path": p, "texts": heldout, "device": fz.device})
                for p in scored
            ],
            **ray_opts,
        )
    ]
    names = [s.name for s in cfg.sources]
    result = {
        "sources": dict(zip(names, ppl[: len(names)], strict=True)),
        "target_before": ppl[-3],
        "target_clm": ppl[-2],
        "target_fused": ppl[-1],
        "devices": [t["device"] for t in trained],
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

    from evoray.fusion.remote import quiet_transformers

    torch.set_num_threads(1)
    quiet_transformers()
    from evoray.fusion.fuse_config import FuseConfig

    cfg = FuseConfig.from_yaml(args.config)
    if getattr(args, "use_ray", False):
        cfg = dataclasses.replace(cfg, use_ray=True)
    gpus = getattr(args, "gpus_per_task", None)
    if gpus is not None:
        if gpus < 0:
            raise ConfigError(f"--gpus-per-task must be >= 0, got {gpus:g}")
        cfg = dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, num_gpus=gpus))
    cfg.check_data_parallel()  # before a Ray is started for nothing
    if cfg.use_ray:
        from evoray.execution.tune_runner import ensure_ray

        ensure_ray(
            getattr(args, "address", None),
            getattr(args, "num_cpus", None),
            dashboard=not getattr(args, "no_dashboard", False),
        )
    result = run_fuse(cfg, getattr(args, "out", None))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
