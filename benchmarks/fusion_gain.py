"""FuseLLM against plain CLM on the shipped tiny demo, over several seeds, in one run.

    python benchmarks/fusion_gain.py [--config search_spaces/fusellm.yaml] [--seeds 4]

Builds the config's sources and target once, extracts the sources' distributions once, then
for each training seed trains the target with plain CLM and with FuseLLM (same steps, same
batches) and prints held-out perplexities and the ratio fused / CLM (< 1: fusion helped),
then the ratio for ``positions: all`` next to the default ``same_next``, and where the time
goes: building the fused teachers (alignment + fusion) against one training run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evoray.fusion.corpus import load_corpus
from evoray.fusion.fuse_cli import build_model
from evoray.fusion.fuse_config import FuseConfig
from evoray.fusion.remote import quiet_transformers
from evoray.fusion.sources import extract_all
from evoray.fusion.train import clm_train, fuse_train, fused_teachers, heldout_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="search_spaces/fusellm.yaml")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_transformers()
    cfg = FuseConfig.from_yaml(args.config)
    fz = cfg.fusion
    train, heldout = load_corpus(cfg.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sources = [build_model(s, train, root / s.name)["out_dir"] for s in cfg.sources]
        target = build_model(cfg.target, train, root / "target")["out_dir"]
        dists = extract_all(sources, train, root / "dist", fz.k, use_ray=False)
        print(f"built {len(sources)} sources + target, extracted: {time.perf_counter() - t0:.1f} s")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(target))
        t0 = time.perf_counter()
        fused_teachers(tok, train, sources, dists, fz.method, fz.vocab_map, fz.positions)
        teach_s = time.perf_counter() - t0
        common = {"steps": fz.steps, "lr": fz.lr, "batch_size": fz.batch_size}
        fused = {"method": fz.method, "lam": fz.lam, "kind": fz.kind, "k": fz.k}
        fused.update(temperature=fz.temperature, vocab_fallback=fz.vocab_map, dist_dirs=dists)
        ratios: dict[str, list[float]] = {"same_next": [], "all": []}
        print(f"{'seed':>4} {'CLM':>8} {'fused':>8} {'ratio':>7} {'all-pos':>8} {'ratio':>7}")
        train_s = 0.0
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            clm_train(target, train, seed=seed, out_dir=root / "clm", **common)
            train_s = time.perf_counter() - t0
            clm = heldout_perplexity(root / "clm", heldout)
            row = [clm]
            for positions in ratios:
                out = root / f"fused_{positions}"
                fuse_train(
                    target,
                    sources,
                    train,
                    seed=seed,
                    out_dir=out,
                    positions=positions,
                    **common,
                    **fused,
                )
                ppl = heldout_perplexity(out, heldout)
                ratios[positions].append(ppl / clm)
                row.append(ppl)
            print(
                f"{seed:>4} {row[0]:>8.3f} {row[1]:>8.3f} {row[1] / row[0]:>7.3f} "
                f"{row[2]:>8.3f} {row[2] / row[0]:>7.3f}"
            )
        for positions, r in ratios.items():
            spread = statistics.stdev(r) if len(r) > 1 else 0.0
            print(
                f"fused / CLM perplexity, positions={positions}: mean {statistics.mean(r):.3f} "
                f"(sd {spread:.3f}, {len(r)} seeds)"
            )
        print(
            f"teacher building (align + fuse, {len(train)} texts x {len(sources)} sources) / "
            f"one CLM training run: {teach_s / train_s:.2f}"
        )


if __name__ == "__main__":
    main()
