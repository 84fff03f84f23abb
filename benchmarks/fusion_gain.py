"""FuseLLM against plain CLM where the premise holds, over several seeds, in one run.

    python benchmarks/fusion_gain.py [--config search_spaces/fusellm_domains.yaml] [--seeds 5]

Builds the config's sources (each on its own domain's text) and target once, extracts the
sources' distributions once and builds each fused teacher once; then for every training seed
trains the target four ways with the same steps and the same batches: plain CLM, FuseLLM
MinCE, FuseLLM AvgCE, and single-teacher distillation from the best source (FuseLLM's
ablation; the source with the least CE per character on the target's corpus).  Prints held-out
perplexity per domain and overall, the fused / CLM ratio with a 95% interval (t over seeds),
the diagnostics that explain a (missing) gain (alignment coverage per source, the share of
positions ``same_next`` keeps, the loss terms' scales), and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evoray.fusion.corpus import load_corpus, mixed_corpus
from evoray.fusion.fuse_cli import build_model, build_texts
from evoray.fusion.fuse_config import FuseConfig
from evoray.fusion.remote import quiet_transformers
from evoray.fusion.sources import extract_all, iter_source_rows
from evoray.fusion.teacher_build import build_teachers, per_char_ce
from evoray.fusion.train import clm_train, fuse_train, heldout_perplexity

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="search_spaces/fusellm_domains.yaml")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_transformers()
    cfg = FuseConfig.from_yaml(args.config)
    fz = cfg.fusion
    train, heldout = load_corpus(cfg.corpus)
    domains = list(cfg.corpus.domains or ["all"])
    if cfg.corpus.domains:
        _, by_domain = mixed_corpus(
            domains, cfg.corpus.seed, cfg.corpus.n_train or 90, cfg.corpus.n_heldout or 60
        )
    else:
        by_domain = {"all": heldout}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sources = [
            build_model(s, build_texts(s, train, heldout), root / s.name)["out_dir"]
            for s in cfg.sources
        ]
        target = build_model(cfg.target, train, root / "target")["out_dir"]
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dists = extract_all(sources, train, root / "dist", fz.k, use_ray=False)
        extract_s = time.perf_counter() - t0
        char_ce = [
            statistics.mean(per_char_ce(r["ce"], r["text"]) for r in iter_source_rows(d))
            for d in dists
        ]
        best = int(np.argmin(char_ce))
        print(f"built {len(sources)} sources + target {build_s:.1f} s, extracted {extract_s:.1f} s")
        for s, ce in zip(cfg.sources, char_ce, strict=True):
            print(f"  source {s.name}: CE per char on the target's corpus {ce:.3f}")
        print(f"  best single source: {cfg.sources[best].name}")
        t0 = time.perf_counter()
        stats: dict[str, dict] = {}
        teach = {
            "min_ce": (sources, dists, "min_ce"),
            "avg_ce": (sources, dists, "avg_ce"),
            "single": ([sources[best]], [dists[best]], "min_ce"),
        }
        stores = {}
        for name, (srcs, dd, method) in teach.items():
            stats[name] = {}
            stores[name] = build_teachers(
                target,
                srcs,
                train,
                dd,
                root / f"teachers_{name}",
                method=method,
                vocab_fallback=fz.vocab_map,
                positions=fz.positions,
                ce_unit=fz.ce_unit,
                min_weight=fz.min_weight,
                min_vocab_share=fz.min_vocab_share,
                report=print if name == "avg_ce" else None,
                stats=stats[name],
            )
        teach_s = time.perf_counter() - t0
        common = {"steps": fz.steps, "lr": fz.lr, "batch_size": fz.batch_size, "device": "cpu"}
        runs = ["clm", *teach]
        ppl: dict[str, list[float]] = {r: [] for r in runs}
        per_domain: dict[str, dict[str, list[float]]] = {r: {d: [] for d in domains} for r in runs}
        terms: dict[str, list[float]] = {"clm": [], "fusion": []}
        print(f"{'seed':>4} " + " ".join(f"{r:>8}" for r in runs))
        train_s = []
        for seed in range(args.seeds):
            row = []
            for r in runs:
                out = root / r
                t0 = time.perf_counter()
                if r == "clm":
                    clm_train(target, train, seed=seed, out_dir=out, **common)
                else:
                    res = fuse_train(
                        target,
                        teach[r][0],
                        train,
                        seed=seed,
                        out_dir=out,
                        lam=fz.lam,
                        kind=fz.kind,
                        temperature=fz.temperature,
                        teachers=stores[r],
                        loss_terms=True,
                        **common,
                    )
                    if r == "avg_ce":
                        terms["clm"].append(res["terms_after"]["clm"])
                        terms["fusion"].append(res["terms_after"]["fusion"])
                train_s.append(time.perf_counter() - t0)
                for d in domains:
                    per_domain[r][d].append(heldout_perplexity(out, by_domain[d]))
                ppl[r].append(heldout_perplexity(out, heldout))
                row.append(ppl[r][-1])
            print(f"{seed:>4} " + " ".join(f"{v:>8.3f}" for v in row))
        print("held-out perplexity per domain (mean over seeds):")
        print(f"{'':>8} " + " ".join(f"{d:>9}" for d in domains))
        for r in runs:
            means = [statistics.mean(per_domain[r][d]) for d in domains]
            print(f"{r:>8} " + " ".join(f"{m:>9.3f}" for m in means))
        figures: dict = {"seeds": args.seeds}
        for r in runs[1:]:
            ratios = [f / c for f, c in zip(ppl[r], ppl["clm"], strict=True)]
            mean, lo, hi = interval(ratios)
            print(f"{r} / CLM held-out perplexity: {mean:.3f} (95% CI {lo:.3f} .. {hi:.3f})")
            figures[f"ppl_ratio_{r}_over_clm"] = round(mean, 4)
            figures[f"ppl_ratio_{r}_over_clm_ci95"] = [round(lo, 4), round(hi, 4)]
        figures["heldout_ppl_mean"] = {r: round(statistics.mean(ppl[r]), 4) for r in runs}
        print("alignment (AvgCE teachers, all sources):")
        for i, s in enumerate(cfg.sources):
            a = stats["avg_ce"]["sources"][i]
            print(
                f"  {s.name}: aligned {a['aligned_share']:.3f} of target positions, same_next "
                f"kept {a['kept_share']:.3f} of aligned, vocab exact {a['vocab_exact_share']:.3f} "
                f"of source, covers {a['target_vocab_share']:.3f} of target vocab"
            )
        cover = stats["avg_ce"]["teacher_share"]
        print(f"  positions with a fused teacher: {cover:.3f} of target positions")
        c, f = statistics.mean(terms["clm"]), statistics.mean(terms["fusion"])
        print(
            f"loss terms after AvgCE training: CLM {c:.3f}, fusion {f:.3f} (weighted: "
            f"{fz.lam:g} x {c:.3f} vs {1 - fz.lam:g} x {f:.3f})"
        )
        figures["alignment"] = {
            s.name: {
                k: round(v, 4)
                for k, v in stats["avg_ce"]["sources"][i].items()
                if isinstance(v, float)
            }
            for i, s in enumerate(cfg.sources)
        }
        figures["teacher_position_share"] = round(cover, 4)
        figures["loss_clm_after"] = round(c, 4)
        figures["loss_fusion_after"] = round(f, 4)
        figures["build_s"] = round(build_s, 2)
        figures["extract_s"] = round(extract_s, 2)
        figures["teachers_s"] = round(teach_s, 2)
        figures["train_s_mean"] = round(statistics.mean(train_s), 2)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
